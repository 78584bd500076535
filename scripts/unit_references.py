"""How high can PNMI go on the held-out voice? References beside the MFCC baseline.

measure_units.py fits k-means (K units) on frames of the training voices and scores the units of
the held-out voice (`test_unseen_voice`) against its festival phone alignments. This script puts
references on the same scale, to say what "MFCC + 0.10" asks for on this voice:

1. MFCC k-means fit on the held-out voice's own frames: MFCC with no mismatch of voice.
2. Supervised phone classifiers trained on the phone labels of the aligned training voices (16 min),
   with two spans of context:
   - local: an MLP on 39-d MFCCs with 10 frames on each side (0.42 s);
   - the whole utterance: a two-layer bidirectional GRU over the MFCC frames.
   Their units are k-means of the last hidden layer, fit on training frames as for every other row;
   their argmax phones are scored too. Each is trained once per seed.

    python scripts/unit_references.py --data tiny_data --threads 1
"""
import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from measure_units import load_split, score
from speechgpt_min.hubert_training import mfcc_features
from speechgpt_min.units import frame_phones, read_segs, score_units


class LocalClassifier(nn.Module):
    """An MLP on a window of frames: (B, T, 39) -> (B, T, phones), each frame with `context` frames
    on each side (padding frames of a batch see zeros, real frames see their own utterance)."""

    def __init__(self, n_phones, context=10, dim=39):
        super().__init__()
        self.context = context
        self.body = nn.Sequential(nn.Dropout(0.2), nn.Linear((2 * context + 1) * dim, 512), nn.ReLU(), nn.Dropout(0.3),
                                  nn.Linear(512, 256), nn.ReLU())
        self.out = nn.Sequential(nn.Dropout(0.3), nn.Linear(256, n_phones))

    def hidden(self, x):
        windows = F.pad(x, (0, 0, self.context, self.context)).unfold(1, 2 * self.context + 1, 1)  # (B, T, D, W)
        return self.body(windows.transpose(2, 3).flatten(2))  # (B, T, 256)

    def forward(self, x):
        return self.out(self.hidden(x))


class UtteranceClassifier(nn.Module):
    """A two-layer bidirectional GRU: every frame sees the whole utterance. (B, T, 39) -> (B, T, phones)."""

    def __init__(self, n_phones, dim=39, width=128):
        super().__init__()
        self.inp = nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Dropout(0.3))
        self.gru = nn.GRU(width, width, num_layers=2, batch_first=True, bidirectional=True, dropout=0.3)
        self.top = nn.Sequential(nn.Dropout(0.3), nn.Linear(2 * width, 256), nn.ReLU())
        self.out = nn.Sequential(nn.Dropout(0.3), nn.Linear(256, n_phones))

    def hidden(self, x):
        return self.top(self.gru(self.inp(x))[0])  # (B, T, 256)

    def forward(self, x):
        return self.out(self.hidden(x))


def train_classifier(model, inputs, labels, epochs, lr, batch_size=16):
    """AdamW on batches of whole utterances. inputs: list of (T_i, 39), labels: list of (T_i,) long."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(inputs)).split(batch_size):
            x = nn.utils.rnn.pad_sequence([inputs[i] for i in batch], batch_first=True)  # (B, T, 39)
            y = nn.utils.rnn.pad_sequence([labels[i] for i in batch], batch_first=True, padding_value=-100)
            loss = F.cross_entropy(model(x).transpose(1, 2), y, ignore_index=-100)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("tiny_data"), help="directory with manifest.jsonl")
    parser.add_argument("--k", type=int, default=100, help="number of units (k-means clusters)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one classifier of each kind per seed")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs of each classifier")
    parser.add_argument("--kmeans-utterances", type=int, default=300,
                        help="fit the MFCC baseline's k-means on this many train utterances, as measure_units.py")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t_start = time.time()
    train, train_paths = load_split(args.data, {"train"})
    test, test_paths = load_split(args.data, {"test_unseen_voice"}, aligned_only=True)
    train_mfcc = [mfcc_features(w) for w in train]
    aligned_mfcc = [f for f, path in zip(train_mfcc, train_paths) if path]  # the voices with phone alignments
    aligned_paths = [path for path in train_paths if path]
    test_mfcc = [mfcc_features(w) for w in test]
    subset = sorted(random.Random(0).sample(range(len(train)), min(args.kmeans_utterances, len(train))))
    print(f"train {len(train)} utterances ({len(aligned_mfcc)} with phone alignments), held-out voice {len(test)}")

    rows = [score("MFCC, k-means fit on the training voices (the baseline)", [train_mfcc[i] for i in subset],
                  test_mfcc, test_paths, args.k, 0)[0],
            score("MFCC, k-means fit on the held-out voice itself", test_mfcc, test_mfcc, test_paths, args.k, 0)[0]]

    frame_labels = [frame_phones(read_segs(p), len(f)) for p, f in zip(aligned_paths, aligned_mfcc)]
    phones = sorted({p for labels in frame_labels for p in labels})
    labels = [torch.tensor([phones.index(p) for p in frames]) for frames in frame_labels]
    all_frames = torch.cat(aligned_mfcc)
    mean, std = all_frames.mean(0), all_frames.std(0) + 1e-5
    inputs = [(f - mean) / std for f in aligned_mfcc]
    test_inputs = [(f - mean) / std for f in test_mfcc]
    truth = [frame_phones(read_segs(p), len(f)) for p, f in zip(test_paths, test_mfcc)]
    kinds = {"local (MLP, +-10 frames)": (LocalClassifier, 1e-3), "whole utterance (BiGRU)": (UtteranceClassifier, 2e-3)}
    for kind, (cls, lr) in kinds.items():
        for seed in args.seeds:
            t0 = time.time()
            torch.manual_seed(seed)
            model = train_classifier(cls(len(phones)), inputs, labels, args.epochs, lr)
            with torch.inference_mode():
                row, _ = score(f"supervised {kind}, k-means of its hidden layer (seed {seed})",
                               [model.hidden(x[None])[0] for x in inputs],
                               [model.hidden(x[None])[0] for x in test_inputs], test_paths, args.k, seed)
                guesses = [model(x[None])[0].argmax(-1) for x in test_inputs]
            accuracy = np.mean([phones[g] == t for guess, frames in zip(guesses, truth)
                                for g, t in zip(guess.tolist(), frames)])
            rows.append(row)
            rows.append({"features": f"supervised {kind}, its argmax phone (seed {seed}; frame accuracy {accuracy:.3f})",
                         **score_units(guesses, test_paths), "used": len(torch.unique(torch.cat(guesses)))})
            print(f"{kind}, seed {seed}: {time.time() - t0:.0f} s")

    print(f"\ntotal {time.time() - t_start:.0f} s; PNMI etc. on the held-out voice ({len(phones)} training phones)\n")
    print("| units | PNMI | phone purity | cluster purity | units used |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['features']} | {r['pnmi']:.3f} | {r['phone_purity']:.3f} | {r['cluster_purity']:.3f} | {r['used']} |")


if __name__ == "__main__":
    main()
