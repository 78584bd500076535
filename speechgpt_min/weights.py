"""Weights in and out: Hugging Face LLaMA directories, Meta checkpoints, vocabulary expansion.

    model = load_pretrained("checkpoints/smollm2-135m-instruct")       # config.json + safetensors
    model = load_pretrained("SpeechGPT-7B-cm", dtype=torch.bfloat16)  # config.json + pytorch_model.bin
    expand_vocab(model, 33006)                                         # room for unit and special tokens
    save_pretrained(model, "out/")          # transformers.LlamaForCausalLM.from_pretrained("out/") opens it

Loading is strict and low on memory: the model is built on the "meta" device (shapes, no storage),
each source tensor is read from its shard into its own memory, checked against the table below and
converted to the wanted dtype and device (a copy only if they differ); load_state_dict(assign=True)
then adopts those tensors, so the weights exist once. Every tensor of the files must be used and
every parameter filled; the only keys skipped are listed in SKIPPED_SUFFIXES. `.bin` and `.pth`
files are read with torch.load(weights_only=True), which runs no code from the file.
"""
import json
import struct
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .model import LMConfig, Transformer


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and the tensor."""


# ----------------------------------------------------------------------------- name tables

# ours -> Hugging Face LlamaForCausalLM; "{}" is the layer index.
HF_NAMES = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "layers.{}.input_layernorm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.self_attn.q_proj.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.self_attn.k_proj.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.self_attn.v_proj.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.self_attn.o_proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.post_attention_layernorm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "layers.{}.mlp.gate_proj.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.mlp.up_proj.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.mlp.down_proj.weight": "model.layers.{}.mlp.down_proj.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}

# ours -> Meta's original consolidated.00.pth (llama repository).
META_NAMES = {
    "embed_tokens.weight": "tok_embeddings.weight",
    "layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}

# Derived buffers some checkpoints carry; our model recomputes them.
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq", "rope.freqs")


def source_names(table, model):
    """{source name: our name} for every tensor of `model`'s state_dict, from a name table."""
    names = {}
    for ours in model.state_dict():
        parts = ours.split(".")
        template, layer = (".".join(["layers", "{}"] + parts[2:]), parts[1]) if parts[0] == "layers" else (ours, "")
        if template not in table:  # e.g. LoRA layers: merge them into the weights first (lora.py)
            raise WeightsError(f"{ours!r} has no name in a LLaMA checkpoint (LoRA layers: lora.merge_and_unload first)")
        names[table[template].format(layer)] = ours
    return names


# ----------------------------------------------------------------------------- configs

def config_from_hf(hf):
    """LMConfig from a Hugging Face LLaMA config.json dict (transformers 4.x or 5.x)."""
    if hf.get("model_type", "llama") != "llama":
        raise WeightsError(f"config.json: model_type {hf['model_type']!r} is not 'llama'")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise WeightsError(f"config.json: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported")
    for key, ok in [("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)]:
        if hf.get(key, ok) != ok:
            raise WeightsError(f"config.json: {key}={hf[key]!r} is not supported (expected {ok!r})")
    cfg = LMConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"),
        ffn_dim=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        tie_embeddings=hf.get("tie_word_embeddings", False))
    if hf.get("head_dim", cfg.head_dim) != cfg.head_dim:
        raise WeightsError(f"config.json: head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    return cfg


def config_to_hf(cfg, dtype=torch.float32, bos_token_id=None, eos_token_id=None):
    """A config.json dict that transformers 4.x and 5.x read as LlamaForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_dim, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers 5.x
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


# ----------------------------------------------------------------------------- reading files

# safetensors: 8 bytes little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
# then the raw little-endian bytes of every tensor.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def safetensors_header(file):
    """(header dict, byte offset of the data); WeightsError naming the first tensor a truncated file lacks."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or 8 + n > size:
            raise WeightsError(f"{file}: truncated or not a safetensors file (header incomplete)")
        try:
            header = json.loads(f.read(n))
        except ValueError as err:
            raise WeightsError(f"{file}: corrupt safetensors header ({err})") from None
    header.pop("__metadata__", None)
    for name, info in header.items():
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise WeightsError(f"{file}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        if 8 + n + info["data_offsets"][1] > size:
            raise WeightsError(f"{file}: truncated: tensor {name!r} ends at byte {8 + n + info['data_offsets'][1]}"
                               f" but the file has {size} bytes")
    return header, 8 + n


def read_safetensors(file):
    """Yield (name, tensor) from a .safetensors file, each read straight into its own new memory.

    Plain reads rather than a memory map: mapped pages stay resident until the whole file is
    closed, which would add a shard's size to the peak memory of loading.
    """
    if sys.byteorder != "little":
        raise WeightsError("reading safetensors needs a little-endian machine")
    header, data_start = safetensors_header(file)
    with open(file, "rb") as f:
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            tensor = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]])
            buffer = tensor.view(-1).view(torch.uint8).numpy()  # the tensor's bytes, written in place
            if buffer.nbytes != end - begin:
                raise WeightsError(f"{file}: tensor {name!r} has {end - begin} bytes, "
                                   f"its shape {info['shape']} and dtype {info['dtype']} need {buffer.nbytes}")
            f.seek(data_start + begin)
            if f.readinto(memoryview(buffer)) != buffer.nbytes:
                raise WeightsError(f"{file}: truncated inside tensor {name!r}")
            yield name, tensor


def read_tensors(files):
    """Yield (file, name, tensor) from each file in turn; every tensor owns its memory (no file mapping)."""
    for file in files:
        if not file.exists():
            raise WeightsError(f"missing checkpoint file {file}")
        if file.suffix == ".safetensors":
            for name, tensor in read_safetensors(file):
                yield file, name, tensor
        else:  # .bin / .pth: a pickle, so only ever with weights_only=True (no code runs)
            try:
                state = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as err:
                raise WeightsError(f"{file}: cannot read with torch.load(weights_only=True) ({err})") from None
            for name in list(state):
                yield file, name, state.pop(name)


def hf_files(path):
    """The weight files of an HF directory, from the index when the checkpoint is sharded."""
    for index_name, single in [("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")]:
        if (path / index_name).exists():
            weight_map = json.loads((path / index_name).read_text())["weight_map"]
            return [path / name for name in sorted(set(weight_map.values()))]
        if (path / single).exists():
            return [path / single]
    raise WeightsError(f"{path}: no model.safetensors, pytorch_model.bin or their .index.json")


# ----------------------------------------------------------------------------- loading

def meta_to_hf_qk(w, n_heads):
    """Permute a Meta q or k projection (out, in) from interleaved RoPE pairs to HF's half-split.

    Meta rotates pairs (x[2i], x[2i+1]) of each head; HF (and we) rotate (x[i], x[i + head_dim/2]).
    Reordering each head's output rows [0, 1, 2, 3, ...] -> [0, 2, 4, ..., 1, 3, 5, ...] makes them
    the same computation. For k of a grouped-query model pass n_kv_heads.
    """
    out_dim, in_dim = w.shape
    return (w.view(n_heads, out_dim // n_heads // 2, 2, in_dim)  # (heads, hd/2, pair, in)
             .transpose(1, 2)                                      # (heads, pair, hd/2, in)
             .reshape(out_dim, in_dim))


def fill_model(cfg, tensors, names, dtype, device, convert=None):
    """Build Transformer(cfg) from (file, name, tensor) items, strictly.

    names: {source name: our name}. convert(our name, tensor) -> tensor adapts a source layout.
    """
    with torch.device("meta"):
        model = Transformer(cfg)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    state, tied_head = {}, None
    for file, name, tensor in tensors:
        if name.endswith(SKIPPED_SUFFIXES):
            continue
        if cfg.tie_embeddings and name == "lm_head.weight":
            tied_head = (file, name, tensor)  # checked below
            continue
        if name not in names:
            raise WeightsError(f"{file}: unexpected tensor {name!r} (not part of a LLaMA model with this config)")
        ours = names[name]
        if ours in state:
            raise WeightsError(f"{file}: tensor {name!r} appears twice in the checkpoint")
        if tensor.shape != shapes[ours]:
            raise WeightsError(f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                               f"the config needs {tuple(shapes[ours])}")
        if convert is not None:  # a change of layout that keeps the shape
            tensor = convert(ours, tensor)
        state[ours] = tensor.to(device=device, dtype=dtype)  # a copy only to change dtype or device
    missing = [source for source, ours in names.items() if ours not in state]
    if missing:
        raise WeightsError(f"checkpoint lacks {len(missing)} tensor(s): {', '.join(missing[:8])}"
                           + (" ..." if len(missing) > 8 else ""))
    if tied_head is not None and not torch.equal(tied_head[2].to(device=device, dtype=dtype),
                                                 state["embed_tokens.weight"]):
        raise WeightsError(f"{tied_head[0]}: {tied_head[1]!r} differs from the embeddings, "
                           "but the config ties them (tie_word_embeddings)")
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device)  # the rotary tables (built on the CPU) follow the weights


def load_pretrained(path, dtype=torch.float32, device="cpu"):
    """Load a LLaMA checkpoint directory into our Transformer.

    Hugging Face layout: config.json + model.safetensors | sharded safetensors with
    model.safetensors.index.json | pytorch_model.bin (or its sharded index).
    Meta layout: params.json + consolidated.00.pth.
    """
    path = Path(path)
    if not path.is_dir():
        raise WeightsError(f"{path}: not a checkpoint directory")
    if (path / "params.json").exists():
        return load_meta(path, dtype, device)
    if not (path / "config.json").exists():
        raise WeightsError(f"{path}: no config.json (Hugging Face) or params.json (Meta)")
    cfg = config_from_hf(json.loads((path / "config.json").read_text()))
    with torch.device("meta"):
        names = source_names(HF_NAMES, Transformer(cfg))
    return fill_model(cfg, read_tensors(hf_files(path)), names, dtype, device)


def load_meta(path, dtype=torch.float32, device="cpu", max_seq_len=2048):
    """Load Meta's original format (params.json + consolidated.00.pth), permuting q/k to half-split RoPE."""
    files = sorted(path.glob("consolidated.*.pth"))
    if len(files) != 1:
        raise WeightsError(f"{path}: expected one consolidated.00.pth, found {len(files)} "
                           "(model-parallel Meta checkpoints are not supported)")
    params = json.loads((path / "params.json").read_text())
    state = torch.load(files[0], map_location="cpu", weights_only=True)  # its shapes fill the gaps of params.json
    for name in ("tok_embeddings.weight", "layers.0.feed_forward.w1.weight"):
        if name not in state:
            raise WeightsError(f"{files[0]}: no tensor {name!r}; is this a LLaMA checkpoint?")
    cfg = LMConfig(vocab_size=state["tok_embeddings.weight"].shape[0], dim=params["dim"], n_layers=params["n_layers"],
                   n_heads=params["n_heads"], n_kv_heads=params.get("n_kv_heads"),
                   ffn_dim=state["layers.0.feed_forward.w1.weight"].shape[0], max_seq_len=max_seq_len,
                   norm_eps=params["norm_eps"], rope_theta=params.get("rope_theta", 10000.0),
                   tie_embeddings=False)

    def convert(ours, tensor):
        if ours.endswith("q_proj.weight"):
            return meta_to_hf_qk(tensor, cfg.n_heads)
        if ours.endswith("k_proj.weight"):
            return meta_to_hf_qk(tensor, cfg.n_kv_heads)
        return tensor

    with torch.device("meta"):
        names = source_names(META_NAMES, Transformer(cfg))
    items = ((files[0], name, state.pop(name)) for name in list(state))
    return fill_model(cfg, items, names, dtype, device, convert)


# ----------------------------------------------------------------------------- saving

def save_pretrained(model, path, max_shard_bytes=5 * 2**30, bos_token_id=None, eos_token_id=None):
    """Write `model` as a Hugging Face LLaMA directory: config.json + model.safetensors
    (or model-0000i-of-0000n.safetensors + model.safetensors.index.json above max_shard_bytes)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_name = {ours: hf for hf, ours in source_names(HF_NAMES, model).items()}
    state = {hf_name[k]: v.detach().contiguous() for k, v in model.state_dict().items()}
    dtype = model.embed_tokens.weight.dtype
    config = config_to_hf(model.config, dtype, bos_token_id, eos_token_id)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    shards, size = [{}], 0  # greedy: start a new shard when the next tensor would overflow this one
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------- vocabulary

@torch.no_grad()
def expand_vocab(model, new_vocab_size):
    """Grow the embeddings (and an untied lm_head) to new_vocab_size rows, in place.

    New rows start at the mean of the existing rows, so new tokens begin as an "average token";
    old rows are untouched, so the logits of old tokens for old-token inputs do not change.
    """
    old = model.config.vocab_size
    if new_vocab_size < old:
        raise ValueError(f"expand_vocab: new size {new_vocab_size} is smaller than the current {old}")
    if new_vocab_size == old:
        return model

    def grown(weight):  # (old, dim) -> (new, dim)
        mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)  # (1, dim)
        rows = torch.cat([weight, mean.expand(new_vocab_size - old, -1)], dim=0)
        return nn.Parameter(rows, requires_grad=weight.requires_grad)

    model.embed_tokens.weight = grown(model.embed_tokens.weight)  # tied models: this is the lm_head too
    model.embed_tokens.num_embeddings = new_vocab_size
    if model.lm_head is not None:
        model.lm_head.weight = grown(model.lm_head.weight)
        model.lm_head.out_features = new_vocab_size
    model.config = replace(model.config, vocab_size=new_vocab_size)
    return model


@torch.no_grad()
def reinit_rows(model, token_ids, std=0.02, seed=0):
    """Fresh random embeddings (normal, the std of initialisation) for token_ids, in place.

    Text pretraining never shows the unit tokens, yet with tied embeddings it moves their rows: a
    token that is never the target is pushed away from every hidden state as output, so all the unit
    rows grow along the same direction (after the toy's stage 0 their mean cosine similarity is 0.94).
    As inputs they then look alike, and stage 2 must first pull them apart. Giving them new random
    rows before the speech stages removes that (docs/recipe.md).
    """
    ids = torch.as_tensor(sorted(token_ids), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    for weight in [model.embed_tokens.weight] + ([model.lm_head.weight] if model.lm_head is not None else []):
        fresh = torch.randn(len(ids), weight.shape[1], generator=generator) * std
        weight[ids.to(weight.device)] = fresh.to(weight.dtype).to(weight.device)
    return model
