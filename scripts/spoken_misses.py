"""Where a run's spoken answers are lost: in the hearing, or in the answering?

    python scripts/spoken_misses.py --run runs/toy            # the eval's spoken test questions, seen voices
    python scripts/spoken_misses.py --run runs/laptop -n 60 --split test_unseen_voice

Asks the run (stage 3, greedy, as the eval does) the same evenly spread spoken test questions as
`train.py`'s eval, and splits them by whether the transcript is exactly right (after the eval's text
normalisation): the answer accuracy among the questions heard right says how well the run answers,
the share heard right how much the hearing costs. Prints the misses with what was heard.
"""
import argparse
import sys
from argparse import Namespace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # train.py, for its presets
from speechgpt_min.evaluate import chat_in_batches, evenly_spaced, normalize_text  # noqa: E402
from speechgpt_min.pipeline import SpeechGPT  # noqa: E402
from speechgpt_min.run_corpus import Corpus, UserError  # noqa: E402
from train import DEFAULTS  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished run directory (train.py --out)")
    parser.add_argument("--data", type=Path, default=Path("tiny_data"), help="its corpus (default: tiny_data/)")
    parser.add_argument("-n", type=int, default=40, help="questions, evenly spread as the eval spreads them (default: 40, the toy's)")
    parser.add_argument("--split", default="test", choices=["test", "test_unseen_voice"],
                        help="whose recordings: the seen voices' (test) or the unseen voice's")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.run / "stage3" / "adapter").is_dir():
        sys.exit(f"{args.run}: no stage-3 adapter; finish the run first (python train.py --out {args.run})")
    try:
        corpus = Corpus(Namespace(data=args.data, out=args.run), DEFAULTS["toy"])
        units = corpus.units()
    except UserError as error:
        sys.exit(str(error))
    items = evenly_spaced(corpus.spoken_questions("test", args.split, units), args.n)  # (units, question, answer, _)
    sgpt = SpeechGPT.from_run(args.run, device="cpu")
    results = chat_in_batches(sgpt, [dict(units=q_units) for q_units, *_ in items], desc="spoken questions",
                              task="dialogue", max_new_tokens=384, stop_at="[ua]")
    heard = [normalize_text(r.transcript) == normalize_text(q) for r, (_, q, _, _) in zip(results, items)]
    right = [normalize_text(r.text_answer) == normalize_text(a) for r, (_, _, a, _) in zip(results, items)]
    n_heard = sum(heard)
    print(f"{args.run} ({args.split}): {sum(right)} of {len(items)} answered right; "
          f"transcribed exactly {n_heard}, of them answered right {sum(r for r, h in zip(right, heard) if h)}; "
          f"misheard {len(items) - n_heard}, of them answered right {sum(r for r, h in zip(right, heard) if not h)}")
    for result, (_, question, answer, _), ok in zip(results, items, right):
        if not ok:
            print(f"  {question!r}: heard {result.transcript!r} -> {result.text_answer!r} (truth: {answer!r})")


if __name__ == "__main__":
    main()
