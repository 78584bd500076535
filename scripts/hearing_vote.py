"""Is the answer in some hearing of a question? A run's spoken answers from several hearings of each question.

    python scripts/hearing_vote.py --run runs/laptop                  # the unseen voice's test questions
    python scripts/hearing_vote.py --run runs/laptop --split test

Hears every spoken test question of a split (every one, not the eval's 60) with the run's phone recogniser
(RUN/phones) several ways: as the run hears it (`hear`, with its listen_speeds), and once each single
way: as it is, played 0.85x, 0.9x, 1.1x or 1.15x as fast (stretched back to its own frames),
through a filterbank warped 0.9 or 1.1. The run's stage-3 model answers each hearing (greedy, text
answer only). Prints how many questions each hearing answers right; how many at least one of them does
(the ceiling of any way of choosing among the hearings); and how many a majority vote of the answers
gets (ties: the run's own hearing's answer first) of six: the run's, as it is, 0.85x, 1.15x, warped 0.9
and 1.1 (docs/recipe.md §20).
"""
import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

from speechgpt_min.audio import load_audio
from speechgpt_min.evaluate import evaluate_chain, normalize_text
from speechgpt_min.phones import PhoneRecognizer, normalised_mfcc, speed_perturbed, stretched
from speechgpt_min.pipeline import SpeechGPT
from speechgpt_min.units import dedup
from spoken_misses import finished_run  # scripts/, beside this file

REPO = Path(__file__).resolve().parent.parent
SPEEDS = (0.85, 1.15, 0.9, 1.1)
WARPS = (0.9, 1.1)


def hearings(recognizer, wavs):
    """{name: [(T_i,) phone ids]}: each waveform heard as the run hears it, and once each single way."""
    own = [normalised_mfcc(w) for w in wavs]
    heard = {"as it is": recognizer.recognize(own, log_probs=True)}
    for speed in SPEEDS:
        faster = recognizer.recognize([normalised_mfcc(speed_perturbed(w, speed)) for w in wavs], log_probs=True)
        heard[f"{speed}x"] = [stretched(h, len(f)) for h, f in zip(faster, own)]  # back to its own frames
    for warp in WARPS:
        heard[f"warped {warp}"] = recognizer.recognize([normalised_mfcc(w, warp) for w in wavs], log_probs=True)
    return {"the run's": recognizer.hear(wavs, own), **{name: recognizer.decode(h) for name, h in heard.items()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished run directory whose units are phones")
    parser.add_argument("--data", type=Path, default=REPO / "tiny_data", help="its corpus (default: tiny_data/)")
    parser.add_argument("--split", default="test_unseen_voice", choices=["test", "test_unseen_voice"],
                        help="whose recordings: the unseen voice's (default) or the seen voices' (test)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings, corpus, units = finished_run(args.run, args.data)
    if not (args.run / "phones").is_dir():
        sys.exit(f"{args.run}: its units are not phones (no phones/ recogniser); python train.py --set units=phones")
    asked = [(qid, p) for p in corpus.pairs if p["split"] == "test" for qid in p["question"]["audio"]
             if corpus.by_id[qid]["split"] == args.split]
    recognizer = PhoneRecognizer.from_pretrained(args.run / "phones")
    heard = hearings(recognizer, [load_audio(args.data / corpus.by_id[qid]["audio"]) for qid, _ in asked])
    sgpt = SpeechGPT.from_run(args.run, device="cpu")
    truth = [normalize_text(p["answer"]["text"]) for _, p in asked]
    answers = {}
    print(f"{args.run} ({args.split}): {len(asked)} spoken test questions, answered right")
    for name, frames in heard.items():
        items = [(dedup(f)[0].tolist(), p["question"]["text"], p["answer"]["text"], units[p["answer"]["audio"][0]])
                 for f, (_, p) in zip(frames, asked)]
        chain = evaluate_chain(sgpt, items, settings["eval_tokens"]["chain"], speech_answer=False, progress=False)
        answers[name] = [normalize_text(a) for a in chain["text_answers"]]
        print(f"  heard {name}: {sum(a == t for a, t in zip(answers[name], truth)) / len(asked):.3f}")
    by_any = sum(any(answers[name][i] == t for name in answers) for i, t in enumerate(truth))
    print(f"  by at least one of the {len(answers)} hearings: {by_any / len(asked):.3f}")
    voters = ["the run's", "as it is", "0.85x", "1.15x", "warped 0.9", "warped 1.1"]
    voted = 0
    for i, t in enumerate(truth):
        votes = Counter(answers[name][i] for name in voters)
        voted += max(votes, key=lambda a: (votes[a], a == answers["the run's"][i])) == t
    print(f"  by a majority vote of {', '.join(voters)}: {voted / len(asked):.3f}")


if __name__ == "__main__":
    main()
