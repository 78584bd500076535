"""Real-time factor of the unit vocoders on CPU: seconds of compute per second of audio (lower is faster).

    python benchmarks/bench_vocoder.py --seconds 5 --runs 3 --threads 2

The toy's mel vocoder (mel_vocoder.py, the one train.py trains) first: units -> log-mel, then
Griffin-Lim at several iteration counts, timed apart; then the unit HiFi-GAN presets.

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

from speechgpt_min.mel_vocoder import MelVocoder, MelVocoderConfig
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


def median_seconds(fn, runs):
    fn()  # warm-up
    return statistics.median(timed(fn) for _ in range(runs))


def benchmark_mel(seconds, runs, iterations):
    """The mel vocoder "toy" preset, float32, durations given (units of 2 and 3 frames, as speech has):
    -> (parameters, RTF of units -> log-mel, {Griffin-Lim iterations: RTF of log-mel -> waveform})."""
    torch.manual_seed(0)
    vocoder = MelVocoder(MelVocoderConfig.from_preset("toy")).eval()
    n = int(seconds * 50 / 2.5)  # units
    units = torch.randint(0, vocoder.config.num_embeddings, (1, n))
    durations = 2 + torch.arange(n)[None] % 2  # (1, n): 2, 3, 2, 3, ... frames
    audio_seconds = int(durations.sum()) * vocoder.config.code_hop_size / vocoder.config.sampling_rate
    with torch.inference_mode():
        model_rtf = median_seconds(lambda: vocoder.units_to_mel(units, durations), runs) / audio_seconds
        log_mel = vocoder.units_to_mel(units, durations)[0][0]  # (n_mels, frames)
        griffin_lim_rtf = {}
        for iters in iterations:
            vocoder.config.griffin_lim_iters = iters
            griffin_lim_rtf[iters] = median_seconds(lambda: vocoder.mel_to_wave(log_mel), runs) / audio_seconds
    return sum(p.numel() for p in vocoder.parameters()), model_rtf, griffin_lim_rtf


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
    parser.add_argument("--presets", nargs="+", default=["toy", "unit-hifigan-km1000"], help="unit HiFi-GAN presets")
    parser.add_argument("--griffin-lim-iters", nargs="+", type=int, default=[4, 8, 16, 32],
                        help="Griffin-Lim iteration counts to time the mel vocoder with")
    parser.add_argument("--seconds", type=float, default=5.0, help="audio length to synthesise")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.seconds:g} s of audio, median of {args.runs}")
    peak = {dtype: matmul_gflops(dtype) for dtype in (torch.float32, torch.bfloat16)}
    print(f"1024x1024 matmul: float32 {peak[torch.float32]:.0f} GFLOP/s, bfloat16 {peak[torch.bfloat16]:.0f} GFLOP/s")
    params, model_rtf, griffin_lim_rtf = benchmark_mel(args.seconds, args.runs, args.griffin_lim_iters)
    default = MelVocoderConfig().griffin_lim_iters
    print(f"mel vocoder toy: {params / 1e6:.2f}M params, float32; units -> log-mel RTF {model_rtf:.4f}")
    for iters, rtf in griffin_lim_rtf.items():
        print(f"  + Griffin-Lim {iters:>2} iterations: RTF {rtf:.4f}, units -> waveform RTF {model_rtf + rtf:.4f}"
              + (" (the preset)" if iters == default else ""))
    print("unit HiFi-GAN:")
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
