"""HuBERT: a speech encoder that turns 16 kHz audio into 50 Hz frame features (Hsu et al., 2021).

    wav (B, T) ──conv feature extractor──> (B, T', 512)       T' = frames at 50 Hz (320x fewer)
        ──feature projection──> (B, T', D) ──+ conv positional embedding, LayerNorm──> layer 0
        ──transformer layers 1..L (post-LN)──> layer L

SpeechGPT reads layer 11 of mHuBERT (the HuBERT-base architecture) and quantises it with k-means
(units.py). Pretraining is masked prediction: hide ~50% of the frames behind a learned mask
embedding and predict, at each hidden frame, the cluster id of a k-means "teacher". Iteration 1
clusters MFCCs; iteration 2 clusters an iteration-1 layer. This file holds the encoder and the
parameters of its pretraining head; the loss and the loop are in hubert_training.py.

Module and tensor names follow transformers' `HubertModel`, so its weights load through a short,
checked table (`from_pretrained`). Layer numbering is HF's `hidden_states`: layer 0 is the input
to the first transformer layer, layer l the output of layer l.
"""
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .device import resolve_device
from .presets import config_from_preset

FORMAT = "speechgpt_min.hubert"


@dataclass
class HubertConfig:
    # conv feature extractor: 7 layers, strides multiply to 320 -> 50 Hz at 16 kHz
    conv_dim: tuple = (512,) * 7
    conv_kernel: tuple = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    # transformer encoder
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    num_conv_pos_embeddings: int = 128  # kernel of the positional conv
    num_conv_pos_embedding_groups: int = 16
    layer_norm_eps: float = 1e-5
    dropout: float = 0.1  # on residual branches, FFN output and projected features
    attention_dropout: float = 0.1
    # masked-prediction pretraining head (num_clusters=0: an inference-only encoder, as imported)
    num_clusters: int = 0
    final_dim: int = 256
    logit_temperature: float = 0.1
    mask_start_prob: float = 0.08  # share of frames that start a masked span (~50% masked in all)
    mask_length: int = 10
    unmasked_weight: float = 0.0  # loss weight of unmasked frames (the paper's alpha=1 ignores them)
    feature_grad_mult: float = 0.1  # scale the conv extractor's gradient, as in HuBERT-base

    def __post_init__(self):
        self.conv_dim, self.conv_kernel, self.conv_stride = (tuple(x) for x in
                                                             (self.conv_dim, self.conv_kernel, self.conv_stride))
        if not len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride):
            raise ValueError("conv_dim, conv_kernel and conv_stride need one entry per conv layer")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        self.head_dim = self.hidden_size // self.num_attention_heads

    @property
    def downsampling(self):
        return math.prod(self.conv_stride)  # 320 samples per frame

    @classmethod
    def from_preset(cls, name, **overrides):
        """The named preset with any fields replaced, e.g. num_clusters=100 (presets.py)."""
        return config_from_preset(cls, PRESETS, name, overrides)


PRESETS = {
    # pretrains on tiny_data in a few minutes on 2 CPU cores; the same 320x strides (50 Hz)
    "toy": dict(conv_dim=(64,) * 7, hidden_size=192, num_hidden_layers=4, num_attention_heads=4,
                intermediate_size=768, num_conv_pos_embeddings=32, num_conv_pos_embedding_groups=8,
                num_clusters=100, final_dim=64, dropout=0.05, attention_dropout=0.05,
                unmasked_weight=1.0, feature_grad_mult=1.0,  # faster start on a few hundred steps
                mask_start_prob=0.02),  # a fifth masked, not half: better units in short runs (README)
    # HuBERT-base / mHuBERT (SpeechGPT's unit encoder); K=500 as in HuBERT's second iteration
    "hubert-base": dict(num_clusters=500),
}


# ----------------------------------------------------------------------------- architecture

def frame_lengths(config, sample_lengths):
    """Frames the conv extractor makes from each input: floor((L - kernel) / stride) + 1 per layer.
    (B,) samples -> (B,) frames; 16000 samples -> 49 frames."""
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        sample_lengths = torch.div(sample_lengths - kernel, stride, rounding_mode="floor") + 1
    return sample_lengths


def receptive_field(config):
    """Samples one frame sees: 400 for HuBERT's convs (25 ms), so n frames need (n - 1) * 320 + 400."""
    return 1 + sum((k - 1) * math.prod(config.conv_stride[:i]) for i, k in enumerate(config.conv_kernel))


def padding_mask(lengths, max_length):
    """(B,) lengths -> (B, max_length) bool, True at padded positions."""
    return torch.arange(max_length, device=lengths.device)[None, :] >= lengths[:, None]


class ConvLayer(nn.Module):
    """Conv1d (no bias) -> [per-channel GroupNorm on the first layer only] -> GELU."""

    def __init__(self, in_dim, out_dim, kernel, stride, bias, group_norm):
        super().__init__()
        self.conv = nn.Conv1d(in_dim, out_dim, kernel, stride=stride, bias=bias)
        self.layer_norm = nn.GroupNorm(out_dim, out_dim) if group_norm else None  # HF name

    def forward(self, x, pad_mask=None):
        """x (B, C_in, T) -> (B, C_out, T'); pad_mask (B, T') True at padding, so the group norm
        statistics of each utterance ignore its padding (each gives what it gives alone)."""
        x = self.conv(x)
        if self.layer_norm is not None:
            if pad_mask is None:
                x = self.layer_norm(x)
            else:
                valid = (~pad_mask)[:, None, :].to(x.dtype)  # (B, 1, T')
                count = valid.sum(-1, keepdim=True)
                mean = (x * valid).sum(-1, keepdim=True) / count  # (B, C, 1)
                var = ((x - mean) ** 2 * valid).sum(-1, keepdim=True) / count
                x = (x - mean) / torch.sqrt(var + self.layer_norm.eps)
                x = x * self.layer_norm.weight[:, None] + self.layer_norm.bias[:, None]
        return F.gelu(x)


class FeatureExtractor(nn.Module):
    """Seven strided convs: (B, T) samples -> (B, C, T') frames at 50 Hz."""

    def __init__(self, config):
        super().__init__()
        dims = (1,) + config.conv_dim
        self.conv_layers = nn.ModuleList(
            ConvLayer(dims[i], dims[i + 1], config.conv_kernel[i], config.conv_stride[i], config.conv_bias, i == 0)
            for i in range(len(config.conv_dim)))
        self.config = config

    def forward(self, wav, sample_lengths=None):
        x = wav[:, None, :]  # (B, 1, T)
        lengths = sample_lengths
        for i, layer in enumerate(self.conv_layers):
            mask = None
            if i == 0 and sample_lengths is not None:  # only the first layer normalises over time
                conv = layer.conv
                lengths = torch.div(sample_lengths - conv.kernel_size[0], conv.stride[0], rounding_mode="floor") + 1
                mask = padding_mask(lengths, (x.shape[-1] - conv.kernel_size[0]) // conv.stride[0] + 1)
            x = layer(x, mask)
        return x  # (B, C, T')


class FeatureProjection(nn.Module):
    """LayerNorm + Linear + dropout: conv channels -> model width. (B, T', C) -> (B, T', D)."""

    def __init__(self, config):
        super().__init__()
        self.layer_norm = nn.LayerNorm(config.conv_dim[-1], eps=config.layer_norm_eps)
        self.projection = nn.Linear(config.conv_dim[-1], config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.projection(self.layer_norm(x)))


class PositionalConvEmbedding(nn.Module):
    """Relative position from a wide grouped conv over time, weight-normalised over the kernel axis:
    weight = g * v / ||v||, the norm taken per kernel tap (dim=2). An even kernel gives one frame
    too many, trimmed at the end ("SamePad"). (B, T', D) -> (B, T', D)."""

    def __init__(self, config):
        super().__init__()
        d, k, groups = config.hidden_size, config.num_conv_pos_embeddings, config.num_conv_pos_embedding_groups
        self.weight_g = nn.Parameter(torch.ones(1, 1, k))
        self.weight_v = nn.Parameter(torch.randn(d, d // groups, k) * math.sqrt(2.0 / (k * d // groups)))
        self.bias = nn.Parameter(torch.zeros(d))
        self.groups, self.trim = groups, 1 if k % 2 == 0 else 0

    def forward(self, x):
        weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=(0, 1), keepdim=True))
        y = F.conv1d(x.transpose(1, 2), weight, self.bias, padding=weight.shape[-1] // 2, groups=self.groups)
        y = y[:, :, :y.shape[-1] - self.trim]  # (B, D, T')
        return F.gelu(y).transpose(1, 2)


class Attention(nn.Module):
    """Bidirectional multi-head self-attention with a key padding mask. (B, T, D) -> (B, T, D)."""

    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.n_head, self.head_dim, self.dropout = config.num_attention_heads, config.head_dim, config.attention_dropout

    def forward(self, x, attn_mask=None):
        B, T, D = x.shape
        q, k, v = (proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class FeedForward(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.intermediate_dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.output_dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.output_dense(F.gelu(self.intermediate_dense(x))))


class EncoderLayer(nn.Module):
    """Post-LN transformer layer (HuBERT-base): x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, config):
        super().__init__()
        self.attention = Attention(config)
        self.dropout = nn.Dropout(config.dropout)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = FeedForward(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x, attn_mask=None):
        x = self.layer_norm(x + self.dropout(self.attention(x, attn_mask)))
        return self.final_layer_norm(x + self.feed_forward(x))


class Encoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.pos_conv_embed = PositionalConvEmbedding(config)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x, pad_mask=None, num_layers=None):
        """x (B, T', D), pad_mask (B, T') True at padding -> list of (B, T', D): layers 0..num_layers."""
        attn_mask = None
        if pad_mask is not None:
            x = x.masked_fill(pad_mask[:, :, None], 0.0)  # padding must not leak through the pos conv
            attn_mask = ~pad_mask[:, None, None, :]  # (B, 1, 1, T'): attend to real frames only
        x = self.dropout(self.layer_norm(x + self.pos_conv_embed(x)))
        hidden = [x]
        for layer in self.layers[:num_layers]:
            hidden.append(layer(hidden[-1], attn_mask))
        return hidden


class HuBERT(nn.Module):
    """The HuBERT encoder, plus the masked-prediction head when `config.num_clusters > 0`."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.feature_extractor = FeatureExtractor(config)
        self.feature_projection = FeatureProjection(config)
        self.encoder = Encoder(config)
        if config.num_clusters > 0:
            self.masked_spec_embed = nn.Parameter(torch.rand(config.hidden_size))  # HF name
            self.final_proj = nn.Linear(config.hidden_size, config.final_dim)
            self.label_embeddings = nn.Parameter(torch.randn(config.num_clusters, config.final_dim))

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, wav, sample_lengths=None, num_layers=None, mask=None):
        """wav (B, T) float at 16 kHz, zero-padded; sample_lengths (B,) real lengths (None: all T).
        mask (B, T') bool: frames to replace by the mask embedding (pretraining).
        Returns (hidden: list of (B, T', D) for layers 0..num_layers, pad_mask (B, T') or None)."""
        full = sample_lengths is None or bool((sample_lengths == wav.shape[1]).all())
        sample_lengths = None if full else sample_lengths  # no padding: skip the masks (faster attention)
        x = self.feature_extractor(wav, sample_lengths)  # (B, C, T')
        if self.training and self.config.feature_grad_mult != 1.0:  # scale only the gradient
            g = self.config.feature_grad_mult
            x = x * g + x.detach() * (1.0 - g)
        x = self.feature_projection(x.transpose(1, 2))  # (B, T', D)
        pad_mask = None
        if sample_lengths is not None:
            pad_mask = padding_mask(frame_lengths(self.config, sample_lengths), x.shape[1])
        if mask is not None:
            x = torch.where(mask[:, :, None], self.masked_spec_embed.to(x.dtype), x)
        return self.encoder(x, pad_mask, num_layers), pad_mask

    def features(self, wav, layer, sample_lengths=None):
        """Frame features at `layer` (0..num_hidden_layers), running only the layers needed.
        wav (B, T) -> (features (B, T', D), frame lengths (B,))."""
        if not 0 <= layer <= self.config.num_hidden_layers:
            raise ValueError(f"layer {layer} is out of range 0..{self.config.num_hidden_layers}")
        hidden, _ = self.forward(wav, sample_lengths, num_layers=layer)
        if sample_lengths is None:
            sample_lengths = torch.full((wav.shape[0],), wav.shape[1], device=wav.device)
        return hidden[layer], frame_lengths(self.config, sample_lengths)

    # ------------------------------------------------------------------------- checkpoints

    def save_pretrained(self, directory):
        """Write config.json + model.safetensors (our format; `from_pretrained` reads it back)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"format": FORMAT, **asdict(self.config)}
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()},
                  str(directory / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, directory):
        """Load our own checkpoint or a transformers `HubertModel` directory (HuBERT, mHuBERT)."""
        directory = Path(directory)
        for name in ("config.json", "model.safetensors"):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory}: no {name} (expected a HuBERT checkpoint directory)")
        raw = json.loads((directory / "config.json").read_text())
        tensors = load_file(str(directory / "model.safetensors"))
        if raw.get("format") == FORMAT:
            raw.pop("format")
            model = cls(HubertConfig(**raw))
            model.load_state_dict(tensors, strict=True)
        else:
            config = config_from_hf(raw, directory)
            model = cls(config)
            model.load_state_dict(convert_hf_state_dict(tensors, config), strict=True)
        return model.eval()


def config_from_hf(hf, directory="config"):
    """transformers HubertConfig dict -> HubertConfig (inference only: no pretraining head)."""
    if hf.get("model_type") != "hubert":
        raise ValueError(f"{directory}: model_type {hf.get('model_type')!r} is not 'hubert'")
    unsupported = {"feat_extract_norm": "group", "do_stable_layer_norm": False, "feat_proj_layer_norm": True,
                   "conv_pos_batch_norm": False, "hidden_act": "gelu", "feat_extract_activation": "gelu"}
    for key, supported in unsupported.items():
        if hf.get(key, supported) != supported:
            raise ValueError(f"{directory}: {key}={hf[key]!r} is not supported (this encoder implements "
                             f"the HuBERT-base layout, {key}={supported!r})")
    keys = ("conv_dim", "conv_kernel", "conv_stride", "conv_bias", "hidden_size", "num_hidden_layers",
            "num_attention_heads", "intermediate_size", "num_conv_pos_embeddings",
            "num_conv_pos_embedding_groups", "layer_norm_eps")
    return HubertConfig(**{k: hf[k] for k in keys if k in hf}, num_clusters=0)


# HF name -> our name; `{i}` is a layer index. Every other tensor keeps its name.
HF_RENAMES = {
    "encoder.pos_conv_embed.conv.parametrizations.weight.original0": "encoder.pos_conv_embed.weight_g",
    "encoder.pos_conv_embed.conv.parametrizations.weight.original1": "encoder.pos_conv_embed.weight_v",
    "encoder.pos_conv_embed.conv.weight_g": "encoder.pos_conv_embed.weight_g",  # weight_norm before torch 2.1
    "encoder.pos_conv_embed.conv.weight_v": "encoder.pos_conv_embed.weight_v",
    "encoder.pos_conv_embed.conv.bias": "encoder.pos_conv_embed.bias",
}
HF_SKIP = {"masked_spec_embed"}  # the training-time mask vector of SpecAugment; unused at inference


def convert_hf_state_dict(tensors, config):
    """HF HubertModel tensors -> our state dict: every tensor consumed, every shape checked."""
    expected = {k: v.shape for k, v in HuBERT(config).state_dict().items()}
    out = {}
    for name, tensor in tensors.items():
        name_ = name.removeprefix("hubert.")  # HubertForCTC and friends nest the encoder
        if name_ in HF_SKIP:
            continue
        ours = HF_RENAMES.get(name_, name_)
        if ours not in expected:
            raise KeyError(f"unexpected tensor {name!r} in the HuBERT checkpoint")
        if ours in out:
            raise KeyError(f"tensor {ours!r} given twice (both weight-norm layouts in one file?)")
        if tuple(tensor.shape) != tuple(expected[ours]):
            raise ValueError(f"tensor {name!r}: shape {tuple(tensor.shape)}, expected {tuple(expected[ours])}")
        out[ours] = tensor.float()
    missing = sorted(set(expected) - set(out))
    if missing:
        raise KeyError(f"the HuBERT checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return out


# ----------------------------------------------------------------------------- batches of audio

def pad_batch(wavs):
    """list of (T_i,) -> (padded (B, T_max), lengths (B,))."""
    lengths = torch.tensor([len(w) for w in wavs])
    return torch.nn.utils.rnn.pad_sequence(list(wavs), batch_first=True), lengths


@torch.inference_mode()
def extract_features(model, wavs, layer, batch_size=8, progress=False, device=None):
    """Layer features of each waveform, batched (sorted by length to limit padding).
    wavs: list of (T_i,) -> list of (T_i', D) float tensors on the CPU, in the input order.
    device: where the model runs ("cpu", "cuda", ...; the model is moved there); None: where it is."""
    if device is not None:
        model.to(resolve_device(device))
    device = next(model.parameters()).device
    model.eval()
    order = sorted(range(len(wavs)), key=lambda i: len(wavs[i]))
    out = [None] * len(wavs)
    for start in tqdm(range(0, len(order), batch_size), desc=f"HuBERT layer {layer}", disable=not progress):
        idx = order[start: start + batch_size]
        wav, lengths = pad_batch([wavs[i] for i in idx])  # (B, T_max), (B,)
        feats, n_frames = model.features(wav.to(device), layer, lengths.to(device))  # (B, T', D), (B,)
        for j, i in enumerate(idx):
            out[i] = feats[j, : n_frames[j]].to("cpu", copy=True)  # its own copy, not a view of the batch
    return out
