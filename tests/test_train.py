"""The main job end to end: `train.py --preset smoke` runs every step on a small slice of tiny_data
and writes the run directory and report that chat.py and the README rely on."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from speechgpt_min.audio import read_packed

ROOT = Path(__file__).resolve().parents[1]
REPORT_KEYS = ["units.pnmi", "units.phone_accuracy", "units.cross_voice_same_text", "units.cross_voice_other_text",
               "units.phone_error_rate", "units.phone_error_rate_seen_voices",
               "stage0.val_loss", "stage0.fact_accuracy", "stage0.typed_accuracy", "stage1.val_loss", "stage1.unigram_val_loss",
               "stage2.asr_wer", "stage2.asr_cer", "stage2.tts_unit_edit_distance", "stage3.transcript_wer",
               "stage3.answer_accuracy", "stage3.speech_answer_unit_edit_distance", "stage3.well_formed",
               "stage3.text_answer_accuracy", "stage3.knowledge_accuracy", "stage3.knowledge_accuracy_unseen_voice",
               "stage3.knowledge_text_accuracy", "stage3.knowledge_lookup_accuracy",
               "stage3.knowledge_lookup_accuracy_unseen_voice", "stage3.knowledge_lookup_text_accuracy",
               "vocoder.mel_l1", "vocoder.rtf", "stage2.asr_wer_unseen_voice", "stage3.answer_accuracy_unseen_voice",
               "wall_seconds"]


def run_train(*args):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=900)


def slice_corpus(out, tiny_data):
    """A slice of tiny_data in `out`: a few sentences of every split (the answer voice's too), a few
    question/answer pairs of every split, and the start of the text corpus and of the facts."""
    rows = [json.loads(line) for line in (tiny_data / "manifest.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (tiny_data / "qa.jsonl").read_text().splitlines()]
    spoken = [p for p in pairs if p["question"]["audio"]]
    chosen_pairs = [p for split, n in (("train", 6), ("valid", 2), ("test", 2))
                    for p in [p for p in spoken if p["split"] == split][:n]]
    knowledge = [p for p in spoken if p["split"] == "test_knowledge"]  # a sum, and a fact to look up
    chosen_pairs += [next(p for p in knowledge if p["skill"] == skill) for skill in ("plus", "opposite")]
    ids = {a for p in chosen_pairs for side in ("question", "answer") for a in p[side]["audio"]}
    for split, n in (("train", 8), ("valid", 2), ("test", 6), ("test_unseen_voice", 2)):
        ids |= {r["id"] for r in [r for r in rows if r["kind"] == "sent" and r["split"] == split][:n]}
    chosen_rows = [r for r in rows if r["id"] in ids]
    for folder in ("audio", "alignments"):
        (out / folder).mkdir(parents=True)
    for row in chosen_rows:  # out of tiny_data's archives, into plain files: a manifest may name either
        for key, folder in (("audio", "audio"), ("alignment", "alignments")):
            if row[key]:
                plain = f"{folder}/{row['id']}{Path(row[key]).suffix}"
                (out / plain).write_bytes(read_packed(tiny_data / row[key]))
                row[key] = plain
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chosen_rows))
    (out / "qa.jsonl").write_text("".join(json.dumps(p) + "\n" for p in chosen_pairs))
    (out / "text_corpus.txt").write_text("\n".join((tiny_data / "text_corpus.txt").read_text().splitlines()[:300]) + "\n")
    (out / "facts.jsonl").write_text("".join((tiny_data / "facts.jsonl").read_text().splitlines(keepends=True)[:20]))
    return out


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, tiny_data):
    return slice_corpus(tmp_path_factory.mktemp("corpus"), tiny_data)


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
    for step in ("units", "stage0", "stage1", "stage2", "stage3", "vocoder", "eval"):
        assert f"== {step} done" in result.stdout
    for path in ("phones/model.safetensors", "units.jsonl", "stage0/model/config.json", "stage1/model/config.json",
                 "stage2/model/model.safetensors", "stage3/adapter/adapter_config.json",
                 "vocoder/model.safetensors", "stage1/metrics.jsonl", "curves.png", "settings.json"):
        assert (run_dir / path).exists(), path
    # each stage's evaluations decode held-out examples: task scores beside the loss
    for stage, score in (("stage0", "fact_accuracy"), ("stage0", "typed_accuracy"), ("stage2", "asr_cer"),
                         ("stage2", "fact_accuracy"), ("stage2", "typed_accuracy"), ("stage3", "answer_accuracy")):
        records = [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
        assert any(score in r and "val_loss" in r for r in records), (stage, score)
    # stage 2 reads its text (statements, typed questions) as a stream of its own, with a loss of its own
    stage2 = [json.loads(line) for line in (run_dir / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["text_loss"] > 0 for r in stage2)
    units = [json.loads(line) for line in (run_dir / "units.jsonl").read_text().splitlines()]
    assert all(len(u["units"]) == len(u["durations"]) > 0 for u in units)
    assert "training utterances heard again, filterbank warped 0.9" in result.stdout  # warped_hearing
    assert 0.0 <= report["units.pnmi"] <= 1.0 and report["vocoder.rtf"] > 0


def test_the_analysis_scripts_read_a_finished_run(smoke_run, small_corpus):
    """scripts/spoken_misses.py and hearing_vote.py on every unseen-voice test question of the smoke run."""
    run_dir, _ = smoke_run

    def script(name, *args):
        result = subprocess.run([sys.executable, str(ROOT / "scripts" / name), "--run", str(run_dir), "--data",
                                 str(small_corpus), *args], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    misses = script("spoken_misses.py", "--split", "test_unseen_voice", "--questions", "0", "--quiet")
    unseen = {r["id"] for r in map(json.loads, (small_corpus / "manifest.jsonl").read_text().splitlines())
              if r["split"] == "test_unseen_voice"}
    asked = sum(qid in unseen for p in map(json.loads, (small_corpus / "qa.jsonl").read_text().splitlines())
                if p["split"] == "test" for qid in p["question"]["audio"])
    assert asked > 0 and f"of {asked} answered right" in misses
    assert not [line for line in misses.splitlines() if line.startswith("  ")]  # --quiet: no misses listed
    vote = [line.strip() for line in script("hearing_vote.py").splitlines()]
    scores = {line.split(": ")[0]: float(line.split(": ")[-1]) for line in vote if line.startswith(("heard", "by"))}
    assert len(scores) == 10 and f"{asked} spoken test questions" in vote[0]
    singles = [v for k, v in scores.items() if k.startswith("heard")]
    assert max(singles) <= scores["by at least one of the 8 hearings"] <= 1  # the ceiling of any choice


def test_warped_hearing_hears_a_share_of_the_training_speech_through_the_warps_in_turn():
    """Only training utterances outside the answer voice are heard again, each picked one through the
    next warp of the list; the rest keep the units as heard."""
    from argparse import Namespace
    from speechgpt_min.phones import normalised_mfcc
    from speechgpt_min.speech_steps import warped_hearing

    class Ears:  # records what it hears; its "units" say which utterance it was
        def recognize(self, features):
            self.heard = features
            return [torch.full((3,), 100 + n) for n in range(len(features))]

    wavs = [torch.randn(4000, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    rows = [dict(split="train", voice="a"), dict(split="train", voice="answer"), dict(split="test", voice="a"),
            dict(split="train", voice="b"), dict(split="train", voice="a"), dict(split="train", voice="b")]
    as_heard = [torch.zeros(3, dtype=torch.long) + i for i in range(6)]
    settings = dict(warped_hearing=dict(share=1.0, warps=[0.8, 1.2]), answer_voice="answer")
    ears = Ears()
    units = warped_hearing(Namespace(seed=0), settings, ears, wavs, rows, as_heard)
    assert [int(u[0]) for u in units] == [100, 1, 2, 101, 102, 103]  # the answer voice and the test split as heard
    for features, i, warp in zip(ears.heard, [0, 3, 4, 5], [0.8, 1.2, 0.8, 1.2]):
        torch.testing.assert_close(features, normalised_mfcc(wavs[i], warp))
    settings["warped_hearing"]["share"] = 0.0
    assert warped_hearing(Namespace(seed=0), settings, ears, wavs, rows, as_heard) is as_heard


def test_phone_error_rate_merges_repeats_and_leaves_out_pauses():
    from speechgpt_min.speech_steps import phone_error_rate

    names = ["pau", "k", "ae", "t", "d"]
    cat = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 0])  # frames: pau pau k k ae ae ae t pau
    assert phone_error_rate([(cat, "pau k ae t pau")], names) == 0.0
    cad = torch.tensor([1, 2, 0, 4])  # k ae pau d: one of three phones wrong
    assert phone_error_rate([(cat, "k ae t"), (cad, "k ae t")], names) == 1 / 6


def test_resume_skips_finished_steps(smoke_run, small_corpus):
    run_dir, _ = smoke_run
    result = run_train("--preset", "smoke", "--data", small_corpus, "--out", run_dir, "--resume", "--stage", "all")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("already done") == 7


def test_the_run_talks(smoke_run):
    """The smoke run's model is untrained, so its words are noise; but the whole chain must run and
    whatever it says must come back parsed: the text it generated, and the problems of its format."""
    from speechgpt_min.pipeline import SpeechGPT, parse_response

    run_dir, _ = smoke_run
    sgpt = SpeechGPT.from_run(run_dir, device="cpu")
    result = sgpt.chat(text="what is two plus two", temperature=0, max_new_tokens=8)
    assert result.task == "dialogue" and result.prompt.endswith("[Human]: what is two plus two<eoh>. [SpeechGPT]: ")
    # the reply is the run's LM speaking greedily after that prompt, parsed into its parts
    said = sgpt.generate(result.prompt, 8, temperature=0)
    assert result.response == parse_response(said, n_units=sgpt.tokenizer.n_units)
    if "<eoa>" not in said:  # an untrained model rarely finishes: then the parse says so
        assert "no <eoa>: the answer was cut off" in result.response.problems


@pytest.mark.parametrize("breakage, message", [
    (lambda d: (d / "audio").rename(d / "gone"), "missing (utterance"),
    (lambda d: next((d / "audio").rglob("*.ogg")).write_bytes(b"not audio at all"), "not readable as audio"),
    (lambda d: (d / "manifest.jsonl").write_text(
        (d / "manifest.jsonl").read_text().replace('"voice": ', '"speaker": ', 1)), "missing ['voice']"),
    (lambda d: (d / "manifest.jsonl").write_text(
        (d / "manifest.jsonl").read_text().replace('"split": "valid"', '"split": "dev"', 1)), "unknown split 'dev'"),
    (lambda d: (d / "manifest.jsonl").write_text("".join(
        line + "\n" for line in (d / "manifest.jsonl").read_text().splitlines() if '"split": "valid"' not in line)),
     "no utterances in split 'valid'"),
    (lambda d: (d / "text_corpus.txt").unlink(), "text_corpus.txt: no such file"),
])
def test_bad_corpus_stops_before_any_training(tmp_path, breakage, message, tiny_data):
    corpus = slice_corpus(tmp_path / "corpus", tiny_data)
    breakage(corpus)
    result = run_train("--preset", "smoke", "--data", corpus, "--out", tmp_path / "run")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "run" / "hubert").exists()  # nothing was trained


def test_settings_can_be_changed_and_mistakes_are_named(tmp_path):
    from train import DEFAULTS, UserError, apply_overrides

    settings = apply_overrides(DEFAULTS["toy"], ["stage2.steps=900", "lm.dim=192", "n_units=50"])
    assert (settings["stage2"]["steps"], settings["lm"]["dim"], settings["n_units"]) == (900, 192, 50)
    assert DEFAULTS["toy"]["stage2"]["steps"] != 900  # the preset itself is untouched
    for bad, message in (("stage2.stepz=1", "unknown setting 'stepz'"), ("stage9.steps=1", "'stage9' is not a group"),
                         ("steps", "expected KEY=VALUE")):
        with pytest.raises(UserError, match=message):
            apply_overrides(DEFAULTS["toy"], [bad])


def test_a_stage_takes_any_trainer_setting(tmp_path):
    """--set stage2.eval_every=5 reaches TrainConfig (a short timing run need not evaluate every step);
    train.py's own fields (out_dir, seed, device, resume) stay its own."""
    from argparse import Namespace

    from speechgpt_min.lm_stages import train_config
    from train import DEFAULTS, UserError, apply_overrides

    settings = apply_overrides(DEFAULTS["toy"], ["stage2.steps=40", "stage2.eval_every=5", "stage2.eval_batches=2"])
    args = Namespace(out=tmp_path, seed=0, device="cpu", resume=False)
    cfg = train_config(args, settings, "stage2")
    assert (cfg.steps, cfg.eval_every, cfg.eval_batches, cfg.checkpoint_every) == (40, 5, 2, 100)
    assert train_config(args, DEFAULTS["toy"], "stage3").eval_every == DEFAULTS["toy"]["stage3"]["steps"] // 8
    with pytest.raises(UserError, match="unknown setting 'seed'"):
        apply_overrides(DEFAULTS["toy"], ["stage2.seed=1"])


def test_the_toy_is_the_laptop_recipe_cut_short(tmp_path):
    """Both CPU presets build valid training settings for the LM stages they run; the toy differs from
    the laptop only in budgets (steps, rounds of the ears, speed copies, text per step, eval sizes), never
    in the model."""
    from argparse import Namespace

    from speechgpt_min.lm_stages import LM_STAGES, train_config
    from train import DEFAULTS

    args = Namespace(out=tmp_path, seed=0, device="cpu", resume=False)
    toy, laptop = DEFAULTS["toy"], DEFAULTS["laptop"]
    for preset in (toy, laptop):
        for stage in [s for s in LM_STAGES if preset[s]["steps"] > 0]:  # stages 0 and 1 are skipped
            train_config(args, preset, stage)  # a TrainConfig: raises on a bad setting
    assert set(toy) == set(laptop) and {key for key in laptop if toy[key] != laptop[key]} <= {
        "phone_epochs", "phone_speeds", "phone_recognizer", "warped_hearing", "typed_qa", "stage2", "stage3",
        "vocoder", "eval_sentences", "eval_spoken_questions"}
    # the toy's ears are the laptop's, hearing each utterance once
    assert toy["phone_recognizer"] == dict(laptop["phone_recognizer"], listen_speeds=[])
    # and its LM learns from the training speech as heard, none of it warped
    assert toy["warped_hearing"]["share"] == 0 < laptop["warped_hearing"]["share"]
    assert toy["stage2"]["steps"] < laptop["stage2"]["steps"] and toy["stage3"]["steps"] < laptop["stage3"]["steps"]


def test_user_mistakes_get_one_line(tmp_path):
    result = run_train("--data", tmp_path / "nowhere", "--out", tmp_path / "run", "--stage", "units")
    assert result.returncode != 0
    assert "manifest.jsonl: no such file" in result.stderr and "Traceback" not in result.stderr
    result = run_train("--out", tmp_path / "empty_run", "--stage", "stage2")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "run the units step first" in result.stderr or "run that stage first" in result.stderr
    result = run_train("--init-from", tmp_path)
    assert result.returncode != 0 and "not an HF model directory" in result.stderr
    if not torch.cuda.is_available():  # a device this machine lacks: one line, before any step runs
        result = run_train("--out", tmp_path / "run", "--device", "cuda")
        assert result.returncode != 0 and "CUDA is not available" in result.stderr and "Traceback" not in result.stderr
        assert not (tmp_path / "run" / "units.jsonl").exists()


def test_skipped_stages_hand_their_place_to_the_last_stage_that_ran():
    from argparse import Namespace

    from speechgpt_min.lm_stages import previous_lm_stage
    from train import DEFAULTS, UserError, apply_overrides, main

    settings = apply_overrides(DEFAULTS["smoke"], ["stage1.steps=0"])
    with_text, without_text = Namespace(no_text_pretraining=False), Namespace(no_text_pretraining=True)
    assert previous_lm_stage(with_text, settings, "stage2") == "stage0"  # stage 1 has no steps
    assert previous_lm_stage(without_text, settings, "stage2") is None  # a new model
    assert previous_lm_stage(with_text, DEFAULTS["smoke"], "stage2") == "stage1"
    with pytest.raises(UserError, match="the settings skip it"):
        main(["--preset", "smoke", "--set", "stage1.steps=0", "--stage", "stage1"])
    for bad, message in (("text_replay.stage2=-1", r"text_replay\.stage2=-1: how many times stage2 or stage3"),
                         ("typed_qa.stage2=all", r"typed_qa\.stage2='all': how many times stage0 or stage2"),
                         ("typed_qa.stage3=1", "unknown setting 'stage3'; settings here: stage0, stage2"),
                         ("stage2.text_weight=-1", "stage2: text_batch_size and text_weight must be >= 0"),
                         ("stage3.batch_size=0", "stage3: batch_size must be >= 1"),
                         ("warped_hearing.share=2", r"warped_hearing=.*share is the fraction"),
                         ("warped_hearing.warps=[0.8,0]", r"warped_hearing=.*warps the filterbank's factors"),
                         ("warped_hearing.warps=0.8", r"warped_hearing=.*warps the filterbank's factors")):
        with pytest.raises(UserError, match=message):
            main(["--preset", "smoke", "--set", bad, "--stage", "stage2"])


def test_stages_0_and_2_mix_in_the_typed_training_questions(small_corpus, tmp_path):
    from argparse import Namespace

    from speechgpt_min.data import SYSTEM_PROMPT, load_text_corpus
    from speechgpt_min.lm_stages import stage0_examples, typed_pairs
    from speechgpt_min.run_corpus import Corpus
    from speechgpt_min.tokenizer import Tokenizer
    from train import DEFAULTS, apply_overrides

    corpus = Corpus(Namespace(data=small_corpus, out=tmp_path), DEFAULTS["smoke"])
    lines = load_text_corpus(small_corpus / "text_corpus.txt")
    questions = [p for p in corpus.pairs if p["split"] == "train"]
    tokenizer = Tokenizer.train([SYSTEM_PROMPT, *lines] + [p["question"]["text"] + " [ta] " + p["answer"]["text"]
                                                           for p in questions], n_units=4)
    for copies in (0, 2):
        settings = apply_overrides(DEFAULTS["smoke"], [f"typed_qa.stage0={copies}"])
        examples = stage0_examples(settings, corpus, tokenizer, 1024, seed=0)
        assert len(examples) == len(lines) + copies * len(questions)
        typed = [e for e in examples if -100 in e.labels]  # dialogues: no loss on the system prompt and question
        assert len(typed) == copies * len(questions)
        targets = [tokenizer.decode([t for t in e.labels if t >= 0]) for e in typed]  # the loss is on the answers
        assert all(any(f"[ta] {p['answer']['text']}" in target for target in targets) for p in questions) or not copies
    settings = apply_overrides(DEFAULTS["smoke"], ["typed_qa.stage2=0.5"])  # stage 2: half of them, each once
    typed = typed_pairs(settings, corpus, tokenizer, 1024, 0, "stage2")
    assert len(typed) == round(len(questions) / 2) and len({tuple(e.tokens) for e in typed}) == len(typed)


def test_stages_2_and_3_replay_the_fact_statements(small_corpus, tmp_path):
    """Text replay mixes facts.jsonl's statements into stages 2 and 3, text_replay.STAGE copies of each (a
    corpus without facts.jsonl replays its whole text corpus); --no-text-pretraining reads no text."""
    from argparse import Namespace

    from speechgpt_min.data import load_fact_statements, load_text_corpus, text_examples
    from speechgpt_min.lm_stages import replay_examples
    from speechgpt_min.run_corpus import Corpus
    from speechgpt_min.tokenizer import Tokenizer
    from train import DEFAULTS, apply_overrides

    statements = load_fact_statements(small_corpus / "facts.jsonl")
    lines = load_text_corpus(small_corpus / "text_corpus.txt")
    tokenizer = Tokenizer.train(lines + statements, n_units=4)
    corpus = Corpus(Namespace(data=small_corpus, out=tmp_path), DEFAULTS["smoke"])
    with_text = Namespace(no_text_pretraining=False, seed=0)
    without_text = Namespace(no_text_pretraining=True, seed=0)
    for copies in (0, 1, 3):
        settings = apply_overrides(DEFAULTS["smoke"], [f"text_replay.stage2={copies}"])
        examples = replay_examples(with_text, settings, corpus, tokenizer, "stage2")
        expected = text_examples(tokenizer, statements * copies)
        assert sorted(e.tokens for e in examples) == sorted(e.tokens for e in expected)
        assert replay_examples(without_text, settings, corpus, tokenizer, "stage3") == []
    settings = apply_overrides(DEFAULTS["smoke"], ["text_replay.stage3=1.5"])  # every statement, then half once more
    examples = [tuple(e.tokens) for e in replay_examples(with_text, settings, corpus, tokenizer, "stage3")]
    once = {tuple(e.tokens) for e in text_examples(tokenizer, statements)}
    assert len(examples) == len(statements) + round(len(statements) / 2) and set(examples) == once
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("manifest.jsonl", "qa.jsonl", "text_corpus.txt", "audio", "alignments"):
        (bare / name).symlink_to(small_corpus / name)
    corpus = Corpus(Namespace(data=bare, out=tmp_path), DEFAULTS["smoke"])
    assert corpus.fact_statements() == lines
