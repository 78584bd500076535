"""Speed of our Transformer against transformers' LlamaForCausalLM holding the same (random) weights.

Measures, side by side in one run, on the CPU:
  train step: forward + backward of the next-token loss on a (batch, seq) batch;
  decode:     greedy generation with a KV cache, new tokens per second (prompt excluded).
Ours and transformers are timed alternately, and the median of the repeats is reported.

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


def side_by_side(ours_fn, hf_fn, repeats):
    """Alternate the two so that a busy machine slows both alike; median seconds of each."""
    ours_fn(), hf_fn()  # warm-up
    ours_t, hf_t = [], []
    for _ in range(repeats):
        for fn, times in ((ours_fn, ours_t), (hf_fn, hf_t)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(ours_t), statistics.median(hf_t)


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
    o, h = side_by_side(ours_step, hf_step, repeats)
    print(f"train step  (batch {shape['batch']} x {shape['seq']}):  ours {o * 1e3:7.1f} ms   "
          f"transformers {h * 1e3:7.1f} ms   speed-up {h / o:.2f}x")

    ours.eval(), hf.eval()
    prompt = ids[:1, :16]
    with torch.no_grad():
        ours_out = ours.generate(prompt, new_tokens, temperature=0)
        hf_out = hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
    same = torch.equal(ours_out, hf_out)
    o, h = side_by_side(lambda: ours.generate(prompt, new_tokens, temperature=0),
                        lambda: hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                            do_sample=False, pad_token_id=0), repeats)
    print(f"greedy decode ({new_tokens} tokens, KV cache): ours {new_tokens / o:7.1f} tok/s   "
          f"transformers {new_tokens / h:7.1f} tok/s   speed-up {h / o:.2f}x   same ids: {same}")


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
