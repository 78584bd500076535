"""Real-time factor of the unit vocoder on CPU: seconds of compute per second of audio (lower is faster).

    python benchmarks/bench_vocoder.py --seconds 5 --runs 3 --threads 2

Random weights (speed does not depend on them), weight norm removed, inference mode,
durations given (5 s = 250 frames of 20 ms), median of `runs` timed runs after one warm-up.
"""
import argparse
import statistics
import time

import torch

from speechgpt_min.vocoder import UnitVocoder, VocoderConfig


def real_time_factor(preset, seconds, runs):
    vocoder = UnitVocoder(VocoderConfig.from_preset(preset)).remove_weight_norm().eval()
    frames = int(seconds * 50)
    units = torch.randint(0, vocoder.config.num_embeddings, (1, frames))
    durations = torch.ones_like(units)
    times = []
    with torch.inference_mode():
        vocoder(units, durations)  # warm-up
        for _ in range(runs):
            start = time.perf_counter()
            wav = vocoder(units, durations)  # (1, frames * 320)
            times.append(time.perf_counter() - start)
    audio_seconds = wav.shape[1] / vocoder.config.sampling_rate
    params = sum(p.numel() for p in vocoder.parameters())
    return params, statistics.median(times) / audio_seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["toy", "unit-hifigan-km1000"])
    parser.add_argument("--seconds", type=float, default=5.0, help="audio length to synthesise")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.seconds:g} s of audio, median of {args.runs}")
    for preset in args.presets:
        params, rtf = real_time_factor(preset, args.seconds, args.runs)
        print(f"{preset:>22}: {params / 1e6:6.2f}M params, RTF {rtf:.3f} ({1 / rtf:.1f}x real time)")


if __name__ == "__main__":
    main()
