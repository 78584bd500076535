"""Forward time of our `hubert-base` against transformers' HubertModel, same weights and audio.

Builds a random-init transformers HubertModel (HuBERT-base shape), saves it, loads it with our
`HuBERT.from_pretrained`, checks that the outputs agree, then times both under
torch.inference_mode (warm-up, then the median of several repeats).

    python benchmarks/bench_hubert.py --batch 2 --seconds 10 --repeats 5
"""
import argparse
import statistics
import tempfile
import time

import torch

from speechgpt_min.hubert import HuBERT


def median_seconds(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0, help="audio length per utterance")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers  # the reference; a test dependency

    torch.manual_seed(0)
    hf = transformers.HubertModel(transformers.HubertConfig()).eval()  # HuBERT-base defaults
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        ours = HuBERT.from_pretrained(directory)
    wav = torch.randn(args.batch, int(args.seconds * 16000))
    layers = ours.config.num_hidden_layers

    with torch.inference_mode():
        diff = (ours.features(wav, layers)[0] - hf(wav).last_hidden_state).abs().max().item()
        t_ours, all_ours = median_seconds(lambda: ours.features(wav, layers), args.warmup, args.repeats)
        t_hf, all_hf = median_seconds(lambda: hf(wav), args.warmup, args.repeats)

    audio = args.batch * args.seconds
    print(f"HuBERT-base forward, {args.batch} x {args.seconds:g} s, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} (max |diff| {diff:.1e})")
    print(f"  speechgpt_min: {t_ours:.3f} s  (RTF {t_ours / audio:.3f})  runs {[round(t, 3) for t in all_ours]}")
    print(f"  transformers : {t_hf:.3f} s  (RTF {t_hf / audio:.3f})  runs {[round(t, 3) for t in all_hf]}")
    print(f"  ratio ours / transformers: {t_ours / t_hf:.3f}")


if __name__ == "__main__":
    main()
