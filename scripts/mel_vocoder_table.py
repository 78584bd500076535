"""What makes speech units intelligible after a minute of training? The README's vocoder table.

Trains mel vocoders (mel_vocoder.py) on a run's units, each setting a change to the vocoder step as
train.py ran it for that run (the run's settings.json: vocoder preset, training steps, answer
voice), and scores each on the held-out utterances of the answer voice (the test split: its answers,
questions and sentences) as train.py's eval step does: Whisper tiny.en WER of the speech made from
their units with predicted durations (`vocoder.whisper_wer`) and with the true ones, log-mel L1,
real-time factor, and training time. Three references need no training: the original audio, its
own log-mel through Griffin-Lim (what the spectrogram -> waveform step costs), and a lookup table
(each unit's mean log-mel over the training speech: units without context).

    python train.py --stage units --out runs/voc       # the run's units (HuBERT + k-means), ~4 min
    python scripts/mel_vocoder_table.py --run runs/voc --threads 1
    python scripts/mel_vocoder_table.py --run runs/voc --settings toy all-voices --seeds 0 1 2
    python scripts/mel_vocoder_table.py --run runs/voc --settings toy --griffin-lim-sweep 0 1 2 4 8 16 32 64

Run one at a time, with --threads at most the free cores: oversubscribed torch is 5-20x slower.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from speechgpt_min.data import in_split  # noqa: E402
from speechgpt_min.evaluate import evaluate_vocoder_speech, whisper_available, whisper_wer  # noqa: E402
from speechgpt_min.mel_vocoder import MelVocoder, MelVocoderConfig  # noqa: E402
from speechgpt_min.vocoder_training import train_mel_vocoder, vocoder_items  # noqa: E402
from speechgpt_min.data import load_manifest  # noqa: E402
from speechgpt_min.units import read_run_units  # noqa: E402

# name -> changes to the run's vocoder step: "config" (MelVocoderConfig fields), "train"
# (train_mel_vocoder arguments), "all_voices" (train on every voice's training speech, not one).
SETTINGS = {
    "toy": {},                                                    # the run's own vocoder step, unchanged
    "fewer-steps": {"train": {"steps": 600}},
    "200x16": {"train": {"steps": 200, "batch_size": 16}},        # about the same audio in fewer, larger batches
    "wider": {"config": {"channels": 256, "dur_hidden_dim": 256}, "train": {"steps": 800}},  # the same time, wider
    "no-encoder": {"config": {"encoder_layers": 0, "decoder_dilations": (1, 2, 4, 8, 1, 2)}},  # context per frame only
    "all-voices": {"all_voices": True},                           # every voice's training speech, not one voice's
}


def read_run_settings(run):
    """The settings train.py wrote for the run (settings.json): its vocoder step is the baseline here."""
    path = run / "settings.json"
    if not path.is_file():
        raise SystemExit(f"--run {run}: no settings.json there (train.py writes it at every start)")
    return json.loads(path.read_text())


def load(args, voice):
    """The answer voice's held-out items and texts, the training items (that voice's, or every voice's),
    and K, as train.py's vocoder and eval steps build them."""
    rows = load_manifest(args.data / "manifest.jsonl")
    units, durations, n_units = read_run_units(args.run)
    held_out = [r for r in in_split(rows, args.split) if r["voice"] == voice]
    train_rows = in_split(rows, "train")
    train = {"voice": vocoder_items(args.data, [r for r in train_rows if r["voice"] == voice], units, durations)}
    if any(SETTINGS[name].get("all_voices") for name in args.settings):
        train["all"] = vocoder_items(args.data, train_rows, units, durations)
    return vocoder_items(args.data, held_out, units, durations), [r["text"] for r in held_out], train, n_units


def cut(wav, durations, hop=320):
    """The waveform cut or zero-padded to its units' length: (durations.sum() * hop,)."""
    samples = int(durations.sum()) * hop
    return F.pad(wav, (0, max(samples - len(wav), 0)))[:samples]


@torch.inference_mode()
def references(args, held_out, texts, train_items, n_units):
    """Whisper WER of the original audio, of its log-mel through Griffin-Lim, and of a lookup table."""
    vocoder = MelVocoder(MelVocoderConfig.from_preset(args.run_settings["vocoder_preset"], num_embeddings=n_units,
                                                      **iters(args)))
    true_mel = [vocoder.mel_to_wave(vocoder.log_mel(cut(w, d))[:, :-1]) for w, _, d in held_out]
    sums, counts = torch.zeros(n_units, vocoder.config.n_mels), torch.zeros(n_units)
    for wav, units, durations in train_items:  # each unit's mean log-mel over the mel frames it spans
        mel_units = torch.repeat_interleave(units, durations * vocoder.config.mel_frames_per_unit)  # (2T,)
        sums.index_add_(0, mel_units, vocoder.log_mel(cut(wav, durations))[:, :-1].T)
        counts.index_add_(0, mel_units, torch.ones(len(mel_units)))
    table = sums / counts.clamp(min=1)[:, None]  # (K, n_mels); unseen units stay at 0
    lookup = [vocoder.mel_to_wave(table[torch.repeat_interleave(u, d * vocoder.config.mel_frames_per_unit)].T)
              for _, u, d in held_out]
    return {"original": whisper_wer(texts, [w for w, _, _ in held_out], progress=False),
            "true log-mel -> Griffin-Lim": whisper_wer(texts, true_mel, progress=False),
            "lookup table (true durations)": whisper_wer(texts, lookup, progress=False)}


def iters(args):
    return {} if args.griffin_lim_iters is None else {"griffin_lim_iters": args.griffin_lim_iters}


def run_setting(name, seed, args, held_out, texts, train, n_units):
    setting = SETTINGS[name]
    config = MelVocoderConfig.from_preset(args.run_settings["vocoder_preset"], num_embeddings=n_units,
                                          **setting.get("config", {}), **iters(args))
    torch.manual_seed(seed)
    vocoder = MelVocoder(config)
    schedule = {**args.run_settings["vocoder"], **setting.get("train", {})}
    start, cpu_start = time.perf_counter(), time.process_time()
    train_mel_vocoder(vocoder, train["all" if setting.get("all_voices") else "voice"], seed=seed, progress=False,
                      **schedule)
    result = {"setting": name, "seed": seed, **schedule, "threads": args.threads,
              "train_seconds": round(time.perf_counter() - start, 1), "cpu_seconds": round(time.process_time() - cpu_start, 1)}
    scores = evaluate_vocoder_speech(vocoder, held_out, texts, progress=False)
    result.update({key: round(value, 4) for key, value in scores.items() if value is not None})
    for n in args.griffin_lim_sweep:  # the same trained model, speaking with n Griffin-Lim iterations
        vocoder.config.griffin_lim_iters = n
        start = time.perf_counter()
        with torch.inference_mode():
            wavs = [vocoder(u[None])[0] for _, u, _ in held_out]
        rtf = (time.perf_counter() - start) / (sum(len(w) for w in wavs) / 16000)
        result[f"griffin_lim_{n}"] = {"rtf": round(rtf, 4), "whisper_wer": round(whisper_wer(texts, wavs, False), 4)}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="run directory with units.jsonl and kmeans/")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parent.parent / "tiny_data")
    parser.add_argument("--voice", default=None, help="the voice to learn and score (default: the run's answer voice)")
    parser.add_argument("--split", default="test", help="held-out split to score (default: test)")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--griffin-lim-iters", type=int, default=None, help="(default: the preset's)")
    parser.add_argument("--griffin-lim-sweep", nargs="*", type=int, default=[], metavar="N",
                        help="also score each trained model with N Griffin-Lim iterations (predicted durations)")
    parser.add_argument("--no-references", action="store_true", help="skip the three references")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training (default: 1)")
    parser.add_argument("--results", type=Path, default=None, help="JSON lines (default: RUN/mel_vocoder_table.jsonl)")
    args = parser.parse_args()
    if not whisper_available():
        parser.error("Whisper is not installed; the table is its WER: pip install -e '.[eval]'")
    if not (args.run / "units.jsonl").is_file():
        parser.error(f"--run {args.run}: no units.jsonl there (make it with train.py --stage units --out {args.run})")
    args.run_settings = read_run_settings(args.run)
    args.voice = args.voice or args.run_settings["answer_voice"]
    torch.set_num_threads(args.threads)
    held_out, texts, train, n_units = load(args, args.voice)
    print(f"{args.voice}: {len(train['voice'])} training utterances, {len(held_out)} held out ({args.split}), "
          f"{sum(len(t.split()) for t in texts)} words; K={n_units}")
    if not args.no_references:
        for name, wer in references(args, held_out, texts, train["voice"], n_units).items():
            print(f"| {name} | - | {wer:.3f} |", flush=True)
    results_path = args.results or args.run / "mel_vocoder_table.jsonl"
    print("| setting | seed | steps x batch | train s (CPU s) | mel L1 | RTF | WER predicted durations | WER true durations |")
    for name in args.settings:
        for seed in args.seeds:
            r = run_setting(name, seed, args, held_out, texts, train, n_units)
            with open(results_path, "a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"| {name} | {seed} | {r['steps']} x {r['batch_size']} | {r['train_seconds']:.0f} ({r['cpu_seconds']:.0f}) | "
                  f"{r['mel_l1']:.3f} | {r['rtf']:.3f} | {r['whisper_wer']:.3f} | {r['whisper_wer_true_durations']:.3f} |",
                  flush=True)
            for n in args.griffin_lim_sweep:
                print(f"|   Griffin-Lim {n} iterations | | | | | {r[f'griffin_lim_{n}']['rtf']:.3f} | "
                      f"{r[f'griffin_lim_{n}']['whisper_wer']:.3f} | |", flush=True)


if __name__ == "__main__":
    main()
