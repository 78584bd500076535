"""Does storing tiny_data as Ogg Opus cost held-out ASR accuracy? The same held-out sentences, read
from the committed Opus files and from a lossless (FLAC) copy of the corpus, heard by a trained run
(its ears + LM, greedy ASR) and, where installed, by Whisper tiny.en.

    python tiny_data/make_tiny_data.py --out /tmp/tiny_opus --lossless-copy /tmp/tiny_flac  # ~25 min
    python scripts/compression_cost.py --run runs/toy --lossless /tmp/tiny_flac --n 100

The lossless copy must have the same manifest ids; its audio paths may differ in extension.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from speechgpt_min.audio import load_audio  # noqa: E402
from speechgpt_min.data import load_manifest  # noqa: E402
from speechgpt_min.evaluate import (evaluate_asr, evenly_spaced, whisper_available, whisper_transcribe,  # noqa: E402
                                    word_error_rate)
from speechgpt_min.pipeline import SpeechGPT  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/toy"), help="a train.py run (default: runs/toy)")
    parser.add_argument("--data", type=Path, default=Path("tiny_data"), help="the committed corpus (Opus)")
    parser.add_argument("--lossless", type=Path, required=True, help="the same corpus stored losslessly")
    parser.add_argument("--n", type=int, default=100, help="held-out sentences per split (default: 100)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lossless = {r["id"]: r for r in load_manifest(args.lossless / "manifest.jsonl")}
    sgpt = SpeechGPT.from_run(args.run, device="cpu", adapter=False)  # the stage-2 model: ASR is its task
    print("| split | sentences | format | toy ASR CER | toy ASR WER | Whisper WER |\n| --- | ---: | --- | ---: | ---: | ---: |")
    for split in ("test", "test_unseen_voice"):
        rows = [r for r in load_manifest(args.data / "manifest.jsonl") if r["split"] == split and r["kind"] == "sent"]
        rows = evenly_spaced([r for r in rows if r["id"] in lossless], args.n)
        for name, root, table in (("Opus", args.data, None), ("FLAC", args.lossless, lossless)):
            wavs = [load_audio(root / (table[r["id"]] if table else r)["audio"]) for r in rows]
            asr = evaluate_asr(sgpt, [(sgpt.speech_to_units(w), r["text"]) for w, r in zip(wavs, rows)], 64,
                               progress=False)
            whisper = (word_error_rate([r["text"] for r in rows], whisper_transcribe(wavs, progress=False))
                       if whisper_available() else None)
            print(f"| {split} | {len(rows)} | {name} | {asr['cer']:.3f} | {asr['wer']:.3f} | "
                  f"{'n/a' if whisper is None else f'{whisper:.3f}'} |", flush=True)


if __name__ == "__main__":
    main()
