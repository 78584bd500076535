"""How well a run's ears hear the speech its LM learns from, and the same speech made to sound like a new voice.

    python scripts/hearing_views.py --run runs/laptop
    python scripts/hearing_views.py --run runs/laptop --warps 0.8 1.2 --speeds 0.85 --every 30

Phones wrong (`speech_steps.phone_error_rate`, against the text's pronunciation) of the run's phone
recogniser (RUN/phones) on every N-th training utterance: heard as the run hears (`hear`, with its
listen_speeds), heard once, and heard once through each view: the filterbank warped (`normalised_mfcc(wav,
warp)`, as train.py's warped_hearing does) or the waveform played faster or slower (`speed_perturbed`).
Then the unseen voice's test utterances (every third), heard as the run hears: the errors the LM meets
there (docs/recipe.md §18).
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from speechgpt_min.audio import load_audio
from speechgpt_min.phones import PhoneRecognizer, normalised_mfcc, speed_perturbed, stretched
from speechgpt_min.speech_steps import phone_error_rate

REPO = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a run directory whose units step used phones")
    parser.add_argument("--data", type=Path, default=REPO / "tiny_data", help="its corpus (default: tiny_data/)")
    parser.add_argument("--warps", type=float, nargs="*", default=[0.8, 0.85, 1.15, 1.2],
                        help="filterbank warps to hear the training speech through (default: 0.8 0.85 1.15 1.2)")
    parser.add_argument("--speeds", type=float, nargs="*", default=[0.85, 1.15, 0.75, 1.3],
                        help="speeds to play it at (default: 0.85 1.15 0.75 1.3)")
    parser.add_argument("--every", type=int, default=15, help="every N-th training utterance (default: 15)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.run / "phones").is_dir():
        sys.exit(f"{args.run}/phones: no phone recogniser; run python train.py --out {args.run} --stage units")
    if args.every < 1 or any(v <= 0 for v in args.warps + args.speeds):
        sys.exit("--every must be >= 1, warps and speeds > 0")
    recognizer = PhoneRecognizer.from_pretrained(args.run / "phones")
    rows = [json.loads(line) for line in (args.data / "manifest.jsonl").read_text().splitlines()]

    def per(picked, frames):
        return phone_error_rate([(f, r["phones"]) for f, r in zip(frames, picked)], recognizer.config.phones)

    train = [r for r in rows if r["split"] == "train"][::args.every]
    wavs = [load_audio(args.data / r["audio"]) for r in tqdm(train, desc="loading")]
    own = [normalised_mfcc(w) for w in wavs]
    print(f"{len(train)} training utterances, phones wrong:")
    print(f"  heard as the run hears (listen_speeds {list(recognizer.config.listen_speeds)}): "
          f"{per(train, recognizer.hear(wavs, own)):.3f}")
    print(f"  heard once: {per(train, recognizer.recognize(own)):.3f}")
    for warp in args.warps:
        print(f"  filterbank warped {warp}: {per(train, recognizer.recognize([normalised_mfcc(w, warp) for w in wavs])):.3f}")
    for speed in args.speeds:
        heard = recognizer.recognize([normalised_mfcc(speed_perturbed(w, speed)) for w in wavs], log_probs=True)
        frames = recognizer.decode([stretched(h, len(f)) for h, f in zip(heard, own)])  # back to its own frames
        print(f"  {speed}x as fast: {per(train, frames):.3f}")
    unseen = [r for r in rows if r["split"] == "test_unseen_voice" and r.get("phones")][::3]
    if unseen:
        wavs = [load_audio(args.data / r["audio"]) for r in tqdm(unseen, desc="loading")]
        print(f"{len(unseen)} test utterances of the unseen voice, heard as the run hears: "
              f"{per(unseen, recognizer.hear(wavs)):.3f}")


if __name__ == "__main__":
    main()
