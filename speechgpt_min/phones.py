"""Phone units: the toy's stand-in for mHuBERT's units, a small phone recogniser.

SpeechGPT hears through mHuBERT units: k-means clusters of a HuBERT pretrained on thousands of hours
of speech, phonetic enough that a 7B LM learns to read them in every voice. A HuBERT pretrained for a
few CPU minutes on tiny_data cannot give that: its units spell the voice as much as the words, and a
toy LM fed them learns ASR far slower than one fed true phones (README, "Speech to units"). So the
toy hears through phones, learnt the way speech recognisers bootstrap:

    features   13 MFCCs + deltas (39-d, 50 Hz, frame-aligned with HuBERT's), normalised per utterance
               (mean and variance: that alone removes much of a voice's colour)
    model      dilated 1-D convolutions over the frames -> a phone per 20 ms frame
    round 1    learn the frames of the voices festival aligned (its phone alignments)
    round 2    forced-align every other training utterance: its phones are known from its text (the
               corpus's pronunciation), round 1's posteriors place them in time (Viterbi); learn all.
               Speed-perturbed copies of the training speech (`speed_perturbed`: train.py adds each
               utterance 0.9x and 1.1x as fast, so pace, pitch and formants move as in another
               speaker) join round 2 as utterances with no alignment: new voices are heard better
    round 3    (optional, as HuBERT iterates its targets) align them again with round 2's better
               model and learn on: the voices festival did not align are heard better
    units      the most likely phones, repeats merged: <sosp><12><7>...<eosp>, ids into the phone
               list, exactly as k-means units are spelled; durations for the vocoder. Each frame's
               own best phone leaves stray one-frame phones, most of all in a voice never heard;
               with a switch_penalty the decoder pays for every change of phone (`switch_viterbi`),
               and keeps a short phone only when the frames clearly say so (README, "Speech to units")
    hearing    with listen_speeds, each waveform is also heard played faster and slower, as the
               speed-perturbed copies were, and the hearings' posteriors are averaged (`hear`): a
               voice never heard is misheard less

    features = [normalised_mfcc(wav) for wav in wavs]
    recognizer = train_phone_recognizer(features, labels, pronunciations)  # labels: frame phones or None
    units = recognizer.recognize(features)                                # per utterance (T',) phone ids
    units = recognizer.hear(wavs)                                         # the same from waveforms, heard
                                                                          # at every listen_speed too
    units = recognizer.units(wav)                                         # one waveform -> (T',) phone ids

Training takes a `device` ("cpu", "cuda", "mps"); inference runs wherever the recognizer's weights are
(features go there, results come back to the CPU).
"""
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .audio import SAMPLE_RATE, resample
from .device import resolve_device
from .hubert_training import mfcc_features
from .presets import config_from_preset
from .trainer import lr_at

FORMAT = "speechgpt_min.phone_recognizer"


@dataclass
class PhoneRecognizerConfig:
    phones: list = field(default_factory=list)  # the unit inventory: unit id i is phones[i]
    channels: int = 192
    dilations: tuple = (1, 2, 4, 8, 1, 2, 4, 8)  # receptive field: 2 * sum + 5 frames (about 1.4 s)
    dropout: float = 0.1
    switch_penalty: float = 0.0  # decoding: log-probability each change of phone costs (0: every frame's argmax)
    listen_speeds: tuple = ()  # decoding: also hear each waveform played this many times as fast (`hear`)

    def __post_init__(self):
        self.dilations = tuple(self.dilations)
        self.listen_speeds = tuple(self.listen_speeds)
        if any(speed <= 0 for speed in self.listen_speeds):
            raise ValueError(f"listen_speeds must be positive, got {self.listen_speeds}")
        if len(set(self.phones)) != len(self.phones):
            raise ValueError("the phone list has duplicates")

    @classmethod
    def from_preset(cls, name, **overrides):
        """The named preset with any fields replaced, e.g. channels=32 (presets.py)."""
        return config_from_preset(cls, PRESETS, name, overrides)


PRESETS = {
    # the toy's ears: 192 channels, 8 dilated convolutions (about 1.4 s of context); the phone list
    # is filled in by train_phone_recognizer from the alignments and pronunciations
    "toy": {},
}


def n_frames(wav):
    """Frames of a waveform at 50 Hz, as HuBERT's conv front end counts them: floor((T - 400) / 320) + 1."""
    return (len(wav) - 400) // 320 + 1


def speed_perturbed(wav, factor):
    """wav (T,) at 16 kHz played `factor` times as fast (Kaldi's speed perturbation): resampled as if
    recorded at 16000 * factor Hz, so it lasts T / factor samples and every frequency (pitch and
    formants) is `factor` times higher. -> (about T / factor,) float32 tensor."""
    if factor <= 0:
        raise ValueError(f"a speed factor must be positive, got {factor}")
    return torch.from_numpy(resample(np.asarray(wav, dtype=np.float64), round(SAMPLE_RATE * factor), SAMPLE_RATE)).float()


def normalised_mfcc(wav, warp=1.0):
    """wav (T,) at 16 kHz -> (T', 39) MFCCs with deltas, zero mean and unit variance over the utterance.
    warp != 1: read through a filterbank warped as for another vocal tract (audio.vtlp_warped)."""
    features = mfcc_features(wav, warp)
    return (features - features.mean(0)) / (features.std(0) + 1e-5)


def stretched(frames, length):
    """(T, D) -> (length, D): linear interpolation in time, first and last frames kept."""
    return F.interpolate(frames.T[None], size=length, mode="linear", align_corners=True)[0].T


class ResidualConv(nn.Module):
    """x + conv(relu(conv(x))): a dilated convolution that sees `dilation` frames to each side."""

    def __init__(self, channels, dilation, dropout):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.mix = nn.Conv1d(channels, channels, 1)
        self.norm = nn.GroupNorm(1, channels)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):  # (B, C, T) -> (B, C, T)
        return x + self.dropout(self.mix(F.gelu(self.conv(self.norm(x)))))


class PhoneRecognizer(nn.Module):
    """Normalised MFCC frames -> phone logits per frame."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.inp = nn.Conv1d(39, config.channels, 5, padding=2)
        self.blocks = nn.ModuleList(ResidualConv(config.channels, d, config.dropout) for d in config.dilations)
        self.out = nn.Conv1d(config.channels, len(config.phones), 1)

    def forward(self, features):  # (B, T, 39) -> (B, T, phones)
        x = self.inp(features.transpose(1, 2))  # (B, C, T)
        for block in self.blocks:
            x = block(x)
        return self.out(x).transpose(1, 2)

    @property
    def n_units(self):
        return len(self.config.phones)

    def units(self, wav):
        """wav (T,) at 16 kHz -> (T',) long: the phone of every 20 ms frame (`hear`)."""
        return self.hear([wav.float().cpu()])[0]

    @torch.no_grad()
    def hear(self, wavs, features=None, progress=False):
        """Waveforms (T_i,) at 16 kHz -> list of (T_i',) phone ids, T_i' = n_frames(wav).

        Each waveform is heard as it is and, for every speed in the config's listen_speeds, played that
        many times as fast (`speed_perturbed`, as the training copies are): each hearing's log-posteriors,
        stretched back to the waveform's own frames, are averaged before decoding. Ears that learnt
        speed-perturbed copies mishear a voice they never heard less this way than in any one hearing
        (README, "Speech to units"). features: the waveforms' normalised MFCCs, if already computed."""
        features = features if features is not None else [normalised_mfcc(w) for w in wavs]
        if not self.config.listen_speeds:
            return self.recognize(features, progress=progress)
        total = self.recognize(features, log_probs=True, progress=progress)  # list of (T_i', phones)
        for speed in self.config.listen_speeds:
            heard = self.recognize([normalised_mfcc(speed_perturbed(w, speed)) for w in wavs], log_probs=True,
                                   progress=progress)  # (about T_i' / speed, phones) each
            total = [t + stretched(h, len(t)) for t, h in zip(total, heard)]
        return self.decode([t / (1 + len(self.config.listen_speeds)) for t in total])

    @torch.no_grad()
    def recognize(self, features, batch_size=32, log_probs=False, progress=False):
        """Many utterances at once, each heard once: list of (T_i, 39) normalised MFCCs -> list of (T_i,)
        phone ids, decoded with the config's switch_penalty (or, with log_probs, (T_i, phones) log-posteriors)."""
        self.eval()
        order = sorted(range(len(features)), key=lambda i: len(features[i]))  # little padding
        out = [None] * len(features)
        for start in tqdm(range(0, len(order), batch_size), desc="phone units", disable=not progress):
            batch = order[start:start + batch_size]
            x = nn.utils.rnn.pad_sequence([features[i] for i in batch], batch_first=True)  # (B, T, 39)
            result = F.log_softmax(self(x.to(self.inp.weight.device)).cpu(), dim=-1)  # (B, T, phones)
            for row, i in enumerate(batch):
                out[i] = result[row, :len(features[i])]
        return out if log_probs else self.decode(out, batch_size)

    def decode(self, log_probs, batch_size=32):
        """list of (T_i, phones) log-posteriors -> list of (T_i,) phone ids (`switch_viterbi`)."""
        order = sorted(range(len(log_probs)), key=lambda i: len(log_probs[i]))  # little padding
        out = [None] * len(log_probs)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            lengths = torch.tensor([len(log_probs[i]) for i in batch])
            padded = nn.utils.rnn.pad_sequence([log_probs[i] for i in batch], batch_first=True)  # (B, T, phones)
            path = switch_viterbi(padded, lengths, self.config.switch_penalty)  # (B, T)
            for row, i in enumerate(batch):
                out[i] = path[row, :len(log_probs[i])]
        return out

    def save_pretrained(self, directory):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps({"format": FORMAT, **asdict(self.config)}, indent=1) + "\n")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, directory / "model.safetensors")

    @classmethod
    def from_pretrained(cls, directory):
        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        if config.pop("format", None) != FORMAT:
            raise ValueError(f"{directory}: not a phone recognizer (config.json format is not {FORMAT!r})")
        model = cls(PhoneRecognizerConfig(**config))
        model.load_state_dict(load_file(directory / "model.safetensors"), strict=True)
        return model.eval()


def switch_viterbi(log_probs, lengths, penalty):
    """The best phone path when every change of phone costs `penalty` (an HMM whose only transition
    score is that cost): log_probs (B, T, P), lengths (B,) real frames of each -> (B, T) phone ids
    (frames past an utterance's length mean nothing). penalty 0 gives every frame's own argmax."""
    if penalty == 0:
        return log_probs.argmax(-1)
    B, T, P = log_probs.shape
    score = log_probs[:, 0]  # (B, P): the best path ending on each phone at frame t
    scores = [score]
    best_before = torch.zeros(B, T, dtype=torch.long)   # the phone a switch at frame t comes from
    stayed = torch.ones(B, T, P, dtype=torch.bool)      # the best path to (t, p) was on p at t - 1
    for t in range(1, T):
        top, best_before[:, t] = score.max(-1)
        stayed[:, t] = score >= top[:, None] - penalty
        score = torch.maximum(score, top[:, None] - penalty) + log_probs[:, t]
        scores.append(score)
    path, stayed, best_before = np.zeros((B, T), dtype=np.int64), stayed.numpy(), best_before.numpy()
    for b, n in enumerate(lengths.tolist()):  # back from each utterance's own last frame
        phone = int(scores[n - 1][b].argmax())
        for t in range(n - 1, -1, -1):
            path[b, t] = phone
            if not stayed[b, t, phone]:
                phone = best_before[b, t]
    return torch.from_numpy(path)


# ----------------------------------------------------------------------------- forced alignment

def forced_align(log_probs, phone_ids):
    """Where each phone of a known sequence lies in time: the Viterbi path through log_probs (T, P)
    that visits phone_ids (N,) in order, each for at least one frame. -> (T,) phone id per frame.
    The frames must outnumber the phones (T >= N)."""
    return forced_align_batch([log_probs], [phone_ids])[0]


def forced_align_batch(log_probs, phone_ids):
    """`forced_align` of many utterances at once (one dynamic programme over the padded batch).
    log_probs: list of (T_i, P); phone_ids: list of (N_i,) with N_i <= T_i. -> list of (T_i,)."""
    B, T, N = len(log_probs), max(len(lp) for lp in log_probs), max(len(ids) for ids in phone_ids)
    emit = np.full((B, T, N), -1e9)  # emit[b, t, n]: frame t of utterance b as its n-th phone
    for b, (lp, ids) in enumerate(zip(log_probs, phone_ids)):
        if len(ids) > len(lp):
            raise ValueError(f"utterance {b}: {len(ids)} phones cannot fit in {len(lp)} frames")
        emit[b, :len(lp), :len(ids)] = np.asarray(lp, dtype=np.float64)[:, ids]
    score = np.full((B, N), -np.inf)
    score[:, 0] = emit[:, 0, 0]
    moved = np.zeros((B, T, N), dtype=bool)  # frame t entered phone n from phone n - 1
    for t in range(1, T):
        advance = np.concatenate([np.full((B, 1), -np.inf), score[:, :-1]], axis=1)
        moved[:, t] = advance > score
        score = np.maximum(score, advance) + emit[:, t]
    paths = []
    for b, (lp, ids) in enumerate(zip(log_probs, phone_ids)):
        path, n = np.empty(len(lp), dtype=np.int64), len(ids) - 1  # it ends on the last phone, at the last frame
        for t in range(len(lp) - 1, -1, -1):
            path[t] = n
            n -= moved[b, t, n]
        paths.append(torch.from_numpy(np.asarray(ids)[path]))
    return paths


# ----------------------------------------------------------------------------- training

def _epochs(model, inputs, targets, epochs, lr, batch_size, rng, desc, progress, device):
    """AdamW over batches of whole utterances (similar lengths together), cross-entropy per frame, on `device`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    steps, step = epochs * len(batches), 0
    model.train()
    bar = tqdm(total=steps, desc=desc, disable=not progress)
    for _ in range(epochs):
        rng.shuffle(batches)
        for batch in batches:
            for group in optimizer.param_groups:  # linear decay to zero
                group["lr"] = lr_at(step, steps, lr, decay="linear")
            x = nn.utils.rnn.pad_sequence([inputs[i] for i in batch], batch_first=True).to(device)  # (B, T, 39)
            y = nn.utils.rnn.pad_sequence([targets[i] for i in batch], batch_first=True, padding_value=-100).to(device)
            loss = F.cross_entropy(model(x).transpose(1, 2), y, ignore_index=-100)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


def train_phone_recognizer(features, frame_labels, pronunciations, config=None, epochs=(2, 2), lr=2e-3,
                           batch_size=16, seed=0, progress=True, device="cpu"):
    """The rounds of the module docstring.

    features: list of (T_i, 39) normalised MFCCs of the training speech (`normalised_mfcc`).
    frame_labels: per utterance, its phones per 50 Hz frame (a list of phone names, e.g. from
        units.frame_phones of a festival alignment), or None where the voice has no alignment.
    pronunciations: per utterance, its text's phones in order (names), used to force-align the others.
    epochs: per round: round 1 on the aligned utterances, then each later round force-aligns the others
        with the model so far and learns from all (2, 2, 1: a third round, aligned by round 2's model).
    device: where the model trains ("cpu", "cuda", "mps", "auto"; device.resolve_device); forced
        alignment runs on the CPU.
    Returns the trained PhoneRecognizer, on `device`.
    """
    device = resolve_device(device)  # an unavailable device fails here, before any work
    torch.manual_seed(seed)
    rng = random.Random(seed)
    names = sorted({p for labels in frame_labels if labels for p in labels} | {p for ps in pronunciations for p in ps})
    config = config or PhoneRecognizerConfig()
    config.phones = names
    index = {p: i for i, p in enumerate(names)}
    model = PhoneRecognizer(config).to(device)

    aligned = [i for i, labels in enumerate(frame_labels) if labels is not None]
    if not aligned:
        raise ValueError("round 1 needs some utterances with frame labels (phone alignments)")
    targets = {i: torch.tensor([index[p] for p in frame_labels[i][:len(features[i])]]) for i in aligned}
    for i in aligned:  # an alignment a frame short of the features: the last phone goes on
        targets[i] = F.pad(targets[i], (0, len(features[i]) - len(targets[i])), value=int(targets[i][-1]))
    _epochs(model, [features[i] for i in aligned], [targets[i] for i in aligned], epochs[0], lr, batch_size, rng,
            "phones, round 1", progress, device)

    others = [i for i in range(len(features)) if i not in targets
              and len(pronunciations[i]) <= len(features[i])]  # (a text too long for its audio is left out)
    for round_number, round_epochs in enumerate(epochs[1:], start=2):
        posteriors = model.recognize([features[i] for i in others], log_probs=True, progress=progress)
        for start in tqdm(range(0, len(others), 256), desc="forced alignment", disable=not progress):
            batch = others[start:start + 256]
            ids = [[index[p] for p in pronunciations[i]] for i in batch]
            targets.update(zip(batch, forced_align_batch(posteriors[start:start + 256], ids)))
        chosen = sorted(targets)
        _epochs(model, [features[i] for i in chosen], [targets[i] for i in chosen], round_epochs, lr / 2, batch_size,
                rng, f"phones, round {round_number}", progress, device)
    return model
