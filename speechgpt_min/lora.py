"""LoRA: low-rank adapters on chosen linear layers (Hu et al. 2021), saved in PEFT's adapter layout.

SpeechGPT's stage 3 freezes the stage-2 model and trains, on q_proj and v_proj of every layer,
a rank-r update of the weight:

    y = x W^T + (alpha / r) * dropout(x) A^T B^T      A: (r, in), B: (out, r)

A starts kaiming-uniform and B at zero (as PEFT does), so training starts from the frozen model
exactly. Released values: r=8, alpha=16, dropout 0.05 on q_proj and v_proj (SpeechGPT-7B-com).

    cfg = LoRAConfig.from_preset("speechgpt")
    inject(model, cfg)                      # q_proj/v_proj -> LoRALinear; everything else frozen
    ... train ...
    save_adapter(model, "run/stage3", cfg)  # adapter_config.json + adapter_model.safetensors
    load_adapter(fresh_model, "SpeechGPT-7B-com")   # injects and fills from the PEFT files
    merge(model)                            # W += (alpha/r) B A: no extra cost at inference

Saved keys follow PEFT: prefix + module path + ".lora_A.weight". Our module paths lack Hugging
Face's leading "model." ("layers.0.self_attn.q_proj" is HF's "model.layers.0.self_attn.q_proj"),
so the default prefix is "base_model.model.model."; for a transformers LlamaForCausalLM, whose
paths already start with "model.", use prefix="base_model.model.".
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .presets import config_from_preset

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
DEFAULT_PREFIX = "base_model.model.model."


class LoRAError(ValueError):
    """An adapter that does not fit the model, or an unsupported adapter file: the message says which."""


# ----------------------------------------------------------------------------- config

@dataclass
class LoRAConfig:
    r: int = 8                                             # rank of the update
    alpha: float = 16                                      # the update is scaled by alpha / r
    dropout: float = 0.05                                  # on the LoRA branch's input, in training
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")  # module names (last path component)

    def __post_init__(self):
        self.target_modules = tuple(self.target_modules)
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("LoRA target_modules is empty: name at least one module, e.g. ('q_proj', 'v_proj')")

    @property
    def scaling(self):
        return self.alpha / self.r

    @classmethod
    def from_preset(cls, name, **overrides):
        """The named preset with any fields replaced, e.g. r=16 (presets.py)."""
        return config_from_preset(cls, LORA_PRESETS, name, overrides)


LORA_PRESETS = {
    # SpeechGPT-7B-com, stage 3 (chain-of-modality instruction tuning).
    "speechgpt": dict(r=8, alpha=16, dropout=0.05, target_modules=("q_proj", "v_proj")),
    # The toy LM (dim 256): a rank-8 update of two projections is too little room to learn the chain
    # (README, the toy run); every projection of attention and MLP at rank 32.
    "toy": dict(r=32, alpha=64, dropout=0.05,
                target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
}


# ----------------------------------------------------------------------------- the layer

class LoRALinear(nn.Module):
    """An nn.Linear with a frozen weight plus a trainable low-rank update.

    It keeps the wrapped layer's `weight` (and `bias`) under the same names, so the base model's
    state_dict keys do not change; the adapter adds `lora_A.weight` (r, in) and `lora_B.weight` (out, r).
    x (..., in) -> (..., out).
    """

    def __init__(self, base, r, alpha, dropout):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout)
        self.r, self.scaling = r, alpha / r
        self.merged = False
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init (nn.Linear's default)
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self):
        """The update as a full matrix: (alpha / r) * B @ A, shape (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        if self.merged:  # the update is already inside self.weight
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling}, merged={self.merged}"


# ----------------------------------------------------------------------------- whole models

def lora_layers(model):
    """{module path: LoRALinear} of a model, e.g. {"layers.0.self_attn.q_proj": ...}."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _is_target(name, targets):
    """PEFT's rule for a list of names: the path is the name, or ends with "." + name."""
    return any(name == t or name.endswith("." + t) for t in targets)


def inject(model, config):
    """Replace every nn.Linear whose name is in config.target_modules by a LoRALinear, in place,
    then leave only the LoRA parameters trainable. Returns the model."""
    if lora_layers(model):
        raise LoRAError("the model already has LoRA layers; inject into a fresh model")
    targets = [(name, m) for name, m in model.named_modules() if _is_target(name, config.target_modules)]
    if not targets:
        raise LoRAError(f"no module named {list(config.target_modules)} in the model")
    for name, module in targets:
        if not isinstance(module, nn.Linear):
            raise LoRAError(f"LoRA target {name} is a {type(module).__name__}; only nn.Linear is supported")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRALinear(module, config.r, config.alpha, config.dropout)
        setattr(parent, child, layer.train(module.training))  # keep eval mode (no dropout) if set
    mark_only_lora_trainable(model)
    return model


def mark_only_lora_trainable(model):
    """requires_grad only for lora_A / lora_B weights (PEFT's bias="none")."""
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)


def lora_state_dict(model):
    """Only the adapter: {"layers.0.self_attn.q_proj.lora_A.weight": (r, in) tensor, ...}."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def merge(model):
    """Fold every LoRA update into its weight (faster inference; unmerge() undoes it)."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge(model):
    for layer in lora_layers(model).values():
        layer.unmerge()


def merge_and_unload(model):
    """Merge, then put plain nn.Linear layers back: the model's structure and keys are the base's again."""
    for name, layer in lora_layers(model).items():
        layer.merge()
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight, linear.bias = layer.weight, layer.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return model


# ----------------------------------------------------------------------------- PEFT files

def save_adapter(model, directory, config, prefix=DEFAULT_PREFIX, base_model_name_or_path=None, safetensors=True):
    """Write adapter_config.json and adapter_model.safetensors (or .bin) as PEFT does.

    Keys: prefix + module path + ".lora_A.weight" / ".lora_B.weight".
    """
    layers = lora_layers(model)
    if not layers:
        raise LoRAError("the model has no LoRA layers to save")
    for name, layer in layers.items():
        if layer.r != config.r or not math.isclose(layer.scaling, config.scaling):
            raise LoRAError(f"{name} has r={layer.r}, scaling {layer.scaling}, but the config says "
                            f"r={config.r}, scaling {config.scaling}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": list(config.target_modules), "bias": "none", "fan_in_fan_out": False,
        "modules_to_save": None, "inference_mode": True,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
    tensors = {prefix + k: v.detach().cpu().contiguous() for k, v in lora_state_dict(model).items()}
    if safetensors:
        save_file(tensors, str(directory / SAFETENSORS_FILE), metadata={"format": "pt"})
    else:
        torch.save(tensors, directory / BIN_FILE)


def read_adapter_config(directory):
    """adapter_config.json -> LoRAConfig, refusing the PEFT options this module does not implement."""
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise LoRAError(f"{directory}: no {CONFIG_FILE}")
    raw = json.loads(path.read_text())
    if raw.get("peft_type") != "LORA":
        raise LoRAError(f"{path}: peft_type is {raw.get('peft_type')!r}, only 'LORA' is supported")
    if raw.get("bias", "none") != "none":
        raise LoRAError(f"{path}: bias={raw['bias']!r} is not supported (only 'none')")
    for key in ("fan_in_fan_out", "use_dora", "use_rslora", "lora_bias", "modules_to_save", "layers_to_transform",
                "exclude_modules", "rank_pattern", "alpha_pattern", "trainable_token_indices", "target_parameters"):
        if raw.get(key):  # False, None, [] and {} mean the option is off
            raise LoRAError(f"{path}: {key}={raw[key]!r} is not supported")
    targets = raw.get("target_modules")
    if not isinstance(targets, list):
        raise LoRAError(f"{path}: target_modules must be a list of module names, got {targets!r}")
    return LoRAConfig(r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0),
                      target_modules=tuple(targets))


def read_adapter_tensors(directory):
    directory = Path(directory)
    if (directory / SAFETENSORS_FILE).exists():
        return load_file(str(directory / SAFETENSORS_FILE))
    if (directory / BIN_FILE).exists():
        return torch.load(directory / BIN_FILE, map_location="cpu", weights_only=True)
    raise LoRAError(f"{directory}: no adapter weights ({SAFETENSORS_FILE} or {BIN_FILE})")


def load_adapter(model, directory, prefix=DEFAULT_PREFIX):
    """Load a PEFT LoRA adapter into `model` (injecting the LoRA layers first if it has none).

    Every tensor in the file must land on a LoRA parameter of the same shape, and every LoRA
    parameter must be filled; keys with PEFT's adapter name (".lora_A.default.weight") are accepted.
    Returns the adapter's LoRAConfig.
    """
    config = read_adapter_config(directory)
    if not lora_layers(model):
        inject(model, config)
    for name, layer in lora_layers(model).items():
        if layer.merged:
            raise LoRAError(f"{name} is merged; unmerge(model) before loading another adapter")
        if layer.r != config.r or not math.isclose(layer.scaling, config.scaling):
            raise LoRAError(f"{name} has r={layer.r}, scaling {layer.scaling}; the adapter has r={config.r}, "
                            f"scaling {config.scaling}")
    params = {k: p for k, p in model.named_parameters() if ".lora_A." in k or ".lora_B." in k}
    filled = set()
    for key, tensor in read_adapter_tensors(directory).items():
        if not key.startswith(prefix):
            raise LoRAError(f"adapter tensor {key}: expected the key prefix {prefix!r} (pass prefix=...)")
        name = key[len(prefix):].replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        if name not in params:
            raise LoRAError(f"adapter tensor {key}: the model has no LoRA parameter {name}")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise LoRAError(f"adapter tensor {key}: shape {tuple(tensor.shape)}, the model's {name} "
                            f"is {tuple(params[name].shape)}")
        with torch.no_grad():
            params[name].copy_(tensor)
        filled.add(name)
    missing = sorted(set(params) - filled)
    if missing:
        raise LoRAError(f"{directory}: the adapter has no tensor for {len(missing)} LoRA parameters, "
                        f"e.g. {missing[:3]}")
    return config
