"""The main job end to end: `train.py --preset smoke` runs every step on a small slice of tiny_data
and writes the run directory and report that chat.py and the README rely on."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tiny_data"
REPORT_KEYS = ["units.pnmi_mfcc", "units.pnmi_hubert", "stage1.val_loss", "stage1.unigram_val_loss",
               "stage2.asr_wer", "stage2.asr_cer", "stage2.tts_unit_edit_distance", "stage3.transcript_wer",
               "stage3.answer_accuracy", "stage3.speech_answer_unit_edit_distance", "vocoder.mel_l1",
               "vocoder.rtf", "stage2.asr_wer_unseen_voice", "stage3.answer_accuracy_unseen_voice", "wall_seconds"]


def run_train(*args):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """A slice of tiny_data: a few sentences of every split and a few question/answer pairs."""
    out = tmp_path_factory.mktemp("corpus")
    rows = [json.loads(line) for line in (TINY / "manifest.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (TINY / "qa.jsonl").read_text().splitlines()]
    chosen_pairs = ([p for p in pairs if p["split"] == "train"][:6] + [p for p in pairs if p["split"] == "valid"][:2]
                    + [p for p in pairs if p["split"] == "test"][:2])
    ids = {a for p in chosen_pairs for side in ("question", "answer") for a in p[side]["audio"]}
    for split, n in (("train", 8), ("valid", 2), ("test", 2), ("test_unseen_voice", 2)):
        ids |= {r["id"] for r in [r for r in rows if r["kind"] == "sent" and r["split"] == split][:n]}
    chosen_rows = [r for r in rows if r["id"] in ids]
    for row in chosen_rows:
        for key in ("audio", "alignment"):
            if row[key]:
                (out / row[key]).parent.mkdir(parents=True, exist_ok=True)
                (out / row[key]).write_bytes((TINY / row[key]).read_bytes())
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chosen_rows))
    (out / "qa.jsonl").write_text("".join(json.dumps(p) + "\n" for p in chosen_pairs))
    return out


@pytest.fixture(scope="module")
def smoke_run(small_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    result = run_train("--preset", "smoke", "--data", small_corpus, "--out", run_dir, "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_every_step_writes_its_part_and_the_report(smoke_run):
    run_dir, result = smoke_run
    report = json.loads((run_dir / "report.json").read_text())
    for key in REPORT_KEYS:
        assert key in report, key
    for step in ("units", "stage1", "stage2", "stage3", "vocoder", "eval"):
        assert f"== {step} done" in result.stdout
    for path in ("hubert/model.safetensors", "kmeans/model.safetensors", "units.jsonl", "stage1/model/config.json",
                 "stage2/model/model.safetensors", "stage3/adapter/adapter_config.json",
                 "vocoder/model.safetensors", "stage1/metrics.jsonl"):
        assert (run_dir / path).exists(), path
    units = [json.loads(line) for line in (run_dir / "units.jsonl").read_text().splitlines()]
    assert all(len(u["units"]) == len(u["durations"]) > 0 for u in units)
    assert 0.0 <= report["units.pnmi_hubert"] <= 1.0 and report["vocoder.rtf"] > 0


def test_resume_skips_finished_steps(smoke_run, small_corpus):
    run_dir, _ = smoke_run
    result = run_train("--preset", "smoke", "--data", small_corpus, "--out", run_dir, "--resume", "--stage", "all")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("already done") == 6


def test_the_run_talks(smoke_run):
    from speechgpt_min.pipeline import SpeechGPT

    run_dir, _ = smoke_run
    result = SpeechGPT.from_run(run_dir, device="cpu").chat(text="what is two plus two", temperature=0,
                                                             max_new_tokens=8)
    assert result.task == "dialogue" and isinstance(result.response.text, str)


def test_user_mistakes_get_one_line(tmp_path):
    result = run_train("--data", tmp_path / "nowhere", "--out", tmp_path / "run", "--stage", "units")
    assert result.returncode != 0
    assert "manifest.jsonl: no such file" in result.stderr and "Traceback" not in result.stderr
    result = run_train("--out", tmp_path / "empty_run", "--stage", "stage2")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "run the units step first" in result.stderr or "run that stage first" in result.stderr
    result = run_train("--init-from", tmp_path)
    assert result.returncode != 0 and "not an HF model directory" in result.stderr
