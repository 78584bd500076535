"""Training the unit vocoders: the toy's mel vocoder (mel_vocoder.py), and the unit HiFi-GAN
(vocoder.py) with HiFi-GAN's discriminators and losses.

    dataset = vocoder_items(data_dir, rows, units, durations)  # a corpus's utterances and their units
    history = train_mel_vocoder(vocoder, dataset, steps=800)  # dataset: (wav, units, durations) items
    history = train_vocoder(vocoder, dataset, steps=600)      # the unit HiFi-GAN
    mel_l1 = evaluate_vocoder(vocoder, held_out)             # either kind: log-mel L1 with the true durations

Both trainers take a `device` ("cpu", "cuda", "mps", "auto"; device.resolve_device): the vocoder (and
the discriminator) train there and stay there, each batch goes there; the dataset stays on the CPU.
Evaluation runs wherever the vocoder is.

The losses are HiFi-GAN's (Kong et al. 2020): multi-period (periods 2, 3, 5, 7, 11) and multi-scale
discriminators, least-squares adversarial loss, feature matching, log-mel L1 (weight 45), plus the
duration loss (MSE on log(d + 1)) and an optional multi-resolution STFT loss. Only training needs
this module; hearing units needs vocoder.py (or mel_vocoder.py) alone.
"""
import random
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm, weight_norm
from tqdm import tqdm

from .audio import load_audio, log_mel_spectrogram
from .device import resolve_device
from .trainer import lr_at
from .vocoder import LRELU_SLOPE

# ----------------------------------------------------------------------------- the mel vocoder

def vocoder_items(data_dir, rows, units, durations):
    """Manifest rows -> (wav (T,), deduplicated units (N,), durations in 50 Hz frames (N,)) per
    utterance: what the vocoders train and are evaluated on. units, durations: {id: list}, as
    units.read_run_units gives them. Raises audio.AudioError for a file that cannot be read."""
    return [(load_audio(Path(data_dir) / r["audio"]), torch.tensor(units[r["id"]]), torch.tensor(durations[r["id"]]))
            for r in rows]



def _mel_batch(examples):
    """Utterances (units (N,), durations (N,), log-mel (n_mels, F)) -> zero-padded tensors: units and
    durations (B, N), unit mask (B, 1, N), log-mel (B, n_mels, F) and its mask (B, 1, F)."""
    units = nn.utils.rnn.pad_sequence([u for u, _, _ in examples], batch_first=True)  # (B, N)
    durations = nn.utils.rnn.pad_sequence([d for _, d, _ in examples], batch_first=True)  # padding: 0 frames
    unit_mask = nn.utils.rnn.pad_sequence([torch.ones(len(u)) for u, _, _ in examples], batch_first=True)[:, None]
    mels = nn.utils.rnn.pad_sequence([m.T for _, _, m in examples], batch_first=True).transpose(1, 2)
    mel_mask = nn.utils.rnn.pad_sequence([torch.ones(m.shape[1]) for _, _, m in examples], batch_first=True)[:, None]
    return units, durations, unit_mask, mels, mel_mask


def _length_buckets(lengths, batch_size, rng, chunk=16):
    """One epoch of batches (lists of indices), every item once: shuffled, then sorted by length within
    chunks of `chunk` batches, so that a batch holds utterances of about one length (little padding)."""
    order = rng.sample(range(len(lengths)), len(lengths))
    batches = []
    for i in range(0, len(order), chunk * batch_size):
        ranked = sorted(order[i:i + chunk * batch_size], key=lengths.__getitem__)
        batches += [ranked[j:j + batch_size] for j in range(0, len(ranked), batch_size)]
    rng.shuffle(batches)
    return batches


def train_mel_vocoder(vocoder, dataset, steps, batch_size=4, lr=4e-3, warmup_fraction=0.05, seed=0, progress=True,
                      log=None, device="cpu"):
    """Train a MelVocoder in place on whole utterances; return the per-step history (list of dicts).

    Each step takes `batch_size` utterances of similar length (every one once per epoch) and lowers
    the L1 distance of the predicted log-mel to the real one (true durations, padding excluded) plus
    the duration loss, MSE on log(frames + 1). AdamW; lr rises linearly over the first
    `warmup_fraction` of the steps, then decays along a cosine to 0 (trainer.lr_at). A short run learns most from
    many small batches: 800 steps of 4 utterances beat 200 of 16 (README, vocoder).

    dataset: items (wav (T,) float at 16 kHz, units (N,) long deduplicated, durations (N,) frames,
        durations.sum() * 320 ~ T). log: called with each step's record, e.g. print.
    device: where to train (the module docstring).
    """
    device = resolve_device(device)  # an unavailable device fails here, before any work
    vocoder.to(device)
    hop, per = vocoder.config.code_hop_size, vocoder.config.mel_frames_per_unit
    examples = []
    for wav, units, durations in dataset:
        samples = int(durations.sum()) * hop  # the wav cut or padded to the units' length
        wav = F.pad(wav.float(), (0, max(samples - len(wav), 0)))[:samples]
        examples.append((units.long(), durations.long(), vocoder.log_mel(wav)[:, :samples // hop * per]))
    with torch.no_grad():  # start every mel bin at its average: the first steps learn shapes, not the level
        vocoder.proj.bias.copy_(torch.cat([m for _, _, m in examples], 1).mean(1).repeat(per))
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(vocoder.parameters(), lr, betas=(0.9, 0.98))
    vocoder.train()
    history, batches, start = [], [], time.perf_counter()
    bar = tqdm(range(steps), desc="mel vocoder", disable=not progress)
    for step in bar:
        step_lr = lr_at(step, steps, lr, warmup_steps=round(warmup_fraction * steps))
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        if not batches:  # a new epoch
            batches = _length_buckets([m.shape[1] for _, _, m in examples], batch_size, rng)
        batch = _mel_batch([examples[i] for i in batches.pop()])
        units, durations, unit_mask, mels, mel_mask = (t.to(device) for t in batch)
        encoded = vocoder.encode(units, unit_mask)  # (B, C, N)
        predicted = vocoder.decode(encoded, durations)  # (B, n_mels, F)
        mel_loss = ((predicted - mels).abs() * mel_mask).sum() / (mel_mask.sum() * mels.shape[1])
        log_durations = vocoder.log_durations(encoded)  # (B, N)
        dur_loss = ((log_durations - torch.log1p(durations.float())) ** 2 * unit_mask[:, 0]).sum() / unit_mask.sum()
        optimizer.zero_grad()
        (mel_loss + dur_loss).backward()
        optimizer.step()
        record = {"step": step + 1, "lr": step_lr, "mel": mel_loss.item(), "dur": dur_loss.item(),
                  "seconds": time.perf_counter() - start}
        history.append(record)
        bar.set_postfix(mel=f"{record['mel']:.3f}", dur=f"{record['dur']:.3f}", refresh=False)
        if log is not None:
            log(record)
    vocoder.eval()
    return history

# ----------------------------------------------------------------------------- discriminators


def _score(convs, conv_post, x):
    """Run a discriminator's conv stack: -> scores (B, frames), every layer's output (for feature matching)."""
    features = []
    for conv in convs:
        x = F.leaky_relu(conv(x), LRELU_SLOPE)
        features.append(x)
    x = conv_post(x)
    return x.flatten(1), features + [x]


class PeriodDiscriminator(nn.Module):
    """Looks at every p-th sample: the waveform folded to (T / p, p) and 2-D convs along time."""

    def __init__(self, period, width):
        super().__init__()
        self.period = period
        chans = [1, width // 32, width // 8, width // 2, width, width]  # HiFi-GAN: 1, 32, 128, 512, 1024, 1024
        self.convs = nn.ModuleList(weight_norm(nn.Conv2d(chans[i], chans[i + 1], (5, 1), (3 if i < 4 else 1, 1),
                                                         padding=(2, 0))) for i in range(5))
        self.conv_post = weight_norm(nn.Conv2d(width, 1, (3, 1), padding=(1, 0)))

    def forward(self, x):  # x (B, T) -> scores (B, frames), feature maps
        if x.shape[1] % self.period:
            x = F.pad(x, (0, self.period - x.shape[1] % self.period), mode="reflect")
        return _score(self.convs, self.conv_post, x.view(x.shape[0], 1, -1, self.period))  # (B, 1, T / p, p)


class ScaleDiscriminator(nn.Module):
    """Strided, grouped 1-D convs over the waveform (or an average-pooled copy of it)."""

    def __init__(self, width, norm):
        super().__init__()
        c = [1, width // 8, width // 8, width // 4, width // 2, width, width, width]  # HiFi-GAN: 1, 128, ..., 1024
        specs = [(15, 1, 1), (41, 2, 4), (41, 2, 16), (41, 4, 16), (41, 4, 16), (41, 1, 16), (5, 1, 1)]
        self.convs = nn.ModuleList(norm(nn.Conv1d(c[i], c[i + 1], k, s, groups=g, padding=(k - 1) // 2))
                                   for i, (k, s, g) in enumerate(specs))
        self.conv_post = norm(nn.Conv1d(width, 1, 3, padding=1))

    def forward(self, x):  # x (B, T) -> scores (B, frames), feature maps
        return _score(self.convs, self.conv_post, x[:, None])  # (B, 1, T)


class Discriminator(nn.Module):
    """HiFi-GAN's multi-period (2, 3, 5, 7, 11) and multi-scale (x1 spectral norm, x2, x4) discriminators."""

    def __init__(self, width):
        super().__init__()
        self.periods = nn.ModuleList(PeriodDiscriminator(p, width) for p in (2, 3, 5, 7, 11))
        self.scales = nn.ModuleList([ScaleDiscriminator(width, spectral_norm), ScaleDiscriminator(width, weight_norm),
                                     ScaleDiscriminator(width, weight_norm)])

    def forward(self, wav):  # (B, T) -> 8 scores (B, *), 8 lists of feature maps
        outputs = [d(wav) for d in self.periods]
        for i, d in enumerate(self.scales):
            if i > 0:
                wav = F.avg_pool1d(wav[:, None], 4, 2, padding=2)[:, 0]  # halve the rate
            outputs.append(d(wav))
        return [s for s, _ in outputs], [f for _, f in outputs]


# ----------------------------------------------------------------------------- losses


def log_mel(wav):
    """The mel loss's view of 16 kHz audio: 80 log-magnitude mel bins, 1024-point FFT, 40 ms window
    (640), 10 ms hop (160), log floored at 1e-5 as in HiFi-GAN. (B, T) -> (B, 80, T / 160 + 1)."""
    return log_mel_spectrogram(wav, n_fft=1024, hop_length=160, win_length=640, n_mels=80, power=1.0, eps=1e-5)


def mel_l1(fake, real):
    """Mean absolute log-mel difference (nats). (B, T), (B, T) -> scalar."""
    return F.l1_loss(log_mel(fake), log_mel(real))


def stft_loss(fake, real, resolutions=((512, 128, 512), (1024, 256, 1024), (256, 64, 256))):
    """Multi-resolution STFT loss (Parallel WaveGAN): spectral convergence + log-magnitude L1, averaged."""
    total = 0.0
    for n_fft, hop, win in resolutions:
        window = torch.hann_window(win, device=fake.device)
        fake_mag, real_mag = (torch.stft(x, n_fft, hop, win, window, return_complex=True).abs().clamp(min=1e-7)
                              for x in (fake, real))
        total = total + torch.linalg.norm(real_mag - fake_mag) / torch.linalg.norm(real_mag) \
            + F.l1_loss(fake_mag.log(), real_mag.log())
    return total / len(resolutions)


def discriminator_loss(real_scores, fake_scores):
    """Least squares: real -> 1, fake -> 0."""
    return sum(torch.mean((1 - r) ** 2) + torch.mean(f ** 2) for r, f in zip(real_scores, fake_scores))


def generator_adversarial_loss(fake_scores):
    return sum(torch.mean((1 - f) ** 2) for f in fake_scores)


def feature_matching_loss(real_features, fake_features):
    return sum(F.l1_loss(f, r.detach()) for rs, fs in zip(real_features, fake_features) for r, f in zip(rs, fs))


def duration_loss(vocoder, units, durations):
    """MSE between predicted log(d + 1) and the true one, per deduplicated utterance. Lists of (N,) -> scalar."""
    losses = [F.mse_loss(vocoder.dur_predictor(vocoder.dict(u[None]))[0], torch.log(d.float() + 1))
              for u, d in zip(units, durations)]
    return torch.stack(losses).mean()


# ----------------------------------------------------------------------------- training


def _segments(items, batch_size, segment_frames, hop, rng):
    """A batch of random crops aligned to unit frames: frame units (B, S) and audio (B, S * hop)."""
    frames, audio = [], []
    for wav, units, durations in (rng.choice(items) for _ in range(batch_size)):
        frame_units = torch.repeat_interleave(units, durations)  # (T,) one unit per 20 ms frame
        start = rng.randint(0, max(len(frame_units) - segment_frames, 0))
        unit_crop = frame_units[start:start + segment_frames]
        wav_crop = wav[start * hop:(start + segment_frames) * hop]
        short = segment_frames - len(unit_crop)  # an utterance shorter than a segment: repeat its last unit, pad silence
        frames.append(F.pad(unit_crop, (0, short), value=int(unit_crop[-1])))
        audio.append(F.pad(wav_crop, (0, segment_frames * hop - len(wav_crop))))
    return torch.stack(frames), torch.stack(audio)


def train_vocoder(vocoder, dataset, steps, batch_size=4, segment_frames=16, lr=4e-3, min_lr=1e-4, seed=0,
                  warmup_steps=None, mel_weight=45.0, stft_weight=1.0, progress=True, log=None, device="cpu"):
    """Train the generator and duration predictor in place; return the per-step history (list of dicts).

    The defaults suit a few CPU minutes on half an hour of speech (tiny_data): a short run is limited
    by its number of steps, so it learns most from many small batches (4 crops of 0.32 s) of
    45 * mel L1 + MR-STFT at a high lr (4e-3) decayed along a cosine to 1e-4 (scripts/vocoder_schedules.py
    compares schedules). HiFi-GAN's adversarial phase (lr 2e-4, batch 16, 0.56 s segments, ~500k steps)
    pays off only in much longer runs, about 4x slower per step here.

    dataset: items (wav (T,) float at 16 kHz, units (N,) long deduplicated, durations (N,) frames,
        durations.sum() * 320 ~ T). Each step crops `segment_frames` frames per item at random.
    lr, min_lr: AdamW's learning rate at step 0, decayed along a cosine to min_lr at the last step (trainer.lr_at);
        min_lr=None keeps lr constant. Each record holds its step's lr.
    warmup_steps: steps trained on the reconstruction losses only (mel_weight * mel L1 + stft_weight * MR-STFT
        + durations) before HiFi-GAN's adversarial and feature-matching losses join; None = all steps
        (no discriminator). Optimisers: AdamW, betas (0.8, 0.99), as HiFi-GAN.
    log: called with each step's record, e.g. print. device: where to train (the module docstring).
    """
    device = resolve_device(device)  # an unavailable device fails here, before any work
    vocoder.to(device)
    hop = vocoder.config.code_hop_size
    warmup_steps = steps if warmup_steps is None else warmup_steps
    rng = random.Random(seed)
    torch.manual_seed(seed)
    items = [(wav.float(), units.long(), durations.long()) for wav, units, durations in dataset]
    optim_g = torch.optim.AdamW(vocoder.parameters(), lr, betas=(0.8, 0.99))
    discriminator = optim_d = None
    if warmup_steps < steps:
        discriminator = Discriminator(vocoder.config.discriminator_channels).to(device)
        optim_d = torch.optim.AdamW(discriminator.parameters(), lr, betas=(0.8, 0.99))
    vocoder.train()
    history, start = [], time.perf_counter()
    for step in tqdm(range(steps), desc="vocoder", disable=not progress):
        for group in optim_g.param_groups + (optim_d.param_groups if optim_d else []):
            group["lr"] = lr_at(step, steps, lr, min_lr=lr if min_lr is None else min_lr)  # cosine, or constant
        frames, real = _segments(items, batch_size, segment_frames, hop, rng)  # (B, S), (B, S * hop)
        frames, real = frames.to(device), real.to(device)
        fake = vocoder.decode(vocoder.dict(frames).transpose(1, 2))  # (B, S * hop)
        record = {"step": step + 1, "lr": optim_g.param_groups[0]["lr"]}
        if step >= warmup_steps:  # discriminator update on detached fakes
            real_scores, _ = discriminator(real)
            fake_scores, _ = discriminator(fake.detach())
            loss_d = discriminator_loss(real_scores, fake_scores)
            optim_d.zero_grad()
            loss_d.backward()
            optim_d.step()
            record["disc"] = loss_d.item()

        chosen = [items[i] for i in rng.sample(range(len(items)), min(batch_size, len(items)))]
        units, durations = [c[1].to(device) for c in chosen], [c[2].to(device) for c in chosen]
        losses = {"mel": mel_l1(fake, real), "dur": duration_loss(vocoder, units, durations)}
        loss = mel_weight * losses["mel"] + losses["dur"]
        if stft_weight:
            losses["stft"] = stft_loss(fake, real)
            loss = loss + stft_weight * losses["stft"]
        if step >= warmup_steps:
            fake_scores, fake_features = discriminator(fake)
            with torch.no_grad():
                _, real_features = discriminator(real)
            losses["adv"] = generator_adversarial_loss(fake_scores)
            losses["fm"] = feature_matching_loss(real_features, fake_features)
            loss = loss + losses["adv"] + 2 * losses["fm"]
        optim_g.zero_grad()
        loss.backward()
        optim_g.step()
        record.update({k: v.item() for k, v in losses.items()}, seconds=time.perf_counter() - start)
        history.append(record)
        if log is not None:
            log(record)
    vocoder.eval()
    return history


@torch.no_grad()
def evaluate_vocoder(vocoder, dataset):
    """Mean log-mel L1 (nats, `log_mel`) of whole utterances resynthesised with their true durations,
    on the vocoder's device."""
    vocoder.eval()
    device = next(vocoder.parameters()).device
    scores = []
    for wav, units, durations in dataset:
        fake = vocoder(units.long()[None].to(device), durations.long()[None].to(device))  # (1, frames * 320)
        real = F.pad(wav.float().to(device), (0, max(fake.shape[1] - len(wav), 0)))[None, :fake.shape[1]]
        scores.append(mel_l1(fake, real).item())
    return sum(scores) / len(scores)
