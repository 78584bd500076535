"""Speed of our Transformer against transformers' LlamaForCausalLM holding the same (random) weights.

Measures, side by side in one run, on the CPU:
  train step: forward + backward of the next-token loss on a (batch, seq) batch;
  decode:     greedy generation with a KV cache, new tokens per second (prompt excluded).
Ours and transformers are timed alternately, and the median of the repeats is reported.

Each line is followed by the bound that the shared work sets on any speed-up:
  train step: both run the same matrix multiplies, attention and log-softmax kernels on the same
              shapes; the profiler measures how long ours spends in them. Even if everything else
              cost nothing, ours could be at most (transformers' step / that time) faster.
  decode:     one token needs a matrix-vector product with every weight matrix (x @ W.T, batch 1),
              which streams all the weights from memory; timed alone, that is a floor under any
              implementation's time per token.

    python benchmarks/bench_lm.py                      # presets toy and smollm2-135m
    python benchmarks/bench_lm.py --presets toy --repeats 5
"""
import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from speechgpt_min.model import LMConfig, Transformer
from speechgpt_min.weights import HF_NAMES, config_to_hf, source_names

# per preset: vocabulary (toy: a text + unit vocabulary like the toy pipeline), train batch, train length
SHAPES = {"toy": dict(vocab=1200, batch=8, seq=256), "smollm2-135m": dict(vocab=None, batch=2, seq=256)}


def build_pair(preset, vocab):
    cfg = LMConfig.from_preset(preset, vocab_size=vocab)
    torch.manual_seed(0)
    ours = Transformer(cfg)
    hf_config = config_to_hf(cfg)
    hf_config.pop("architectures"), hf_config.pop("model_type"), hf_config.pop("torch_dtype")
    hf = LlamaForCausalLM(LlamaConfig(**hf_config, use_cache=True))
    hf_name = {ours_name: name for name, ours_name in source_names(HF_NAMES, ours).items()}
    result = hf.load_state_dict({hf_name[k]: v for k, v in ours.state_dict().items()}, strict=False)
    assert not result.unexpected_keys and result.missing_keys == (["lm_head.weight"] if cfg.tie_embeddings else [])
    assert hf.lm_head.weight is hf.model.embed_tokens.weight or not cfg.tie_embeddings  # tied: filled via embed
    return ours, hf, cfg


def side_by_side(fns, repeats):
    """Alternate the functions so that a busy machine slows all alike; median seconds of each."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, fn_times in zip(fns, times):
            start = time.perf_counter()
            fn()
            fn_times.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


# kernels both implementations call with the same shapes (matrix multiplies, attention, log-softmax)
SHARED_KERNELS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::_log_softmax",
                  "aten::_log_softmax_backward_data")


def seconds_in_shared_kernels(fn, repeats=3):
    """Median seconds that one call of fn spends inside SHARED_KERNELS, by torch's profiler."""
    times = []
    for _ in range(repeats):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        times.append(sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in SHARED_KERNELS) / 1e6)
    return statistics.median(times)


@torch.no_grad()
def matvec_floor(model, repeats):
    """Median seconds of x @ W.T (x: one token) over every weight matrix of the model, once each:
    the weight traffic of one decoding step, without anything else. -> (seconds, bytes of weights)."""
    weights = [w for name, w in model.named_parameters() if w.dim() == 2 and "embed" not in name]
    weights.append(model.lm_head.weight if model.lm_head is not None else model.embed_tokens.weight)
    x = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for w in weights:
            x[w.shape[1]] @ w.T
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), sum(w.numel() * w.element_size() for w in weights)


def bench(preset, repeats, new_tokens):
    shape = SHAPES[preset]
    ours, hf, cfg = build_pair(preset, shape["vocab"])
    print(f"\n== {preset}: {ours.num_params() / 1e6:.1f}M parameters, vocab {cfg.vocab_size}")
    ids = torch.randint(0, cfg.vocab_size, (shape["batch"], shape["seq"]), generator=torch.Generator().manual_seed(0))

    def ours_step():
        ours.zero_grad(set_to_none=True)
        ours(ids[:, :-1], ids[:, 1:])[1].backward()

    def hf_step():
        hf.zero_grad(set_to_none=True)
        hf(ids, labels=ids).loss.backward()  # transformers shifts the labels itself

    ours.train(), hf.train()
    o, h = side_by_side([ours_step, hf_step], repeats)
    print(f"train step  (batch {shape['batch']} x {shape['seq']}):  ours {o * 1e3:7.1f} ms   "
          f"transformers {h * 1e3:7.1f} ms   speed-up {h / o:.2f}x")
    shared = seconds_in_shared_kernels(ours_step)
    print(f"  of ours, {shared * 1e3:.1f} ms ({shared / o:.0%}) in the kernels both run (matmul, attention, "
          f"log-softmax): with all else free, at most {h / shared:.2f}x faster")

    ours.eval(), hf.eval()
    prompt = ids[:1, :16]
    with torch.no_grad():
        ours_out = ours.generate(prompt, new_tokens, temperature=0)
        hf_out = hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
    start = time.perf_counter()
    compiled_out = ours.generate(prompt, new_tokens, temperature=0, compile=True)
    compile_seconds = time.perf_counter() - start
    o, c, h = side_by_side([lambda: ours.generate(prompt, new_tokens, temperature=0),
                            lambda: ours.generate(prompt, new_tokens, temperature=0, compile=True),
                            lambda: hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                do_sample=False, pad_token_id=0)], repeats)
    print(f"greedy decode ({new_tokens} tokens, KV cache): ours {new_tokens / o:7.1f} tok/s   "
          f"transformers {new_tokens / h:7.1f} tok/s   speed-up {h / o:.2f}x   same ids: {torch.equal(ours_out, hf_out)}")
    print(f"  ours, generate(compile=True): {new_tokens / c:7.1f} tok/s   speed-up {h / c:.2f}x   "
          f"same ids: {torch.equal(compiled_out, hf_out)}   (the first call compiles: {compile_seconds:.0f} s)")
    floor, n_bytes = matvec_floor(ours, repeats)
    print(f"  per token: ours {o / new_tokens * 1e3:.2f} ms, transformers {h / new_tokens * 1e3:.2f} ms; "
          f"x @ W.T over the {n_bytes / 1e6:.0f} MB of weights alone {floor * 1e3:.2f} ms "
          f"({n_bytes / floor / 1e9:.1f} GB/s): at that floor, at most {h / new_tokens / floor:.2f}x faster")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice); 1 is steadier "
                        "on a machine shared with other jobs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for preset in args.presets:
        bench(preset, args.repeats, args.new_tokens)


if __name__ == "__main__":
    main()
