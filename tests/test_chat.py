"""chat.py: one-shot use on a tiny random run (in a subprocess, as a user runs it), the interactive
loop, speech out to WAV and responses.jsonl, and one-line errors for user mistakes."""
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch

from speechgpt_min.pipeline import SpeechGPT

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("chat", ROOT / "chat.py")  # a script, not a package module
chat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(chat)


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run.directory


def start(*args, cwd):
    return subprocess.Popen([sys.executable, str(ROOT / "chat.py"), *map(str, args)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_subprocess_one_shot_and_one_line_errors(run, tmp_path):
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF not really a wav file")
    # started together: each pays the interpreter start-up, the waits overlap
    ok = start("--run", run, "--text", "hello", "--max-new-tokens", 20, "--seed", 0, cwd=tmp_path)
    no_run = start("--text", "hello", cwd=tmp_path)  # no runs/toy here
    corrupt = start("--run", run, "--wav", "corrupt.wav", cwd=tmp_path)
    out, err = ok.communicate(timeout=300)
    assert ok.returncode == 0, err
    assert "SpeechGPT: " in out and "Traceback" not in err
    records = [json.loads(line) for line in (tmp_path / "output" / "responses.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["input_text"] == "hello" and records[0]["task"] == "dialogue"
    assert records[0]["response"].strip() in out
    for proc, expected in ((no_run, "python train.py"), (corrupt, "corrupt.wav: not readable as audio")):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode != 0 and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and expected in err, err


def _speaking(monkeypatch):
    """Make every answer a well-formed spoken one (a random model rarely writes one)."""
    answer = "[ta] four; [ua] <sosp><3><5><eosp><eoa>"

    def generate(self, prompt_text, max_new_tokens=2048, temperature=0.7, top_p=0.8, top_k=50, seed=None,
                 on_text=None, stop_at=None):
        if on_text is not None:
            on_text(answer)
        return answer

    monkeypatch.setattr(SpeechGPT, "generate", generate)


def test_one_shot_speech_in_and_out(run, tmp_path, monkeypatch, capsys):
    _speaking(monkeypatch)
    question = tmp_path / "question.wav"
    sf.write(str(question), 0.1 * torch.randn(44100, 2).numpy(), 44100)  # stereo, 44.1 kHz
    chat.main(["--run", str(run), "--wav", str(question), "--out", str(tmp_path / "out"), "--device", "cpu"])
    shown = capsys.readouterr().out
    assert "text answer:   four" in shown and "speech answer: 2 units" in shown
    record = json.loads((tmp_path / "out" / "responses.jsonl").read_text())
    assert record["input_wav"] == str(question) and record["question_units"] and record["answer_units"] == [3, 5]
    wav, sr = sf.read(record["answer_wav"])
    assert sr == 16000 and wav.ndim == 1 and len(wav) >= 2 * 320


def test_interactive_loop(run, tmp_path, monkeypatch, capsys):
    _speaking(monkeypatch)
    typed = "what is two plus two\n:tts\nthe frog\n\nmissing.wav\n:asr\nhello\nquit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(typed))
    chat.main(["--run", str(run), "--out", str(tmp_path / "out"), "--device", "cpu"])
    shown = capsys.readouterr().out
    assert "task: tts" in shown and "error: missing.wav: no such file" in shown
    assert "error: ASR takes speech input only" in shown and "type a question" in shown
    records = [json.loads(line) for line in (tmp_path / "out" / "responses.jsonl").read_text().splitlines()]
    assert [r["task"] for r in records] == ["dialogue", "tts"]
    assert [r["answer_wav"] for r in records] == [str(tmp_path / "out" / f"answer_000{i}.wav") for i in (1, 2)]


@pytest.mark.parametrize("argv, message", [
    (["--run", "{run}", "--text", "  "], "--text is empty"),
    (["--run", "{run}", "--wav", "nope.wav"], "nope.wav: no such file"),
    (["--run", "{tmp}/elsewhere", "--text", "hi"], "no trained run at"),
    (["--run", "{run}", "--task", "tts", "--wav", "{tmp}/q.wav"], "TTS takes text input only"),
    (["--lm", "{run}/hubert", "--text", "hi"], "not a LLaMA checkpoint"),
])
def test_user_errors(run, tmp_path, argv, message):
    sf.write(str(tmp_path / "q.wav"), 0.1 * torch.randn(16000).numpy(), 16000)
    with pytest.raises(chat.UserError, match=message) as error:
        chat.main([a.format(run=run, tmp=tmp_path) for a in argv] + ["--out", str(tmp_path / "out")])
    assert "\n" not in str(error.value)


def test_help_and_argument_errors(capsys):
    with pytest.raises(SystemExit) as done:
        chat.parse_args(["--help"])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    assert all(flag in shown for flag in ("--wav", "--text", "--task", "--run", "--lm", "--kmeans", "--vocoder"))
    for argv in (["--run", "a", "--lm", "b"], ["--kmeans", "km.bin"], ["--temperature", "-1"]):
        with pytest.raises(SystemExit) as done:
            chat.parse_args(argv)
        assert done.value.code == 2
