"""The toy's unit vocoder: units -> log-mel spectrogram by a small model with context, then Griffin-Lim.

A unit alone does not say what it sounds like. Its neighbours do (a sound changes with the sounds
around it), and so does the voice: trained on many voices without being told which, a vocoder learns
each unit's average over the voices, which no listener understands. So this vocoder reads every
unit in its context and is trained on one voice (the answer voice, as SpeechGPT's released vocoder
speaks one). It learns a spectrogram rather than a waveform, which takes a minute instead of a
GAN's days, and turns the spectrogram into sound with Griffin-Lim, which needs no training at all:

    units (B, N) ──embedding──> (B, C, N) ──encoder: residual convs over the units──> (B, C, N)
        ├──duration predictor──> frames per unit (B, N)
        └──each unit's vector repeated by its duration──> (B, C, T), T frames at 50 Hz
           ──decoder: residual dilated convs──> (B, 2 * n_mels, T) ──> log-mel (B, n_mels, 2T) at 100 Hz
    log-mel ──pseudo-inverse of the mel filterbank──> magnitude (B, n_fft / 2 + 1, 2T + 1)
            ──Griffin-Lim──> waveform (B, T * 320) at 16 kHz

    vocoder = MelVocoder(MelVocoderConfig.from_preset("toy", num_embeddings=100))
    wav = vocoder(units)                      # units (B, N) long -> (B, samples); durations predicted
    wav = vocoder(units, durations)           # or given: (B, N) frames of 20 ms
    vocoder = load_vocoder("runs/toy/vocoder")   # either kind (this one or the released unit HiFi-GAN)

Training is `train_mel_vocoder` in vocoder_training.py.
"""
import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .audio import log_mel_spectrogram, mel_filterbank
from .presets import config_from_preset
from .vocoder import DurationPredictor, UnitVocoder, check_durations, check_units

KIND = "unit-mel-griffin-lim"  # config.json's "kind": what load_vocoder builds (released files have none)
MEL_FLOOR = 1e-5  # mel magnitudes are floored here before the log: log(MEL_FLOOR) is silence
LOG_MEL_FLOOR = math.log(MEL_FLOOR)

# ----------------------------------------------------------------------------- config


@dataclasses.dataclass
class MelVocoderConfig:
    num_embeddings: int = 100            # K, the unit vocabulary
    channels: int = 192                  # width of the embedding, encoder and decoder
    encoder_layers: int = 3              # residual convs over the (deduplicated) units
    encoder_kernel_size: int = 5         # each sees 2 units either side
    decoder_dilations: tuple = (1, 2, 4, 1)  # one residual conv per entry, over 50 Hz frames
    decoder_kernel_size: int = 3
    dur_hidden_dim: int = 128            # duration predictor width
    dur_kernel_size: int = 3
    dur_dropout: float = 0.1
    n_mels: int = 80                     # the spectrogram: 80 mel bins of the magnitude, log floored at 1e-5,
    n_fft: int = 1024                    # 1024-point FFT of a 40 ms Hann window every 10 ms
    win_length: int = 640                # (the same view as the HiFi-GAN mel loss, vocoder_training.log_mel)
    hop_length: int = 160
    griffin_lim_iters: int = 8
    griffin_lim_momentum: float = 0.99   # "fast Griffin-Lim" (Perraudin et al. 2013); 0 is the original
    code_hop_size: int = 320             # samples per unit frame (50 Hz at 16 kHz)
    sampling_rate: int = 16000

    def __post_init__(self):
        self.decoder_dilations = tuple(self.decoder_dilations)
        if self.code_hop_size % self.hop_length:
            raise ValueError(f"a unit frame ({self.code_hop_size} samples) must hold a whole number of mel "
                             f"frames (hop_length {self.hop_length})")

    @property
    def mel_frames_per_unit(self):
        return self.code_hop_size // self.hop_length  # 2: the decoder writes two 10 ms mel frames per 20 ms frame

    @classmethod
    def from_preset(cls, name, **overrides):
        """The named preset with any fields replaced, e.g. num_embeddings=100 (presets.py)."""
        return config_from_preset(cls, PRESETS, name, overrides)

    def to_dict(self):
        return {"kind": KIND, **dataclasses.asdict(self), "decoder_dilations": list(self.decoder_dilations)}

    @classmethod
    def from_dict(cls, d):
        if d.get("kind") != KIND:
            raise ValueError(f"config kind {d.get('kind')!r} is not {KIND!r}")
        return cls(**{k: v for k, v in d.items() if k != "kind"})


PRESETS = {
    # 1.17M parameters; train.py trains it 1000 steps of 4 utterances of one voice (README, vocoder).
    "toy": {},
}

# ----------------------------------------------------------------------------- model


class ResidualConv(nn.Module):
    """x + GELU(conv(LayerNorm(x))): one layer of context, length-preserving; padding stays zero."""

    def __init__(self, channels, kernel_size, dilation):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.conv = nn.Conv1d(channels, channels, kernel_size, dilation=dilation,
                              padding=dilation * (kernel_size - 1) // 2)

    def forward(self, x, mask):  # x (B, C, T), mask (B, 1, T) 1 = real, 0 = padding
        h = self.norm(x.transpose(1, 2)).transpose(1, 2) * mask
        return (x + F.gelu(self.conv(h))) * mask


class MelVocoder(nn.Module):
    """Units -> log-mel (a context model) -> waveform (Griffin-Lim)."""

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.num_embeddings, c.channels)
        self.encoder = nn.ModuleList(ResidualConv(c.channels, c.encoder_kernel_size, 1) for _ in range(c.encoder_layers))
        self.dur_predictor = DurationPredictor(c.channels, c.dur_hidden_dim, c.dur_kernel_size, c.dur_dropout)
        self.decoder = nn.ModuleList(ResidualConv(c.channels, c.decoder_kernel_size, d) for d in c.decoder_dilations)
        self.norm = nn.LayerNorm(c.channels)
        self.proj = nn.Conv1d(c.channels, c.mel_frames_per_unit * c.n_mels, 1)
        # magnitude ~= pinv(filterbank) @ mel: least squares, recomputed rather than saved
        filterbank = mel_filterbank(c.sampling_rate, c.n_fft, c.n_mels)  # (n_mels, n_fft / 2 + 1)
        self.register_buffer("mel_inverse", torch.linalg.pinv(filterbank), persistent=False)

    def log_mel(self, wav):
        """The spectrogram this vocoder speaks from. wav (..., samples) -> (..., n_mels, samples / hop + 1)."""
        c = self.config
        return log_mel_spectrogram(wav, c.sampling_rate, c.n_fft, c.hop_length, c.win_length, c.n_mels,
                                   power=1.0, eps=MEL_FLOOR)

    def encode(self, units, mask):
        """Units (B, N) long, mask (B, 1, N) -> one vector per unit, with its context (B, C, N)."""
        x = self.embed(units).transpose(1, 2) * mask  # (B, C, N)
        for layer in self.encoder:
            x = layer(x, mask)
        return x

    def log_durations(self, encoded):
        """(B, C, N) -> predicted log(frames + 1) per unit (B, N)."""
        return self.dur_predictor(encoded.transpose(1, 2))

    def decode(self, encoded, durations):
        """Unit vectors (B, C, N) and frames per unit (B, N) -> log-mel (B, n_mels, 2T), T the longest
        item's frames; an item's mel frames past 2 * durations[b].sum() are silence (the log floor)."""
        lengths = durations.sum(1)  # (B,)
        frames = nn.utils.rnn.pad_sequence([torch.repeat_interleave(e, d, dim=1).T for e, d in zip(encoded, durations)],
                                           batch_first=True).transpose(1, 2)  # (B, C, T): unit vectors, repeated
        mask = (torch.arange(frames.shape[2], device=frames.device) < lengths[:, None])[:, None].to(frames.dtype)
        x = frames
        for layer in self.decoder:
            x = layer(x, mask)
        x = self.proj(self.norm(x.transpose(1, 2)).transpose(1, 2))  # (B, 2 * n_mels, T)
        x = torch.where(mask.bool(), x, LOG_MEL_FLOOR)
        B, _, T = x.shape
        per = self.config.mel_frames_per_unit
        return x.view(B, per, self.config.n_mels, T).permute(0, 2, 3, 1).reshape(B, self.config.n_mels, T * per)

    def predict_durations(self, units):
        """Units (B, N) long -> frames per unit (B, N) long, each >= 1.

        Rounded so that the running total stays the rounded running sum: rounding each unit alone
        would turn every 1.4 into 1 and make the speech too fast."""
        self._check(units)
        encoded = self.encode(units, torch.ones_like(units[:, None], dtype=torch.float))
        frames = (torch.exp(self.log_durations(encoded)) - 1).clamp(min=0.5)  # (B, N), at least half a frame
        ends = torch.round(torch.cumsum(frames, 1))  # (B, N) the frame where each unit ends
        return torch.diff(ends, dim=1, prepend=torch.zeros_like(ends[:, :1])).long().clamp(min=1)

    def units_to_mel(self, units, durations=None):
        """Units (B, N) long -> (log-mel (B, n_mels, 2T), durations (B, N)); durations predicted if None."""
        self._check(units, durations)
        if durations is None:
            durations = self.predict_durations(units)
        encoded = self.encode(units, torch.ones_like(units[:, None], dtype=torch.float))
        return self.decode(encoded, durations), durations

    def forward(self, units, durations=None):
        """Units (B, N) long -> waveform (B, samples) float at 16 kHz.

        durations: (B, N) frames per unit (each >= 1), or None to predict them. Item b lasts
        durations[b].sum() * 320 samples; shorter items are zero-padded at the end to the longest."""
        log_mel, durations = self.units_to_mel(units, durations)
        per = self.config.mel_frames_per_unit
        wavs = [self.mel_to_wave(mel[:, :n * per]) for mel, n in zip(log_mel, durations.sum(1).tolist())]
        return nn.utils.rnn.pad_sequence(wavs, batch_first=True)  # each item on its own: Griffin-Lim spreads edges

    def mel_to_wave(self, log_mel):
        """Log-mel (n_mels, F) -> waveform (F * hop_length,): magnitudes by least squares, phase by Griffin-Lim."""
        magnitude = (self.mel_inverse @ log_mel.exp()).clamp(min=MEL_FLOOR)  # (n_fft / 2 + 1, F)
        magnitude = F.pad(magnitude[None], (0, 1), mode="replicate")  # F hops of audio have F + 1 centred frames
        return griffin_lim(magnitude, self.config, length=log_mel.shape[1] * self.config.hop_length)[0]

    def _check(self, units, durations=None):
        check_units(units, self.config.num_embeddings)
        if durations is not None:
            check_durations(units, durations)

    # ------------------------------------------------------------------------- weights

    @classmethod
    def from_pretrained(cls, directory):
        """Open a directory written by save_pretrained (config.json + model.safetensors), in eval mode."""
        directory = Path(directory)
        for name in ("config.json", "model.safetensors"):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name}: a mel vocoder directory holds config.json and model.safetensors")
        model = cls(MelVocoderConfig.from_dict(json.loads((directory / "config.json").read_text())))
        model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=True)
        return model.eval()

    def save_pretrained(self, directory):
        """Write config.json (with "kind") + model.safetensors into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config.to_dict(), indent=1))
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(directory / "model.safetensors"))

# ----------------------------------------------------------------------------- Griffin-Lim


def griffin_lim(magnitude, config, length):
    """A waveform whose STFT magnitude is close to `magnitude` (Griffin & Lim 1984), by alternating
    projections: give the magnitude a phase, go to a waveform and back, keep the new phase. Momentum
    (Perraudin et al. 2013) extrapolates each phase update, which converges in far fewer iterations.

    magnitude: (B, n_fft / 2 + 1, frames) with the config's STFT (n_fft, win_length, hop_length, Hann,
    centred). Starts from zero phase, so the result is deterministic. -> waveform (B, length).
    """
    c = config
    window = torch.hann_window(c.win_length, device=magnitude.device, dtype=magnitude.dtype)

    def istft(spectrum):
        return torch.istft(spectrum, c.n_fft, c.hop_length, c.win_length, window, length=length)

    phase = torch.ones_like(magnitude, dtype=torch.complex64)  # unit complex numbers, angle 0
    previous = torch.zeros_like(phase)
    for _ in range(c.griffin_lim_iters):
        rebuilt = torch.stft(istft(magnitude * phase), c.n_fft, c.hop_length, c.win_length, window,
                             return_complex=True)  # (B, n_fft / 2 + 1, frames): a consistent spectrum
        phase = rebuilt - c.griffin_lim_momentum / (1 + c.griffin_lim_momentum) * previous
        phase = phase / phase.abs().clamp(min=1e-16)
        previous = rebuilt
    return istft(magnitude * phase)

# ----------------------------------------------------------------------------- either kind


def load_vocoder(path):
    """Open a vocoder of either kind for inference: a directory (or checkpoint file) whose config.json
    says "kind": "unit-mel-griffin-lim" is a MelVocoder; any other is the released unit HiFi-GAN
    format (`UnitVocoder.from_pretrained`), returned with weight norm folded (faster)."""
    path = Path(path)
    config_path = (path if path.is_dir() else path.parent) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: the vocoder's config.json must sit beside its weights")
    if json.loads(config_path.read_text()).get("kind") == KIND:
        return MelVocoder.from_pretrained(config_path.parent)
    return UnitVocoder.from_pretrained(path).remove_weight_norm()
