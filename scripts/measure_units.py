"""How much phone information do speech units keep? PNMI of k-means units on tiny_data.

Fits k-means (K units) on the train split's frames and scores the units of the held-out voice
(`test_unseen_voice`) against its festival phone alignments, for: MFCC features (39-d), every
layer of a HuBERT encoder pretrained one iteration on MFCC targets, and (given two `--steps`)
every layer of a second iteration pretrained on iteration-1 targets. Prints a markdown table.

    python scripts/measure_units.py --data tiny_data --threads 1
"""
import argparse
import json
import random
import time
from pathlib import Path

import torch

from speechgpt_min.audio import load_audio
from speechgpt_min.hubert import HuBERT, HubertConfig, extract_features, frame_lengths, pad_batch
from speechgpt_min.hubert_training import mfcc_features, pretrain
from speechgpt_min.units import fit_kmeans, score_units


def load_split(data, splits, aligned_only=False):
    rows = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["split"] in splits and (r["alignment"] or not aligned_only)]
    if not rows:
        raise SystemExit(f"{data}/manifest.jsonl has no utterances in split(s) {splits}")
    wavs = [load_audio(data / r["audio"]) for r in rows]
    return wavs, [data / r["alignment"] if r["alignment"] else None for r in rows]


@torch.inference_mode()
def all_layers(model, wavs, batch_size=16):
    """Features of every layer in one pass: -> list over layers of lists of (T_i', D)."""
    model.eval()
    out = [[None] * len(wavs) for _ in range(model.config.num_hidden_layers + 1)]
    order = sorted(range(len(wavs)), key=lambda i: len(wavs[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        wav, lengths = pad_batch([wavs[i] for i in idx])
        hidden, _ = model(wav, lengths)
        n_frames = frame_lengths(model.config, lengths)
        for layer, h in enumerate(hidden):
            for j, i in enumerate(idx):
                out[layer][i] = h[j, : n_frames[j]].clone()
    return out


def score(name, train_feats, test_feats, aligns, k, seed):
    t0 = time.time()
    kmeans = fit_kmeans(train_feats, k, seed)
    units = [kmeans.assign(f) for f in test_feats]
    q = score_units(units, aligns)
    used = len(torch.unique(torch.cat(units)))
    return {"features": name, **q, "used": used, "seconds": time.time() - t0}, kmeans


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("tiny_data"), help="directory with manifest.jsonl")
    parser.add_argument("--k", type=int, default=100, help="number of units (k-means clusters)")
    parser.add_argument("--preset", default="toy", help="HuBERT preset to pretrain")
    parser.add_argument("--steps", type=int, nargs="+", default=[700], metavar="STEPS",
                        help="pretraining steps of iteration 1 [and iteration 2]; the toy default is one iteration")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-frames", type=int, default=64, help="crop length in pretraining (50 Hz frames)")
    parser.add_argument("--target-layer", type=int, default=None,
                        help="iteration-1 layer whose clusters are iteration 2's targets (default: best valid PNMI)")
    parser.add_argument("--warm-start", action="store_true", help="start iteration 2 from iteration 1's weights")
    parser.add_argument("--kmeans-utterances", type=int, default=300,
                        help="fit k-means on the frames of this many train utterances (a random subset)")
    parser.add_argument("--config", type=json.loads, default={}, metavar="JSON",
                        help='HubertConfig fields to change, e.g. \'{"conv_dim": [128, 128, 128, 128, 128, 128, 128]}\'')
    parser.add_argument("--bf16", action="store_true", help="pretrain under bf16 autocast (fast on CPUs with AMX)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if len(args.steps) > 2:
        parser.error("--steps takes one or two numbers (iteration 1 [iteration 2])")
    try:
        config = HubertConfig.from_preset(args.preset, **{**args.config, "num_clusters": args.k})
    except (TypeError, ValueError) as error:
        parser.error(f"--preset/--config: {error}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    t_start = time.time()
    train, _ = load_split(args.data, {"train"})
    fit_subset = sorted(random.Random(args.seed).sample(range(len(train)), min(args.kmeans_utterances, len(train))))
    valid, valid_aligns = load_split(args.data, {"valid"}, aligned_only=True)
    test, test_aligns = load_split(args.data, {"test_unseen_voice"}, aligned_only=True)
    print(f"train {len(train)} utterances ({sum(len(w) for w in train) / 16000:.0f} s), valid (aligned) "
          f"{len(valid)}, test_unseen_voice {len(test)}; loaded in {time.time() - t_start:.1f} s")

    rows, timing = [], {}
    mfcc = [[mfcc_features(w) for w in ws] for ws in (train, valid, test)]
    row, mfcc_kmeans = score("MFCC (39-d)", [mfcc[0][i] for i in fit_subset], mfcc[2], test_aligns, args.k, args.seed)
    rows.append(dict(row, valid=score_units([mfcc_kmeans.assign(f) for f in mfcc[1]], valid_aligns)["pnmi"]))
    targets = [mfcc_kmeans.assign(f) for f in mfcc[0]]

    model = None
    for iteration, steps in enumerate(args.steps, start=1):
        t0 = time.time()
        if model is None or not args.warm_start:
            model = HuBERT(config)
        if iteration == 1:
            print(f"HuBERT {args.preset}: {model.num_parameters() / 1e6:.2f} M parameters")
        losses = pretrain(model, train, targets, steps, args.lr, args.batch_size, args.seed + iteration,
                          max_frames=args.max_frames, bf16=args.bf16)
        timing[f"pretrain {iteration}"] = time.time() - t0
        print(f"iteration {iteration}: loss {sum(losses[:10]) / 10:.3f} -> {sum(losses[-10:]) / 10:.3f} "
              f"in {timing[f'pretrain {iteration}']:.0f} s")
        t0 = time.time()
        fit, val, tst = (all_layers(model, ws) for ws in ([train[i] for i in fit_subset], valid, test))
        best, kmeans_of = (-1.0, None), {}
        for layer in range(config.num_hidden_layers + 1):
            row, kmeans_of[layer] = score(f"HuBERT it{iteration} L{layer}", fit[layer], tst[layer], test_aligns,
                                          args.k, args.seed)
            row["valid"] = score_units([kmeans_of[layer].assign(f) for f in val[layer]], valid_aligns)["pnmi"]
            rows.append(row)
            best = max(best, (row["valid"], layer))
        if iteration == 1 and len(args.steps) == 2:
            layer = best[1] if args.target_layer is None else args.target_layer
            targets = [kmeans_of[layer].assign(f) for f in extract_features(model, train, layer, batch_size=16)]
            print(f"iteration 2 targets: k-means of iteration-1 layer {layer}")
        timing[f"features+k-means {iteration}"] = time.time() - t0

    print(f"\ntotal {time.time() - t_start:.0f} s; " + ", ".join(f"{k} {v:.0f} s" for k, v in timing.items()))
    print(f"\nK={args.k}; k-means fit on train frames; PNMI etc. on test_unseen_voice (valid PNMI picks layers)\n")
    print("| features | PNMI | phone purity | cluster purity | units used | valid PNMI |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['features']} | {r['pnmi']:.3f} | {r['phone_purity']:.3f} | {r['cluster_purity']:.3f} "
              f"| {r['used']} | {r['valid']:.3f} |")


if __name__ == "__main__":
    main()
