"""How high can PNMI go on the held-out voice? Two references beside the MFCC baseline.

measure_units.py fits k-means (K units) on frames of the training voices and scores the units of
the held-out voice (`test_unseen_voice`) against its festival phone alignments. This script puts
two references on the same scale, to say what "MFCC + 0.10" asks for on this voice:

1. MFCC k-means fit on the held-out voice's own frames: MFCC with no mismatch of voice.
2. A supervised phone classifier: an MLP on 39-d MFCCs with 10 frames of context on each side,
   trained on the phone labels of the aligned training voices. Its units are k-means of its last
   hidden layer, fit on training frames as for every other row; its argmax phone is scored too.
   It is trained once per seed.

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
from speechgpt_min.hubert import mfcc_features
from speechgpt_min.units import frame_phones, read_segs, score_units


def with_context(features, context):
    """Each frame beside its `context` neighbours on both sides, edges repeated.
    (T, D) -> (T, (2 * context + 1) * D)."""
    padded = torch.cat([features[:1].expand(context, -1), features, features[-1:].expand(context, -1)])
    return torch.cat([padded[i: i + len(features)] for i in range(2 * context + 1)], dim=1)


def train_phone_classifier(inputs, labels, n_phones, seed, epochs=6, batch_size=256):
    """MLP (D -> 512 -> 256 -> phones, ReLU, dropout) trained with AdamW on frames.
    inputs (N, D) normalised, labels (N,) long -> the model, in eval mode."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Dropout(0.2), nn.Linear(inputs.shape[1], 512), nn.ReLU(), nn.Dropout(0.3),
                          nn.Linear(512, 256), nn.ReLU(), nn.Dropout(0.3), nn.Linear(256, n_phones))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    for _ in range(epochs):
        for batch in torch.randperm(len(inputs)).split(batch_size):
            loss = F.cross_entropy(model(inputs[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("tiny_data"), help="directory with manifest.jsonl")
    parser.add_argument("--k", type=int, default=100, help="number of units (k-means clusters)")
    parser.add_argument("--context", type=int, default=10, help="frames of context on each side for the classifier")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one classifier per seed")
    parser.add_argument("--kmeans-utterances", type=int, default=300,
                        help="fit the MFCC baseline's k-means on this many train utterances, as measure_units.py")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t_start = time.time()
    train, _ = load_split(args.data, {"train"})
    aligned, aligned_paths = load_split(args.data, {"train"}, aligned_only=True)
    test, test_paths = load_split(args.data, {"test_unseen_voice"}, aligned_only=True)
    train_mfcc = [mfcc_features(w) for w in train]
    aligned_mfcc = [mfcc_features(w) for w in aligned]
    test_mfcc = [mfcc_features(w) for w in test]
    subset = sorted(random.Random(0).sample(range(len(train)), min(args.kmeans_utterances, len(train))))
    print(f"train {len(train)} utterances ({len(aligned)} with phone alignments), held-out voice {len(test)}")

    rows = [score("MFCC, k-means fit on the training voices (the baseline)", [train_mfcc[i] for i in subset],
                  test_mfcc, test_paths, args.k, 0)[0],
            score("MFCC, k-means fit on the held-out voice itself", test_mfcc, test_mfcc, test_paths, args.k, 0)[0]]

    frame_labels = [frame_phones(read_segs(p), len(f)) for p, f in zip(aligned_paths, aligned_mfcc)]
    phones = sorted({p for labels in frame_labels for p in labels})
    labels = torch.tensor([phones.index(p) for frames in frame_labels for p in frames])
    inputs = torch.cat([with_context(f, args.context) for f in aligned_mfcc])
    mean, std = inputs.mean(0), inputs.std(0) + 1e-5
    test_inputs = [(with_context(f, args.context) - mean) / std for f in test_mfcc]
    for seed in args.seeds:
        t0 = time.time()
        model = train_phone_classifier((inputs - mean) / std, labels, len(phones), seed)
        hidden = model[:-1]  # up to the last hidden layer (256-d)
        with torch.inference_mode():
            guesses = [model(x).argmax(1) for x in test_inputs]
            row, _ = score(f"supervised classifier, k-means of its hidden layer (seed {seed})",
                           [hidden((with_context(f, args.context) - mean) / std) for f in aligned_mfcc],
                           [hidden(x) for x in test_inputs], test_paths, args.k, seed)
        truth = [frame_phones(read_segs(p), len(g)) for p, g in zip(test_paths, guesses)]
        accuracy = np.mean([phones[g] == t for guess, frames in zip(guesses, truth) for g, t in zip(guess.tolist(), frames)])
        rows.append(row)
        rows.append({"features": f"supervised classifier, its argmax phone (seed {seed}; frame accuracy {accuracy:.3f})",
                     **score_units(guesses, test_paths), "used": len(torch.unique(torch.cat(guesses)))})
        print(f"seed {seed}: {time.time() - t0:.0f} s")

    print(f"\ntotal {time.time() - t_start:.0f} s; PNMI etc. on the held-out voice ({len(phones)} training phones)\n")
    print("| units | PNMI | phone purity | cluster purity | units used |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['features']} | {r['pnmi']:.3f} | {r['phone_purity']:.3f} | {r['cluster_purity']:.3f} | {r['used']} |")


if __name__ == "__main__":
    main()
