"""Where a run's spoken answers are lost: in the hearing, or in the answering?

    python scripts/spoken_misses.py --run runs/toy            # the eval's spoken test questions, seen voices
    python scripts/spoken_misses.py --run runs/laptop --split test_unseen_voice
    python scripts/spoken_misses.py --run runs/laptop --split test_unseen_voice --questions 0 --quiet

Asks the run (stage 3, greedy, `evaluate_chain` as the eval calls it) the same evenly spread spoken
test questions as `train.py`'s eval (its `eval_spoken_questions`, from the run's settings.json; or
--questions N of them, 0 for every one: the unseen voice has 453, a steadier measure than 60), and
splits them by whether the transcript is exactly right (after the eval's text normalisation): the
answer accuracy among the questions heard right says how well the run answers, the share heard
right how much the hearing costs. Prints the misses with what was heard.
"""
import argparse
import json
import sys
from argparse import Namespace
from pathlib import Path

import torch

from speechgpt_min.evaluate import evaluate_chain, evenly_spaced, normalize_text
from speechgpt_min.pipeline import SpeechGPT
from speechgpt_min.run_corpus import Corpus, UserError

REPO = Path(__file__).resolve().parent.parent


def finished_run(run, data):
    """A finished run's (settings, Corpus, units), or exit with one line saying what is missing."""
    if not (run / "stage3" / "adapter").is_dir() or not (run / "settings.json").is_file():
        sys.exit(f"{run}: no finished run (settings.json, stage-3 adapter); python train.py --out {run}")
    settings = json.loads((run / "settings.json").read_text())
    try:
        corpus = Corpus(Namespace(data=data, out=run), settings)
        return settings, corpus, corpus.units()
    except UserError as error:
        sys.exit(str(error))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished run directory (train.py --out)")
    parser.add_argument("--data", type=Path, default=REPO / "tiny_data", help="its corpus (default: tiny_data/)")
    parser.add_argument("--split", default="test", choices=["test", "test_unseen_voice"],
                        help="whose recordings: the seen voices' (test) or the unseen voice's")
    parser.add_argument("--questions", type=int, default=None,
                        help="how many, evenly spread (default: the eval's eval_spoken_questions; 0: every one, "
                             "453 in the unseen voice: a steadier measure than the eval's 60)")
    parser.add_argument("--quiet", action="store_true", help="the counts only, not the misses")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")
    args = parser.parse_args()
    if args.questions is not None and args.questions < 0:
        sys.exit("--questions must be >= 0 (0: every question)")
    torch.set_num_threads(args.threads)
    settings, corpus, units = finished_run(args.run, args.data)
    items = corpus.spoken_questions("test", args.split, units)
    wanted = settings["eval_spoken_questions"] if args.questions is None else args.questions
    if wanted:
        items = evenly_spaced(items, wanted)
    chain = evaluate_chain(SpeechGPT.from_run(args.run, device="cpu"), items, settings["eval_tokens"]["chain"],
                           speech_answer=False)
    heard = [normalize_text(t) == normalize_text(q) for t, (_, q, _, _) in zip(chain["transcripts"], items)]
    right = [normalize_text(t) == normalize_text(a) for t, (_, _, a, _) in zip(chain["text_answers"], items)]
    n_heard = sum(heard)
    print(f"{args.run} ({args.split}): {sum(right)} of {len(items)} answered right; "
          f"transcribed exactly {n_heard}, of them answered right {sum(r for r, h in zip(right, heard) if h)}; "
          f"misheard {len(items) - n_heard}, of them answered right {sum(r for r, h in zip(right, heard) if not h)}")
    for transcript, answer, (_, question, truth, _), ok in zip(chain["transcripts"], chain["text_answers"], items, right):
        if not ok and not args.quiet:
            print(f"  {question!r}: heard {transcript!r} -> {answer!r} (truth: {truth!r})")


if __name__ == "__main__":
    main()
