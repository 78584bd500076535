"""How HuBERT learns: masked prediction of k-means "teacher" clusters (Hsu et al., 2021).

    teacher:  mfcc_features (iteration 1) or an encoder layer (iteration 2) --k-means--> a cluster id per frame
    student:  span_mask hides frames behind the mask embedding; the encoder's last layer, projected,
              scores every cluster by cosine similarity; cross-entropy on the hidden frames
              (+ `unmasked_weight` x the visible ones) is `masked_prediction_loss`
    loop:     `pretrain` crops utterances, masks, and steps AdamW
    recipe:   `train_unit_encoder` runs the iterations from scratch (MFCC k-means targets, pretrain,
              k-means of a layer, pretrain again) and fits the unit k-means on the last encoder

The encoder itself, its pretraining head's parameters and `forward(..., mask=...)` are in hubert.py;
k-means and the units it gives are in units.py.
"""
import copy
import random

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .audio import deltas, mfcc
from .device import resolve_device
from .hubert import HuBERT, extract_features, frame_lengths, pad_batch, receptive_field
from .trainer import lr_at
from .units import fit_kmeans


def mfcc_features(wav, warp=1.0):
    """Iteration-1 targets' features: 13 MFCCs + deltas + delta-deltas at 50 Hz, frame-aligned with
    the conv extractor (window 400, hop 320, no centring: floor((T - 400) / 320) + 1 frames).
    warp: the filterbank's (audio.mel_filterbank). wav (T,) -> (T', 39)."""
    cep = mfcc(wav, hop_length=320, n_fft=400, center=False, warp=warp)  # (13, T')
    d1 = deltas(cep)
    return torch.cat([cep, d1, deltas(d1)], dim=0).T  # (T', 39)


def span_mask(n_frames, max_frames, start_prob, span, generator=None):
    """HuBERT/wav2vec 2.0 masking: round(start_prob * n) span starts per utterance, drawn without
    replacement from the real frames, each masking `span` frames (overlaps merge).
    n_frames (B,) -> (B, max_frames) bool."""
    mask = torch.zeros(len(n_frames), max_frames, dtype=torch.bool)
    for b, n in enumerate(n_frames.tolist()):
        n_starts = int(start_prob * n + torch.rand((), generator=generator))  # probabilistic rounding
        n_starts = min(max(n_starts, 1), max(n - span + 1, 1))
        starts = torch.randperm(max(n - span + 1, 1), generator=generator)[:n_starts]
        idx = (starts[:, None] + torch.arange(span)).clamp(max=n - 1)
        mask[b, idx.flatten()] = True
    return mask


def masked_prediction_loss(model, wav, sample_lengths, targets, generator=None):
    """HuBERT's loss: cross-entropy of cosine-similarity logits (/ temperature) between projected
    frames and per-cluster embeddings, on masked frames (+ `unmasked_weight` x unmasked ones).
    wav (B, T), sample_lengths (B,), targets (B, T') long, -100 at padding -> (loss, accuracy)."""
    if model.config.num_clusters == 0:
        raise ValueError("this HuBERT has no pretraining head: build it with num_clusters > 0")
    n_frames = frame_lengths(model.config, sample_lengths)
    mask = span_mask(n_frames, targets.shape[1], model.config.mask_start_prob, model.config.mask_length, generator)
    hidden, _ = model(wav, sample_lengths, mask=mask.to(wav.device))
    proj = F.normalize(model.final_proj(hidden[-1]), dim=-1)  # (B, T', final_dim)
    logits = proj @ F.normalize(model.label_embeddings, dim=-1).T / model.config.logit_temperature  # (B, T', K)
    real = targets >= 0
    losses = F.cross_entropy(logits[real], targets[real], reduction="none")  # (N,)
    masked = mask.to(wav.device)[real]
    loss = losses[masked].mean()
    if model.config.unmasked_weight > 0 and (~masked).any():
        loss = loss + model.config.unmasked_weight * losses[~masked].mean()
    accuracy = (logits[real].argmax(-1) == targets[real])[masked].float().mean()
    return loss, accuracy


def pretrain(model, wavs, targets, steps, lr=1e-3, batch_size=8, seed=0, max_frames=200, warmup=0.08,
             bf16=False, progress=True, device="cpu"):
    """Masked-prediction pretraining with AdamW, clip norm 10, lr warming up linearly over the first
    `warmup` share of the steps, then decaying linearly to 0 (trainer.lr_at).
    wavs: list of (T_i,) 16 kHz tensors; targets: list of (T_i',) long cluster ids, one per frame.
    Each step draws `batch_size` utterances and a random crop of at most `max_frames` frames.
    bf16: forward under bf16 autocast (device.fast_bfloat16 says where it is faster).
    device: where to train ("cpu", "cuda", "mps", "auto"; device.resolve_device): the model is
    moved there and stays there, each batch goes there. Returns the loss of every step."""
    device = resolve_device(device)
    for i, (wav, target) in enumerate(zip(wavs, targets)):
        n = int(frame_lengths(model.config, torch.tensor(len(wav))))
        if n != len(target):
            raise ValueError(f"utterance {i}: {len(target)} targets for {n} frames")
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)  # masks are drawn on the CPU
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    hop, window = model.config.downsampling, receptive_field(model.config)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="HuBERT pretraining", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup_steps=int(warmup * steps), decay="linear")
        crops, crop_targets = [], []
        for i in rng.sample(range(len(wavs)), min(batch_size, len(wavs))):
            start = rng.randint(0, max(0, len(targets[i]) - max_frames))
            n = min(max_frames, len(targets[i]) - start)
            crops.append(wavs[i][start * hop: (start + n - 1) * hop + window])  # exactly n frames
            crop_targets.append(targets[i][start: start + n])
        wav, lengths = pad_batch(crops)  # (B, T), (B,)
        target = torch.nn.utils.rnn.pad_sequence(crop_targets, batch_first=True, padding_value=-100)  # (B, T')
        wav, lengths, target = wav.to(device), lengths.to(device), target.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, accuracy = masked_prediction_loss(model, wav, lengths, target, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy.item():.2f}")
    model.eval()
    return losses


# ----------------------------------------------------------------------------- the recipe: iterations, then units

def kmeans_sample(wavs, seed=0, seconds=4000):
    """A seeded random subset of the waveforms, about `seconds` long in all (all of them if shorter)."""
    order = np.random.default_rng(seed).permutation(len(wavs))
    total, chosen = 0, []
    for i in order:
        if total >= seconds * 16000:
            break
        chosen.append(wavs[i])
        total += len(wavs[i])
    return chosen


def train_unit_encoder(wavs, config, n_units=100, steps=(700,), target_layer=0, unit_layer=1, lr=2e-3,
                       batch_size=8, max_frames=64, warm_start=False, seed=0, bf16=False, progress=True,
                       device="cpu"):
    """HuBERT's iterations from scratch (one per entry of `steps`), then the unit quantiser.

    1. k-means (n_units) on MFCC frames -> targets; pretrain encoder 1 (masked prediction).
    2. (if `steps` has a second entry) k-means on encoder 1's `target_layer` -> targets; pretrain
       encoder 2 (fresh as in the paper, or continuing from encoder 1 with `warm_start`).
    3. k-means on the last encoder's `unit_layer`: the units.
    The defaults are the best setting measured on tiny_data within a few CPU minutes: one iteration
    of 700 steps on short crops (64 frames, 1.3 s) gives units with more phone information than two
    iterations of 100 steps on 150-frame crops, at more cost (scripts/measure_units.py; README,
    "Speech to units", has both times).
    wavs: list of (T_i,) 16 kHz tensors; config: a HubertConfig with num_clusters = n_units.
    bf16: pretrain under bf16 autocast (see `pretrain`).
    device: where the encoders train and run (see `pretrain`); MFCCs and k-means stay on the CPU.
    Returns dict: encoder (the last iteration's), layer, kmeans, and iteration1, mfcc_kmeans, losses for study;
    the encoders are on `device`, the k-means on the CPU.
    """
    device = resolve_device(device)  # an unavailable device fails here, before any work
    torch.manual_seed(seed)
    mfccs = [mfcc_features(w) for w in wavs]
    mfcc_kmeans = fit_kmeans(mfccs, n_units, seed)
    models, losses, targets = [], [], [mfcc_kmeans.assign(f) for f in mfccs]
    for iteration, n_steps in enumerate(steps):
        if iteration > 0:  # the next targets: clusters of the previous encoder's `target_layer`
            features = extract_features(models[-1], wavs, target_layer, progress=progress)
            target_kmeans = fit_kmeans(features, n_units, seed)
            targets = [target_kmeans.assign(f) for f in features]
        model = copy.deepcopy(models[-1]) if warm_start and models else HuBERT(config)
        losses.append(pretrain(model, wavs, targets, n_steps, lr, batch_size, seed + iteration, max_frames, bf16=bf16,
                               progress=progress, device=device))
        models.append(model)
    sample = kmeans_sample(wavs, seed)  # k-means fits on 50,000 frames: encoding every utterance would be wasted
    kmeans = fit_kmeans(extract_features(models[-1], sample, unit_layer, progress=progress), n_units, seed)
    return {"encoder": models[-1], "layer": unit_layer, "kmeans": kmeans, "iteration1": models[0],
            "mfcc_kmeans": mfcc_kmeans, "losses": losses}
