"""Which vocoder training schedule speaks most intelligibly within the toy run's budget?

Trains a fresh toy vocoder per schedule on a run's real units (the train split, built exactly as
train.py's vocoder step builds it) and scores it on the 40 held-out test sentences: log-mel L1
with the true durations (`vocoder.mel_l1` in train.py), Whisper tiny.en WER of the vocoded speech
with predicted durations (`vocoder.whisper_wer_vocoded`) and with the true durations, and the
training time (wall clock, and CPU time, which other processes on a busy machine inflate less).
One line of JSON per schedule goes to --results (schedules already there are skipped, so an
interrupted search resumes); a markdown table is printed at the end.

    python train.py --stage units --out runs/voc       # the run's units (HuBERT + k-means), ~4 min
    python scripts/vocoder_schedules.py --run runs/voc --threads 1
    python scripts/vocoder_schedules.py --run runs/voc --schedules old-default 4x16-4e-3-cos --threads 1

Run one search at a time, with --threads at most the free cores: oversubscribed torch is 5-20x slower.
"""
import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from speechgpt_min.data import in_split  # noqa: E402
from speechgpt_min.evaluate import whisper_available, whisper_transcribe, word_error_rate  # noqa: E402
from speechgpt_min.vocoder import UnitVocoder, VocoderConfig  # noqa: E402
from speechgpt_min.vocoder_training import evaluate_vocoder, train_vocoder, vocoder_items  # noqa: E402
from speechgpt_min.data import load_manifest  # noqa: E402
from speechgpt_min.units import read_run_units  # noqa: E402

# name -> train_vocoder keyword arguments. "BxS" = batch_size x segment_frames (20 ms frames).
# "generator": overrides of the toy VocoderConfig. The toy generator's multi-receptive-field blocks have
# two kernels, (3, 7) ("k37" schedules); the others ran on its first version, with HiFi-GAN's three.
MRF_3_7_11 = dict(resblock_kernel_sizes=(3, 7, 11), resblock_dilation_sizes=((1, 3, 5),) * 3)
COSINE = dict(steps=400, batch_size=4, segment_frames=16, lr=4e-3, min_lr=1e-4)  # what the schedules vary
SCHEDULES = {
    "old-default": dict(COSINE, generator=MRF_3_7_11, steps=300, lr=1e-3, min_lr=None),
    "4x16-2e-3-cos": dict(COSINE, generator=MRF_3_7_11, lr=2e-3),
    "4x16-4e-3-cos": dict(COSINE, generator=MRF_3_7_11),
    "8x32-2e-3-cos": dict(COSINE, generator=MRF_3_7_11, steps=130, batch_size=8, segment_frames=32, lr=2e-3),
    "4x16-4e-3-cos-stft0": dict(COSINE, generator=MRF_3_7_11, stft_weight=0.0),
    "4x16-4e-3-cos-600": dict(COSINE, generator=MRF_3_7_11, steps=600),
    "2x16-4e-3-cos": dict(COSINE, generator=MRF_3_7_11, steps=600, batch_size=2),
    "c64-4x16-4e-3-cos": dict(COSINE, generator=dict(MRF_3_7_11, upsample_initial_channel=64)),
    "k37-4x16-4e-3-cos": dict(COSINE),
    "k37-4x16-4e-3-cos-600": dict(COSINE, steps=600),
    "k37-4x16-4e-3-cos-3000": dict(COSINE, steps=3000),
}


@torch.inference_mode()
def speak(vocoder, items, true_durations):
    """Vocode each item's units, with its true durations or the predicted ones: list of (T,) waveforms."""
    return [vocoder(u[None], d[None] if true_durations else None)[0] for _, u, d in items]


def load_items(run, data, split):
    """train.py's vocoder items (wav, units, durations) of one split (test: its sentences), their texts, and K."""
    rows = [r for r in in_split(load_manifest(data / "manifest.jsonl"), split)
            if split == "train" or r.get("kind", "sent") == "sent"]
    units, durations, n_units = read_run_units(run)
    return vocoder_items(data, rows, units, durations), [r["text"] for r in rows], n_units


def new_vocoder(n_units, generator=None):
    """A toy vocoder for the run's K units, with the schedule's generator overrides (a dict or None)."""
    return UnitVocoder(VocoderConfig.from_preset("toy", num_embeddings=n_units, **(generator or {})))


def train_schedule(kwargs, run, data, threads, seed):
    """Train a fresh toy vocoder -> (its state dict, wall seconds, CPU seconds, last-20-steps train mel L1)."""
    torch.set_num_threads(threads)
    train_items, _, n_units = load_items(run, data, "train")
    torch.manual_seed(seed)
    train_kwargs = {k: v for k, v in kwargs.items() if k != "generator"}
    vocoder = new_vocoder(n_units, kwargs.get("generator"))
    start, cpu_start = time.perf_counter(), time.process_time()
    history = train_vocoder(vocoder, train_items, seed=seed, progress=False, **train_kwargs)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return vocoder.state_dict(), seconds, cpu_seconds, sum(h["mel"] for h in history[-20:]) / len(history[-20:])


def run_schedule(name, kwargs, args, test_items, texts, n_units):
    # Training runs in a fresh process: once Whisper (CTranslate2) has run in a process, torch
    # training in that process was 3.7x slower here (CPU time 485 s instead of 130 s).
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        state, seconds, cpu_seconds, train_mel = pool.submit(
            train_schedule, kwargs, args.run, args.data, args.threads, args.seed).result()
    vocoder = new_vocoder(n_units, kwargs.get("generator"))
    vocoder.load_state_dict(state)
    vocoder.eval()
    result = {"schedule": name, **kwargs, "train_seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
              "audio_seen_minutes": round(kwargs["steps"] * kwargs["batch_size"] * kwargs["segment_frames"] / 50 / 60, 1),
              "final_train_mel": round(train_mel, 4), "mel_l1": round(evaluate_vocoder(vocoder, test_items), 4)}
    for key, true_durations in (("wer_vocoded", False), ("wer_true_durations", True)):
        result[key] = round(word_error_rate(texts, whisper_transcribe(speak(vocoder, test_items, true_durations),
                                                                      progress=False)), 4)
    return result


def table(results):
    lines = ["| schedule | steps | batch x frames | lr | audio seen | train s (CPU s) | mel L1 | WER vocoded | WER true durations |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lr = f"{r['lr']:g}" + (f" -> {r['min_lr']:g}" if r.get("min_lr") is not None else "")
        extras = [f"{k} {r[k]:g}" for k in ("mel_weight", "stft_weight", "warmup_steps") if r.get(k) is not None]
        lines.append(f"| {r['schedule']}{' (' + ', '.join(extras) + ')' if extras else ''} | {r['steps']} | "
                     f"{r['batch_size']} x {r['segment_frames']} | {lr} | {r['audio_seen_minutes']} min | "
                     f"{r['train_seconds']:.0f} ({r['cpu_seconds']:.0f}) | {r['mel_l1']:.3f} | {r['wer_vocoded']:.2f} | {r['wer_true_durations']:.2f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="run directory with units.jsonl (train.py --stage units)")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parent.parent / "tiny_data",
                        help="corpus directory (default: tiny_data/)")
    parser.add_argument("--schedules", nargs="+", choices=sorted(SCHEDULES), default=list(SCHEDULES),
                        help="which schedules to train (default: all, in table order)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--results", type=Path, default=None,
                        help="JSON lines, one per schedule; existing ones are skipped (default: RUN/vocoder_schedules.jsonl)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args()
    if not whisper_available():
        parser.error("Whisper is not installed; the schedules are scored by its WER: pip install -e '.[eval]'")
    if not (args.run / "units.jsonl").is_file():
        parser.error(f"--run {args.run}: no units.jsonl there (make it with train.py --stage units --out {args.run})")
    torch.set_num_threads(args.threads)
    results_path = args.results or args.run / "vocoder_schedules.jsonl"

    test_items, texts, n_units = load_items(args.run, args.data, "test")
    print(f"{len(test_items)} test sentences, {n_units} units, {args.threads} training thread(s)")
    original_wer = word_error_rate(texts, whisper_transcribe([w for w, _, _ in test_items], progress=False))
    print(f"Whisper WER of the original test audio: {original_wer:.2f}")

    done = {}
    if results_path.exists():
        done = {r["schedule"]: r for r in map(json.loads, results_path.read_text().splitlines()) if r["threads"] == args.threads}
    for name in args.schedules:
        if name in done:
            continue
        print(f"training {name}: {SCHEDULES[name]}", flush=True)
        result = run_schedule(name, SCHEDULES[name], args, test_items, texts, n_units)
        result["threads"] = args.threads
        print(json.dumps(result), flush=True)
        done[name] = result
        with open(results_path, "a") as f:
            f.write(json.dumps(result) + "\n")
    print(f"\nWhisper WER of the original audio: {original_wer:.2f}\n")
    print(table([done[n] for n in args.schedules]))


if __name__ == "__main__":
    main()
