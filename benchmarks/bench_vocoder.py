"""Real-time factor of the unit vocoder on CPU: seconds of compute per second of audio (lower is faster).

    python benchmarks/bench_vocoder.py --seconds 5 --runs 3 --threads 2

Random weights (speed does not depend on them), weight norm removed, inference mode,
durations given (5 s = 250 frames of 20 ms), median of `runs` timed runs after one warm-up.

It also counts the generator's multiply-adds per second of audio (every conv layer, by forward
hooks) and measures this machine's matmul throughput: their ratio is the lowest real-time factor
the machine could reach if every convolution ran at matmul speed. Each preset runs in float32 and
in bfloat16 (on CPUs with bfloat16 matrix units, such as AMX, the faster one), with the bfloat16
waveform's signal-to-noise ratio against float32 to show what the speed costs.
"""
import argparse
import math
import statistics
import time

import torch

from speechgpt_min.vocoder import UnitVocoder, VocoderConfig


def count_macs(model, *inputs):
    """Multiply-adds of one forward pass through the model's Conv1d and ConvTranspose1d layers."""
    macs = []

    def conv(module, args, output):  # each output sample sums (in_channels / groups) * kernel products
        macs.append(output.numel() * module.in_channels // module.groups * module.kernel_size[0])

    def transposed(module, args, output):  # each input sample scatters into (out_channels / groups) * kernel outputs
        macs.append(args[0].numel() * module.out_channels // module.groups * module.kernel_size[0])

    hooks = [m.register_forward_hook(transposed if isinstance(m, torch.nn.ConvTranspose1d) else conv)
             for m in model.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d))]
    with torch.inference_mode():
        model(*inputs)
    for hook in hooks:
        hook.remove()
    return sum(macs)


def matmul_gflops(dtype, n=1024, runs=5):
    """GFLOP/s of an n x n matmul in dtype: the best this machine does on dense math."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = min(timed(lambda: a @ b) for _ in range(runs))
    return 2 * n ** 3 / best / 1e9


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def benchmark(preset, seconds, runs):
    """Times the generator in float32 and in bfloat16 (weights and activations) on the same units.
    -> {dtype: real-time factor}, parameters, multiply-adds per second of audio, and the bfloat16
    waveform's signal-to-noise ratio (dB) against float32's."""
    torch.manual_seed(0)
    vocoder = UnitVocoder(VocoderConfig.from_preset(preset)).remove_weight_norm().eval()
    frames = int(seconds * 50)
    units = torch.randint(0, vocoder.config.num_embeddings, (1, frames))
    durations = torch.ones_like(units)
    macs_per_second = count_macs(vocoder, units, durations) / seconds
    rtf, wavs = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        vocoder.to(dtype)
        times = []
        with torch.inference_mode():
            vocoder(units, durations)  # warm-up
            for _ in range(runs):
                start = time.perf_counter()
                wavs[dtype] = vocoder(units, durations).float()  # (1, frames * 320)
                times.append(time.perf_counter() - start)
        rtf[dtype] = statistics.median(times) / (wavs[dtype].shape[1] / vocoder.config.sampling_rate)
    noise = wavs[torch.bfloat16] - wavs[torch.float32]
    snr = 10 * math.log10(wavs[torch.float32].pow(2).sum() / noise.pow(2).sum().clamp(min=1e-20))
    params = sum(p.numel() for p in vocoder.parameters())
    return rtf, params, macs_per_second, snr


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["toy", "unit-hifigan-km1000"])
    parser.add_argument("--seconds", type=float, default=5.0, help="audio length to synthesise")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.seconds:g} s of audio, median of {args.runs}")
    peak = {dtype: matmul_gflops(dtype) for dtype in (torch.float32, torch.bfloat16)}
    print(f"1024x1024 matmul: float32 {peak[torch.float32]:.0f} GFLOP/s, bfloat16 {peak[torch.bfloat16]:.0f} GFLOP/s")
    for preset in args.presets:
        rtf, params, macs, snr = benchmark(preset, args.seconds, args.runs)
        gflop = 2 * macs / 1e9  # per second of audio
        print(f"{preset}: {params / 1e6:.2f}M params, {gflop:.1f} GFLOP per second of audio")
        for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
            print(f"  {name:>8}: RTF {rtf[dtype]:.3f} ({1 / rtf[dtype]:.1f}x real time), "
                  f"{gflop / rtf[dtype]:.0f} GFLOP/s achieved, lowest RTF at matmul speed {gflop / peak[dtype]:.3f}")
        print(f"  bfloat16 waveform against float32: SNR {snr:.1f} dB")


if __name__ == "__main__":
    main()
