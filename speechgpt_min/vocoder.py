"""The unit vocoder: HiFi-GAN with a duration predictor, speech units -> 16 kHz speech.

SpeechGPT speaks through a "unit HiFi-GAN" (Kong et al. 2020, HiFi-GAN; Polyak et al. 2021,
speech resynthesis from discrete units). Each unit id is embedded, a small duration predictor says
how many 50 Hz frames each (deduplicated) unit lasts, the embeddings are repeated that many times,
and a HiFi-GAN generator upsamples 320x (one frame = 320 samples = 20 ms) to a waveform.

    vocoder = UnitVocoder.from_pretrained("g_00500000")   # released checkpoint + config.json beside it
    wav = vocoder(units)                                  # units (B, N) long -> (B, samples) at 16 kHz
    wav = vocoder(units, durations)                       # durations (B, N) frames, e.g. from units.py

State-dict keys follow the released checkpoint exactly (weight norm as weight_g/weight_v).
Training, with HiFi-GAN's discriminators and losses, is in vocoder_training.py.
"""
import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from .presets import config_from_preset

LRELU_SLOPE = 0.1

# ----------------------------------------------------------------------------- config


@dataclasses.dataclass
class VocoderConfig:
    num_embeddings: int = 100                 # K, the unit vocabulary
    embedding_dim: int = 64                   # unit embedding = generator input channels
    upsample_initial_channel: int = 128       # channels after conv_pre; halved by each upsampling
    upsample_rates: tuple = (5, 4, 4, 2, 2)   # product = code_hop_size
    upsample_kernel_sizes: tuple = (11, 8, 8, 4, 4)
    resblock_kernel_sizes: tuple = (3, 7, 11)
    resblock_dilation_sizes: tuple = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    dur_hidden_dim: int = 64                  # duration predictor width
    dur_kernel_size: int = 3
    dur_dropout: float = 0.5
    code_hop_size: int = 320                  # samples per unit frame (50 Hz at 16 kHz)
    sampling_rate: int = 16000
    discriminator_channels: int = 128         # widest discriminator conv (HiFi-GAN: 1024); training only

    def __post_init__(self):
        self.upsample_rates = tuple(self.upsample_rates)
        self.upsample_kernel_sizes = tuple(self.upsample_kernel_sizes)
        self.resblock_kernel_sizes = tuple(self.resblock_kernel_sizes)
        self.resblock_dilation_sizes = tuple(tuple(d) for d in self.resblock_dilation_sizes)
        if math.prod(self.upsample_rates) != self.code_hop_size:
            raise ValueError(f"upsample_rates {self.upsample_rates} multiply to {math.prod(self.upsample_rates)}, "
                             f"not the hop of {self.code_hop_size} samples per unit frame")
        if self.discriminator_channels % 128:
            raise ValueError(f"discriminator_channels must be a multiple of 128 (grouped convs), "
                             f"got {self.discriminator_channels}")

    @classmethod
    def from_preset(cls, name, **overrides):
        """The named preset with any fields replaced, e.g. num_embeddings=100 (presets.py)."""
        return config_from_preset(cls, PRESETS, name, overrides)

    def to_dict(self):
        """The released config.json format (fairseq CodeHiFiGAN), plus our discriminator width."""
        return {"resblock": "1", "upsample_rates": list(self.upsample_rates),
                "upsample_kernel_sizes": list(self.upsample_kernel_sizes),
                "upsample_initial_channel": self.upsample_initial_channel,
                "resblock_kernel_sizes": list(self.resblock_kernel_sizes),
                "resblock_dilation_sizes": [list(d) for d in self.resblock_dilation_sizes],
                "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "model_in_dim": self.embedding_dim, "code_hop_size": self.code_hop_size,
                "sampling_rate": self.sampling_rate, "dur_prediction_weight": 1.0,
                "dur_predictor_params": {"encoder_embed_dim": self.embedding_dim,
                                         "var_pred_hidden_dim": self.dur_hidden_dim,
                                         "var_pred_kernel_size": self.dur_kernel_size,
                                         "var_pred_dropout": self.dur_dropout},
                "discriminator_channels": self.discriminator_channels}

    @classmethod
    def from_dict(cls, d):
        """Read a config.json (ours or a released one). Released files also carry training settings
        (batch_size, learning_rate, segment_size, num_mels, ...): those do not shape the model and
        are ignored. Features this vocoder does not implement are refused."""
        for feature in ("f0", "multispkr"):
            if d.get(feature):
                raise ValueError(f"vocoder config enables {feature!r}, which this vocoder does not implement")
        if str(d.get("resblock", "1")) != "1":
            raise ValueError(f"only resblock '1' (ResBlock1) is implemented, config has {d['resblock']!r}")
        dur = d.get("dur_predictor_params")
        if dur is None:
            raise ValueError("vocoder config has no 'dur_predictor_params': a unit vocoder needs a duration predictor")
        for key in ("model_in_dim", "encoder_embed_dim"):
            value = d.get(key, dur.get(key, d["embedding_dim"]))
            if value != d["embedding_dim"]:
                raise ValueError(f"config {key}={value} differs from embedding_dim={d['embedding_dim']}")
        return cls(num_embeddings=d["num_embeddings"], embedding_dim=d["embedding_dim"],
                   upsample_initial_channel=d["upsample_initial_channel"], upsample_rates=d["upsample_rates"],
                   upsample_kernel_sizes=d["upsample_kernel_sizes"], resblock_kernel_sizes=d["resblock_kernel_sizes"],
                   resblock_dilation_sizes=d["resblock_dilation_sizes"], dur_hidden_dim=dur["var_pred_hidden_dim"],
                   dur_kernel_size=dur["var_pred_kernel_size"], dur_dropout=dur["var_pred_dropout"],
                   code_hop_size=d.get("code_hop_size", 320), sampling_rate=d.get("sampling_rate", 16000),
                   discriminator_channels=d.get("discriminator_channels", 1024))


PRESETS = {
    # ~0.5M generator parameters: trains in minutes on 2 CPU cores. Two multi-receptive-field kernels
    # (3, 7) instead of HiFi-GAN's three: 600 steps cost what 400 did and reach a lower mel loss
    # (scripts/vocoder_schedules.py).
    "toy": dict(resblock_kernel_sizes=(3, 7), resblock_dilation_sizes=((1, 3, 5), (1, 3, 5))),
    # The released SpeechGPT vocoder (mHuBERT layer 11, K=1000): 13,485,443 parameters.
    "unit-hifigan-km1000": dict(num_embeddings=1000, embedding_dim=128, upsample_initial_channel=512,
                                dur_hidden_dim=128, discriminator_channels=1024),
}

# ----------------------------------------------------------------------------- inputs


class VocoderInputError(ValueError):
    """Units or durations a vocoder cannot speak; the message names the problem."""


def check_units(units, num_embeddings):
    """Refuse what no vocoder can speak, before any layer sees it: units must be a non-empty
    (batch, units) torch.long tensor of ids in [0, num_embeddings)."""
    if not torch.is_tensor(units) or units.dtype != torch.long:
        raise TypeError(f"units must be a torch.long tensor shaped (batch, units), got "
                        f"{units.dtype if torch.is_tensor(units) else type(units).__name__}")
    if units.dim() != 2 or units.numel() == 0:
        raise VocoderInputError(f"units must be a non-empty (batch, units) tensor, got shape {tuple(units.shape)}")
    if units.min() < 0 or units.max() >= num_embeddings:
        raise VocoderInputError(f"unit ids must be in [0, {num_embeddings}), got values from "
                                f"{units.min().item()} to {units.max().item()}")


def check_durations(units, durations):
    """Durations must be integer frame counts, one per unit (shaped like units), each at least 1."""
    if not torch.is_tensor(durations) or durations.dtype.is_floating_point or durations.dtype == torch.bool:
        raise VocoderInputError(f"durations must be an integer tensor of frame counts, got "
                                f"{durations.dtype if torch.is_tensor(durations) else type(durations).__name__}")
    if durations.shape != units.shape:
        raise VocoderInputError(f"durations must give one frame count per unit: units are shaped "
                                f"{tuple(units.shape)}, durations {tuple(durations.shape)}")
    if (durations < 1).any():
        raise VocoderInputError(f"durations must be at least 1 frame each, got a minimum of {durations.min().item()}")

# ----------------------------------------------------------------------------- generator


def time_major(x):
    """Same (B, C, T) values, stored time-major (strides (C * T, 1, C)). oneDNN's direct convolution
    kernels take this layout and run the generator's few-channel, long convs 2-5x faster than the
    default channel-major one (im2col + GEMM); conv outputs and elementwise ops keep it."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _init_conv(conv):
    """HiFi-GAN's init (normal, std 0.01) under weight norm."""
    nn.init.normal_(conv.weight, 0.0, 0.01)
    return weight_norm(conv)


class DurationPredictor(nn.Module):
    """Predicts log(duration + 1) per unit: two conv+ReLU -> LayerNorm -> dropout layers, then a linear."""

    def __init__(self, dim, hidden, kernel, dropout):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv1d(dim, hidden, kernel, padding=(kernel - 1) // 2), nn.ReLU())
        self.ln1 = nn.LayerNorm(hidden)
        self.conv2 = nn.Sequential(nn.Conv1d(hidden, hidden, kernel, padding=(kernel - 1) // 2), nn.ReLU())
        self.ln2 = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, 1)
        self.dropout = dropout

    def forward(self, x):  # x (B, N, C) -> (B, N)
        x = self.conv1(x.transpose(1, 2)).transpose(1, 2)  # (B, N, hidden)
        x = F.dropout(self.ln1(x), self.dropout, self.training)
        x = self.conv2(x.transpose(1, 2)).transpose(1, 2)
        x = F.dropout(self.ln2(x), self.dropout, self.training)
        return self.proj(x).squeeze(2)


class ResBlock1(nn.Module):
    """Three (dilated conv, conv) pairs, each with a residual connection; length-preserving."""

    def __init__(self, channels, kernel_size, dilations):
        super().__init__()
        self.convs1 = nn.ModuleList(_init_conv(nn.Conv1d(channels, channels, kernel_size, dilation=d,
                                                         padding=(kernel_size * d - d) // 2)) for d in dilations)
        self.convs2 = nn.ModuleList(_init_conv(nn.Conv1d(channels, channels, kernel_size,
                                                         padding=(kernel_size - 1) // 2)) for _ in dilations)

    def forward(self, x):  # (B, C, T) -> (B, C, T)
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x


class UnitVocoder(nn.Module):
    """Unit embedding (`dict`) + duration predictor + HiFi-GAN generator (fairseq's CodeGenerator layout)."""

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.dict = nn.Embedding(c.num_embeddings, c.embedding_dim)
        self.dur_predictor = DurationPredictor(c.embedding_dim, c.dur_hidden_dim, c.dur_kernel_size, c.dur_dropout)
        self.conv_pre = weight_norm(nn.Conv1d(c.embedding_dim, c.upsample_initial_channel, 7, padding=3))
        channels = [c.upsample_initial_channel // 2 ** i for i in range(len(c.upsample_rates) + 1)]
        self.ups = nn.ModuleList(_init_conv(nn.ConvTranspose1d(channels[i], channels[i + 1], k, u, padding=(k - u) // 2))
                                 for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes)))
        self.resblocks = nn.ModuleList(ResBlock1(ch, k, d) for ch in channels[1:]
                                       for k, d in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes))
        self.conv_post = _init_conv(nn.Conv1d(channels[-1], 1, 7, padding=3))

    def decode(self, x):
        """Frame embeddings (B, embedding_dim, T) -> waveform (B, T * 320)."""
        x = self.conv_pre(time_major(x))  # (B, C0, T)
        n = len(self.config.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))  # (B, C0 / 2^(i+1), T * prod(rates[:i+1]))
            x = sum(block(x) for block in self.resblocks[i * n:(i + 1) * n]) / n  # multi-receptive-field fusion
        x = self.conv_post(F.leaky_relu(x))  # default slope 0.01, as released; (B, 1, T * 320)
        return torch.tanh(x).squeeze(1)

    def predict_durations(self, units):
        """Units (B, N) long -> frames per unit (B, N) long, each >= 1. Expects deduplicated units."""
        check_units(units, self.config.num_embeddings)
        log_dur = self.dur_predictor(self.dict(units))  # (B, N), log(d + 1)
        return torch.clamp(torch.round(torch.exp(log_dur) - 1).long(), min=1)

    def forward(self, units, durations=None):
        """Units (B, N) long -> waveform (B, samples) float at 16 kHz.

        durations: (B, N) frame counts (each >= 1), or None to predict them. Item b lasts durations[b].sum() * 320
        samples; shorter items are zero-padded at the end to the longest.
        """
        check_units(units, self.config.num_embeddings)
        if durations is None:
            durations = self.predict_durations(units)
        else:
            check_durations(units, durations)
        frames = [torch.repeat_interleave(u, d) for u, d in zip(units, durations)]  # B x (T_b,)
        if len({len(f) for f in frames}) == 1:  # equal lengths: one batched pass
            return self.decode(self.dict(torch.stack(frames)).transpose(1, 2))
        wavs = [self.decode(self.dict(f[None]).transpose(1, 2))[0] for f in frames]  # separately: no padding artefacts
        return nn.utils.rnn.pad_sequence(wavs, batch_first=True)

    # ------------------------------------------------------------------------- weights

    def remove_weight_norm(self):
        """Fold weight norm into plain weights (w = g * v / ||v||) for faster inference, stored
        time-major like the activations (`time_major`)."""
        for module in self.modules():
            if parametrize.is_parametrized(module, "weight"):  # conv_pre, ups, resblocks, conv_post
                parametrize.remove_parametrizations(module, "weight")
                module.weight.data = time_major(module.weight.data)
        return self

    def released_state_dict(self):
        """State dict in the released layout: weight norm as `weight_g` / `weight_v`."""
        state = {}
        for key, value in self.state_dict().items():
            if key.endswith(".parametrizations.weight.original0"):
                state[key.replace(".parametrizations.weight.original0", ".weight_g")] = value
            elif key.endswith(".parametrizations.weight.original1"):
                state[key.replace(".parametrizations.weight.original1", ".weight_v")] = value
            elif key.endswith(".weight") and key.split(".")[0] in ("conv_pre", "ups", "resblocks", "conv_post"):
                state[key[:-7] + ".weight_g"] = torch.norm_except_dim(value, 2, 0)  # weight norm removed: g = ||w||, v = w
                state[key[:-7] + ".weight_v"] = value
            else:
                state[key] = value
        return state

    def load_released_state_dict(self, state):
        """Load a released-layout state dict (weight_g / weight_v); every key and shape must match."""
        renamed = {}
        for key, value in state.items():
            key = key.replace(".weight_g", ".parametrizations.weight.original0")
            renamed[key.replace(".weight_v", ".parametrizations.weight.original1")] = value.float()
        own = self.state_dict()
        missing = sorted(set(own) - set(renamed))
        unexpected = sorted(set(renamed) - set(own))
        wrong = [f"{k}: checkpoint {tuple(renamed[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in renamed and renamed[k].shape != own[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(f"vocoder checkpoint does not match the config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}, shape mismatches {wrong[:5]}")
        self.load_state_dict(renamed, strict=True)

    @classmethod
    def from_pretrained(cls, path):
        """Open a vocoder: a directory with config.json + model.safetensors (ours), or a released
        checkpoint file (`torch.save({"generator": state_dict})`, e.g. g_00500000 or *.pt) or
        *.safetensors file with config.json beside it. Returns the model in eval mode."""
        path = Path(path)
        if path.is_dir():
            candidates = [path / "model.safetensors"] if (path / "model.safetensors").exists() else \
                sorted(p for p in path.iterdir() if p.name.startswith("g_") or p.suffix == ".pt")
            if len(candidates) != 1:
                raise FileNotFoundError(f"{path}: expected model.safetensors, or one g_* / *.pt checkpoint, "
                                        f"found {[p.name for p in candidates] or 'none'}")
            path = candidates[0]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such vocoder checkpoint")
        config_path = path.parent / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: the vocoder's config.json must sit beside its weights")
        model = cls(VocoderConfig.from_dict(json.loads(config_path.read_text())))
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(checkpoint, dict) or "generator" not in checkpoint:
                raise ValueError(f"{path}: expected a checkpoint saved as {{'generator': state_dict}}")
            state = checkpoint["generator"]
        model.load_released_state_dict(state)
        return model.eval()

    def save_pretrained(self, directory):
        """Write config.json + model.safetensors (released key layout) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config.to_dict(), indent=1))
        save_file({k: v.detach().contiguous() for k, v in self.released_state_dict().items()},
                  str(directory / "model.safetensors"))
