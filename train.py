"""The main job: run SpeechGPT's pipeline on a corpus, step by step, into a run directory.

    python train.py                       # the whole toy pipeline on tiny_data/ into runs/toy/ (~15 min)
    python train.py --preset laptop       # the same recipe for longer: hears and answers better (~50 min)
    python train.py --stage units         # one step, from the previous step's output
    python train.py --set stage2.steps=900 --set lm.dim=192   # change any setting of the preset

Steps, in order (each writes into the run directory and adds its numbers to report.json):
  units   the toy's ears: a phone recogniser (phones.py) learnt from festival's alignments and forced
          alignment, or with --set units=hubert HuBERT pretraining + k-means; units for every
          utterance (units.jsonl), and their quality: PNMI and phone accuracy on held-out speech, and
          how alike one sentence's units are in two voices. With phones and warped_hearing.share > 0
          (laptop: 0.75) that share of the training speech is heard as a new voice (filterbank
          warped 0.8 or 1.2), so the LM learns from units with a new voice's errors.
  stage0  text pretraining: the LM learns the corpus's text and answers the training questions typed
          (the toy's stand-in for what LLaMA brings: the world's facts, learnt from text, and answering
          in text). The toy and laptop presets skip it, stage0.steps=0: it slows the speech stages down
          (docs/recipe.md §9); --set stage0.steps=1000 runs it. The toy reads the text in stage 2
          instead: the corpus's fact statements (text_replay, recipe §12, §14).
          --no-text-pretraining reads no text at all: no stage 0, no statements.
  stage1  modality adaptation: the LM learns unit sequences of the training speech (both CPU presets
          skip it, stage1.steps=0: in their budget it slowed stage 2 down; docs/recipe.md).
  stage2  cross-modal instruction: ASR (every voice) and TTS (the answer voice), every weight trained,
          and beside them text: the text corpus's fact statements (text_replay.stage2 copies of each)
          and the training questions typed (typed_qa.stage2 copies). With stage2.text_batch_size > 0
          (toy: 16, laptop: 32) the text is a stream of its own, that many examples in every step with
          a loss of their own; with 0, mixed into the speech examples (recipe §13, §14).
  stage3  chain of modality: spoken question -> transcript -> text answer -> spoken answer (LoRA).
  vocoder the toy's mel vocoder (units -> log-mel with context -> Griffin-Lim, mel_vocoder.py), trained
          on the answer voice's training speech and its units.
  eval    everything on held-out data: ASR, TTS, spoken and typed questions (known facts in new
          phrasings, and facts only the text corpus stated), the vocoder; seen and unseen voices.

While the LM trains, each stage decodes a few held-out examples at every evaluation and logs
what the model can do (fact completion, ASR CER, answer accuracy) beside the loss in
STAGE/metrics.jsonl; curves.png plots both for every stage.

Start the LM from pretrained weights with --init-from DIR (an HF LLaMA directory such as
SmolLM2-135M or LLaMA-7B): its tokenizer gains the unit and special tokens and its embedding grows.

The full-size recipe, --preset speechgpt-7b: LLaMA-7B, mHuBERT layer-11 units (K=1000), the released
LoRA, each stage's batch, length and steps (speechgpt_min/costing.py says where each comes from); its
LM stages run on GPUs, one at a time, under torchrun. Checkable here: `python train.py --preset speechgpt-7b --dry-run --nproc 8` prints
each stage's parameters, memory per GPU under FSDP, tokens and FLOPs per step, the time per step on
A100 and H100 at --mfu, and the torchrun command of each stage (docs/scaling.md).
"""
# This file is the driver: the presets, --set, the command line, and the loop over the steps. The
# steps themselves live in the package, in the order the data flows: speechgpt_min/run_corpus.py
# (the corpus, checked once; UserError), speech_steps.py (units before the LM; vocoder and eval
# after it) and lm_stages.py (stages 0 to 3, and curves.png).
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from speechgpt_min.costing import STAGES, report as full_size_report, stage_settings
from speechgpt_min.device import resolve_device
from speechgpt_min.lm_stages import LM_STAGES, plot_curves, skipped, step_stage0, step_stage1, step_stage2, step_stage3
from speechgpt_min.run_corpus import Corpus, UserError
from speechgpt_min.speech_steps import step_eval, step_units, step_vocoder
from speechgpt_min.trainer import TrainConfig

TRAIN_FIELDS = set(TrainConfig.__dataclass_fields__) - {"out_dir", "seed", "device", "resume"}  # train.py's own

ANSWER_VOICE = "fest_slt"  # tiny_data's answer voice: TTS targets and spoken answers

# The presets on tiny_data. laptop: the recipe that learns the tasks best on a CPU, about 45-50 minutes
# on 2 cores (README, "What a run gives"; docs/recipe.md has every experiment behind it).
DEFAULTS = {
    "laptop": dict(
        units="phones", phone_epochs=[2, 2, 1],  # the toy's ears (phones.py): epochs of each round
        # each change of phone costs 1.5; each utterance is also heard 0.85x and 1.15x as fast (recipe §16, §17)
        phone_recognizer=dict(channels=192, switch_penalty=1.5, listen_speeds=[0.85, 1.15]),
        phone_speeds=[0.9, 1.1],   # speed-perturbed copies of the training speech in its rounds 2 and 3
        # three quarters of the LM's training speech (not the answer voice) heard as a new voice, the filterbank
        # warped 0.8 or 1.2 in turn: the LM learns the ears' errors too (recipe §18, §19)
        warped_hearing=dict(share=0.75, warps=[0.8, 1.2]),
        hubert_preset="toy", n_units=100, hubert_steps=[700], target_layer=0, unit_layer=1,  # with units=hubert
        lm_preset="toy", lm={}, block_size=256, answer_voice=ANSWER_VOICE,
        typed_qa=dict(stage0=4, stage2=1),  # copies of the training pairs, typed, in a stage's text (recipe §13, §14)
        text_replay=dict(stage2=1, stage3=0),  # each fact statement this many times in a stage's text (recipe §12)
        stage0=dict(steps=0, batch_size=64, lr=2e-3, min_lr=2e-4, warmup_steps=20),  # 0: skipped; 1000 to run it
        stage1=dict(steps=0, batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=5),   # 0: skipped (recipe §3, §9)
        stage2=dict(steps=3000, batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=20,  # still learning at 3000
                    text_batch_size=32),  # + 32 text examples per step, a stream of their own (recipe §14)
        stage3=dict(steps=1500, batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=10),  # (docs/recipe.md §6)
        lora="toy",
        # the mel vocoder on the answer voice: 1000 steps of 4 utterances, about a minute (README, vocoder)
        vocoder_preset="toy", vocoder=dict(steps=1000, batch_size=4, lr=4e-3),
        eval_tokens=dict(asr=64, tts=256, chain=384),  # generation limits: tiny_data's longest answers fit
        eval_sentences=100,        # ASR and TTS: per split, evenly spread over the test sentences
        eval_spoken_questions=60,  # per split, evenly spread over the test questions (every skill)
        eval_typed_questions=100,
        watch=8,                   # held-out examples each stage decodes at every evaluation
    ),
    # A few steps of everything: checks that the pipeline runs end to end (the tests use it).
    "smoke": dict(
        units="phones", phone_epochs=[1, 1], phone_speeds=[1.1], warped_hearing=dict(share=0.5, warps=[0.9]),
        phone_recognizer=dict(channels=32, switch_penalty=1.5, listen_speeds=[1.1]),
        hubert_preset="toy", n_units=20, hubert_steps=[2, 2], target_layer=2, unit_layer=3,
        lm_preset="toy", lm={}, block_size=64, answer_voice=ANSWER_VOICE,
        typed_qa=dict(stage0=1, stage2=1), text_replay=dict(stage2=1, stage3=1),
        stage0=dict(steps=2, batch_size=2, lr=1e-3, min_lr=1e-4, warmup_steps=1),
        stage1=dict(steps=2, batch_size=2, lr=1e-3, min_lr=1e-4, warmup_steps=1),
        stage2=dict(steps=2, batch_size=2, lr=1e-3, min_lr=1e-4, warmup_steps=1, text_batch_size=2),
        stage3=dict(steps=2, batch_size=2, lr=1e-3, min_lr=1e-4, warmup_steps=1),
        lora="speechgpt",
        vocoder_preset="toy", vocoder=dict(steps=2, batch_size=2),
        eval_tokens=dict(asr=8, tts=8, chain=8),
        eval_sentences=4, eval_spoken_questions=4, eval_typed_questions=4,
        watch=2,
    ),
}
# The default, toy: the laptop recipe cut to about 15 minutes on 2 cores. Its ears train two rounds
# on the speech as it is (no speed-perturbed copies, no third round) and hear it once (ears that never
# learnt speed-perturbed speech hear worse at other speeds), and its LM learns from the training speech
# as heard (1300 steps are too few to learn a new voice's errors too: recipe §18); stage 2 runs 1300
# steps with 16 text examples each, three copies of the typed questions to one of the statements
# (answering first, knowledge second); stage 3 runs 350; the eval asks fewer questions. It hears and
# answers less well (recipe §15-§18).
LAPTOP = DEFAULTS["laptop"]
DEFAULTS["toy"] = dict(LAPTOP, phone_epochs=[2, 2], phone_speeds=[],
                       phone_recognizer=dict(LAPTOP["phone_recognizer"], listen_speeds=[]),
                       warped_hearing=dict(LAPTOP["warped_hearing"], share=0.0),
                       typed_qa=dict(LAPTOP["typed_qa"], stage2=3),
                       stage2=dict(LAPTOP["stage2"], steps=1300, text_batch_size=16),
                       stage3=dict(LAPTOP["stage3"], steps=350),
                       vocoder=dict(LAPTOP["vocoder"], steps=500),
                       eval_sentences=40, eval_spoken_questions=40)
# SpeechGPT-7B as the paper trained it: LLaMA-7B, mHuBERT's layer-11 units with K=1000 (made outside
# this script), the released LoRA, each stage's batch, length and steps (speechgpt_min/costing.py has
# the numbers and their sources). LM stages only, on GPUs; --dry-run prints what each stage costs.
DEFAULTS["speechgpt-7b"] = dict(LAPTOP, n_units=1000, unit_layer=11, lm_preset="llama-7b",
                                block_size=STAGES[0].seq_len, lora="speechgpt", **stage_settings(),
                                typed_qa=dict(stage0=0, stage2=0))  # LLaMA answers in text already

# The steps, in order: each is step(args, settings, report, corpus), writes into the run directory
# and adds its numbers to the report.
STEPS = {"units": step_units, "stage0": step_stage0, "stage1": step_stage1, "stage2": step_stage2,
         "stage3": step_stage3, "vocoder": step_vocoder, "eval": step_eval}


# ----------------------------------------------------------------------------- driver

def apply_overrides(settings, assignments):
    """--set stage2.steps=900 --set lm.dim=192: values are JSON (numbers, lists, true/false) or strings."""
    settings = json.loads(json.dumps(settings))  # a deep copy
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep:
            raise UserError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set stage2.steps=900")
        *path, last = key.split(".")
        target = settings
        for part in path:
            if not isinstance(target.get(part), dict):
                raise UserError(f"--set {key}: {part!r} is not a group of settings; groups: "
                                f"{', '.join(k for k, v in target.items() if isinstance(v, dict))}")
            target = target[part]
        any_field = path == ["lm"] or (path and path[0] in LM_STAGES and last in TRAIN_FIELDS)
        if last not in target and not any_field:  # lm.* any LMConfig field; stageN.* any TrainConfig field
            raise UserError(f"--set {key}: unknown setting {last!r}; settings here: {', '.join(target)}")
        try:
            target[last] = json.loads(value)
        except json.JSONDecodeError:
            target[last] = value
    return settings


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["all", *STEPS], default="all",
                        help="run one step (from the previous step's output in --out), or all of them (default)")
    parser.add_argument("--preset", choices=sorted(DEFAULTS), default="toy",
                        help="model sizes and step budgets (default: toy, about 15 minutes on 2 CPU cores; laptop: "
                             "the same recipe, longer, about 45-50 minutes, hears and answers better; smoke: a few "
                             "steps of each; speechgpt-7b: the paper's LLaMA-7B recipe, on GPUs)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="change one setting of the preset, e.g. stage2.steps=900 or lm.dim=192 (repeatable)")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parent / "tiny_data",
                        help="corpus directory with manifest.jsonl, qa.jsonl, text_corpus.txt (default: tiny_data/)")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<preset>)")
    parser.add_argument("--no-text-pretraining", action="store_true",
                        help="no text: skip stage 0 and the fact statements replayed in stages 2 and 3 (to "
                             "measure what the text brings)")
    parser.add_argument("--init-from", type=Path, default=None, metavar="DIR",
                        help="start the LM from an HF LLaMA directory (e.g. SmolLM2-135M, LLaMA-7B), "
                             "growing its vocabulary by the unit and special tokens")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help=f"CPU threads for every step (PyTorch and k-means) (default: all {os.cpu_count()} "
                             "cores; use 1 to run two jobs side by side)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run: skip finished steps, resume a stage from its checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--dry-run", action="store_true",
                        help="with --preset speechgpt-7b: print each stage's parameters, memory per GPU, tokens and "
                             "FLOPs per step, time per step on A100 and H100, and its torchrun command; then exit")
    parser.add_argument("--nproc", type=int, default=8, metavar="N",
                        help="with --dry-run: the number of GPUs (default: 8; above 8, nodes of 8)")
    parser.add_argument("--mfu", type=float, default=0.4,
                        help="with --dry-run: the model-FLOPs utilisation the times assume (default: 0.4)")
    args = parser.parse_args(argv)
    if args.dry_run and (args.preset != "speechgpt-7b" or args.overrides):
        parser.error("--dry-run prints the full-size preset as it is: use it with --preset speechgpt-7b, without --set")
    if args.nproc < 1 or not 0 < args.mfu <= 1:
        parser.error(f"--nproc {args.nproc} --mfu {args.mfu}: need at least one GPU and a utilisation in (0, 1]")
    args.out = args.out or Path("runs") / args.preset
    if args.init_from is not None and not (args.init_from / "config.json").is_file():
        parser.error(f"--init-from {args.init_from}: not an HF model directory (no config.json)")
    if args.threads < 1:
        parser.error(f"--threads {args.threads}: need at least one thread")
    if args.init_from is not None and not args.no_text_pretraining:
        args.no_text_pretraining = True  # a pretrained LM has had its text pretraining
        print("--init-from: the pretrained LM replaces stage 0 (text pretraining)")
    return args


def check_full_size(args):
    """The full-size preset trains LLaMA-7B one LM stage at a time on GPUs: name what is missing."""
    missing = []
    if args.stage not in ("stage1", "stage2", "stage3"):
        missing.append("one LM stage (--stage stage1, stage2 or stage3)")
    if args.stage in ("all", "stage1") and args.init_from is None:
        missing.append("the LLaMA-7B weights (--init-from DIR)")
    if not torch.cuda.is_available():
        missing.append("CUDA GPUs under torchrun")
    if missing:
        raise UserError(f"--preset speechgpt-7b needs {', '.join(missing)}; --dry-run prints what each stage "
                        f"costs and the command that runs it")


def main(argv=None):
    args = parse_args(argv)
    settings = apply_overrides(DEFAULTS[args.preset], args.overrides)
    if args.dry_run:  # before any data or device is touched
        try:
            print(full_size_report(settings["lm_preset"], settings["n_units"], settings["unit_layer"],
                                   settings["lora"], args.nproc, args.mfu))
        except ValueError as error:  # an --nproc that no stage's batch, or no node of 8, divides
            raise UserError(str(error)) from None
        return
    try:  # an unavailable --device: one line now, not a traceback after the units step
        resolve_device(args.device)
    except ValueError as error:
        raise UserError(str(error)) from None
    if args.preset == "speechgpt-7b":
        check_full_size(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    steps = [s for s in STEPS if not skipped(args, settings, s)]
    if args.stage != "all" and skipped(args, settings, args.stage):
        raise UserError(f"--stage {args.stage}: the settings skip it (--no-text-pretraining, or 0 steps)")
    mixes = dict(text_replay=(("stage2", "stage3"), "each fact statement"),
                 typed_qa=(("stage0", "stage2"), "each typed training question"))
    for name, (stages, what) in mixes.items():
        for stage, copies in settings[name].items():
            if isinstance(copies, bool) or not isinstance(copies, (int, float)) or copies < 0:
                raise UserError(f"{name}.{stage}={copies!r}: how many times {' or '.join(stages)} reads {what} "
                                f"(a number: 0 none, 0.25 a quarter of them, 2 twice)")
    share, warps = settings["warped_hearing"]["share"], settings["warped_hearing"]["warps"]
    if not (isinstance(share, (int, float)) and 0 <= share <= 1 and isinstance(warps, (list, tuple)) and warps
            and all(isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in warps)):
        raise UserError(f"warped_hearing={settings['warped_hearing']!r}: share is the fraction of the training "
                        f"utterances heard warped (0 to 1), warps the filterbank's factors, taken in turn "
                        f"(numbers > 0, e.g. [0.8, 1.2])")
    for stage in [s for s in steps if s in LM_STAGES]:  # a bad --set stage2.X: one line now, not after the units step
        try:
            TrainConfig(**settings[stage])
        except (TypeError, ValueError) as error:
            raise UserError(f"{stage}: {error}") from None
    corpus = Corpus(args, settings)  # checks the whole corpus before any work
    if "stage0" in steps and args.stage in ("all", "stage0"):
        corpus.text_corpus()
    replaying = not args.no_text_pretraining and any(settings["text_replay"].values())
    if replaying and args.stage in ("all", "stage2", "stage3"):
        corpus.fact_statements()
    args.out.mkdir(parents=True, exist_ok=True)
    report_path = args.out / "report.json"
    keep = report_path.exists() and (args.stage != "all" or args.resume)
    report = json.loads(report_path.read_text()) if keep else {}
    (args.out / "settings.json").write_text(json.dumps({"preset": args.preset, **settings}, indent=1) + "\n")

    from threadpoolctl import threadpool_limits  # scikit-learn's k-means threads follow --threads too
    with threadpool_limits(args.threads):
        for name in (steps if args.stage == "all" else [args.stage]):
            if args.resume and args.stage == "all" and f"{name}.seconds" in report:
                print(f"== {name}: already done ({report_path})")
                continue
            if not args.resume:  # a fresh start: no stale checkpoint may be resumed from
                (args.out / name / "ckpt.pt").unlink(missing_ok=True)
                (args.out / name / "metrics.jsonl").unlink(missing_ok=True)
            step_start = time.time()
            STEPS[name](args, settings, report, corpus)
            report[f"{name}.seconds"] = round(time.time() - step_start, 1)
            report_path.write_text(json.dumps(report, indent=2) + "\n")
            print(f"== {name} done in {report[f'{name}.seconds']:.0f} s")
    plot_curves(args.out)
    # The whole pipeline's time, whether its steps ran in one call or several.
    report["wall_seconds"] = round(sum(v for k, v in report.items() if k.endswith(".seconds")), 1)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {report_path}")
    for key, value in report.items():
        print(f"  {key}: {value}")


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit("interrupted")
