"""The main job: run SpeechGPT's pipeline on a corpus, step by step, into a run directory.

    python train.py                       # the whole toy pipeline on tiny_data/ into runs/toy/
    python train.py --stage units         # one step, from the previous step's output

Steps, in order (each writes into the run directory and adds its numbers to report.json):
  units   HuBERT pretraining on MFCC k-means targets (the toy preset runs one iteration; a second
          would learn k-means targets of the first), k-means on the chosen layer, units for every
          utterance (units.jsonl), and unit quality (PNMI) of MFCC and HuBERT units on held-out speech.
  stage1  modality adaptation: the LM learns unit sequences of the training speech.
  stage2  cross-modal instruction: ASR and TTS as instructions, every weight trained.
  stage3  chain of modality: spoken question -> transcript -> text answer -> spoken answer (LoRA).
  vocoder unit HiFi-GAN with a duration predictor, trained on the training speech and its units.
  eval    everything on held-out data: ASR, TTS, spoken dialogue, the vocoder (seen and unseen voice).

Start the LM from pretrained weights with --init-from DIR (an HF LLaMA directory such as
SmolLM2-135M or LLaMA-7B): its tokenizer gains the unit and special tokens and its embedding grows.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from speechgpt_min.audio import AudioError, load_audio
from speechgpt_min.data import (DataError, encode_dialogues, in_split, load_manifest, load_pairs, pack_stage1,
                                stage1_texts, stage2_dialogues, stage3_dialogues, SYSTEM_PROMPT,
                                ASR_INSTRUCTIONS, TTS_INSTRUCTIONS)
from speechgpt_min.hubert import HubertConfig
from speechgpt_min.hubert_training import mfcc_features
from speechgpt_min.lora import LoRAConfig, inject, save_adapter
from speechgpt_min.model import LMConfig, Transformer
from speechgpt_min.tokenizer import Tokenizer
from speechgpt_min.trainer import TrainConfig, fast_bfloat16, train
from speechgpt_min.units import dedup, score_units, speech_to_units, train_unit_encoder
from speechgpt_min.weights import expand_vocab, load_pretrained, save_pretrained
from speechgpt_min.vocoder import UnitVocoder, VocoderConfig
from speechgpt_min.vocoder_training import evaluate_vocoder, train_vocoder
from speechgpt_min.pipeline import PipelineError, SpeechGPT
from speechgpt_min.evaluate import (evaluate_asr, evaluate_chain, evaluate_tts, exact_match_accuracy, unit_edit_distance,
                                    whisper_available, whisper_transcribe, word_error_rate)

# The embedded default: the toy preset on tiny_data, sized for minutes on 2 CPU cores.
DEFAULTS = {
    "toy": dict(
        hubert_preset="toy", n_units=100, hubert_steps=(700,), target_layer=0, unit_layer=1,
        lm_preset="toy", block_size=256,
        stage1=dict(steps=150, batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=15),
        stage2=dict(steps=300, batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=20),
        stage3=dict(steps=200, batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=10),
        lora="speechgpt",
        # 4 crops of 0.32 s per step, lr 4e-3 -> 1e-4 (cosine): the best of scripts/vocoder_schedules.py in this budget
        vocoder_preset="toy", vocoder=dict(steps=600, batch_size=4, segment_frames=16, lr=4e-3, min_lr=1e-4),
        eval_tokens=dict(asr=64, tts=256, chain=384),  # generation limits: tiny_data's longest answers fit
        eval_spoken_questions=40,  # per split, evenly spread over the test questions (each is ~130 tokens to generate)
    ),
    # A few steps of everything: checks that the pipeline runs end to end (the tests use it).
    "smoke": dict(
        hubert_preset="toy", n_units=20, hubert_steps=(2, 2), target_layer=2, unit_layer=3,
        lm_preset="toy", block_size=64,
        stage1=dict(steps=2, batch_size=2, lr=1e-3, min_lr=1e-4, warmup_steps=1),
        stage2=dict(steps=2, batch_size=2, lr=1e-3, min_lr=1e-4, warmup_steps=1),
        stage3=dict(steps=2, batch_size=2, lr=1e-3, min_lr=1e-4, warmup_steps=1),
        lora="speechgpt",
        vocoder_preset="toy", vocoder=dict(steps=2),
        eval_tokens=dict(asr=8, tts=8, chain=8),
        eval_spoken_questions=4,
    ),
}


class UserError(Exception):
    """A mistake in the command line or the inputs: printed as one line, without a traceback."""


def read_manifest(data_dir):
    try:
        return load_manifest(Path(data_dir) / "manifest.jsonl")
    except DataError as error:
        raise UserError(f"{error} (expected a corpus directory like tiny_data/ with manifest.jsonl)") from None


def load_wavs(data_dir, rows):
    try:
        return [load_audio(Path(data_dir) / row["audio"]) for row in rows]
    except AudioError as error:
        raise UserError(str(error)) from None


# ----------------------------------------------------------------------------- steps

def step_units(args, settings, report):
    """HuBERT's pretraining iterations and k-means, then units for the whole corpus and their quality."""
    rows = read_manifest(args.data)
    train_rows = [r for r in rows if r["split"] == "train"]
    if not train_rows:
        raise UserError(f"{args.data}/manifest.jsonl has no utterances with split 'train'")
    print(f"units: loading {len(rows)} utterances from {args.data}")
    wavs = load_wavs(args.data, rows)
    train_wavs = [w for w, r in zip(wavs, rows) if r["split"] == "train"]
    print(f"units: {len(train_wavs)} training utterances, {sum(len(w) for w in train_wavs) / 16000 / 60:.1f} min")

    config = HubertConfig.from_preset(settings["hubert_preset"], num_clusters=settings["n_units"])
    result = train_unit_encoder(train_wavs, config, n_units=settings["n_units"], steps=settings["hubert_steps"],
                                target_layer=settings["target_layer"], unit_layer=settings["unit_layer"],
                                seed=args.seed, bf16=fast_bfloat16(torch.device("cpu")))
    encoder, layer, kmeans = result["encoder"], result["layer"], result["kmeans"]
    encoder.save_pretrained(args.out / "hubert")
    kmeans.save_pretrained(args.out / "kmeans")
    (args.out / "hubert" / "unit_layer.json").write_text(json.dumps({"layer": layer}))

    print("units: encoding the corpus")
    frame_units = speech_to_units(wavs, encoder, layer, kmeans, progress=True)
    with open(args.out / "units.jsonl", "w") as f:
        for row, units in zip(rows, frame_units):
            merged, durations = dedup(units)
            f.write(json.dumps({"id": row["id"], "units": merged.tolist(), "durations": durations.tolist()}) + "\n")

    # Unit quality on held-out speech with phone alignments: the unseen voice, and the seen voices' test split.
    for split, suffix in (("test_unseen_voice", ""), ("test", "_seen_voices")):
        picked = [i for i, r in enumerate(rows) if r["split"] == split and r.get("alignment")]
        if not picked:
            continue
        aligns = [Path(args.data) / rows[i]["alignment"] for i in picked]
        mfcc_units = [result["mfcc_kmeans"].assign(mfcc_features(wavs[i])) for i in picked]
        report[f"units.pnmi_mfcc{suffix}"] = round(score_units(mfcc_units, aligns)["pnmi"], 4)
        quality = score_units([frame_units[i] for i in picked], aligns)
        report[f"units.pnmi_hubert{suffix}"] = round(quality["pnmi"], 4)
        report[f"units.phone_purity{suffix}"] = round(quality["phone_purity"], 4)
    report["units.layer"] = layer
    report["units.n_units"] = settings["n_units"]
    report["units.hubert_final_loss"] = [round(sum(l[-10:]) / len(l[-10:]), 4) for l in result["losses"]]
    print(f"units: PNMI on the unseen voice: MFCC {report.get('units.pnmi_mfcc')}, "
          f"HuBERT layer {layer} {report.get('units.pnmi_hubert')}")


def read_units(run_dir, field="units"):
    """{utterance id: its deduplicated units} (or their durations, field="durations") from units.jsonl."""
    path = run_dir / "units.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: no units yet; run the units step first (python train.py --stage units)")
    return {row["id"]: row[field] for row in map(json.loads, path.read_text().splitlines())}


def train_config(args, settings, stage):
    return TrainConfig(out_dir=str(args.out / stage), seed=args.seed, device=args.device, resume=args.resume,
                       eval_every=max(1, settings[stage]["steps"] // 5), checkpoint_every=50, **settings[stage])


def load_stage(args, stage):
    """The LM and tokenizer a previous stage saved."""
    directory = args.out / stage / "model"
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory}: no model; run that stage first (python train.py --stage {stage})")
    return load_pretrained(directory), Tokenizer.from_pretrained(directory)


def save_stage(args, stage, model, tokenizer):
    directory = args.out / stage / "model"
    save_pretrained(model, directory, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    tokenizer.save_pretrained(directory)


def val_loss(history):
    losses = [record["val_loss"] for record in history if "val_loss" in record]
    return round(losses[-1], 4) if losses else None


def new_language_model(args, settings, rows, pairs, units):
    """The tokenizer (text + units + special tokens) and the LM that stage 1 starts from."""
    n_units = settings["n_units"]
    if args.init_from:
        tokenizer = Tokenizer.from_pretrained(args.init_from, n_units=n_units)
        model = load_pretrained(args.init_from)
        old = model.config.vocab_size
        expand_vocab(model, max(old, tokenizer.vocab_size))
        print(f"stage1: {args.init_from}: vocabulary {old} -> {model.config.vocab_size}")
    else:  # a word vocabulary of everything the model will read and write in training
        texts = [SYSTEM_PROMPT, *ASR_INSTRUCTIONS, *TTS_INSTRUCTIONS]
        texts += [d.text() for d in stage2_dialogues(in_split(rows, "train"), units, args.seed)]
        texts += [d.text() for d in stage3_dialogues(in_split(pairs, "train"), units, args.seed)]
        tokenizer = Tokenizer.train(texts, n_units=n_units)
        model = Transformer(LMConfig.from_preset(settings["lm_preset"], vocab_size=tokenizer.vocab_size))
    print(f"stage1: LM {model.num_params() / 1e6:.2f}M parameters, vocabulary {tokenizer.vocab_size}")
    return model, tokenizer


def unigram_loss(train_set, val_set):
    """Cross-entropy (nats) of the validation targets under the training targets' unigram
    distribution (add-one smoothed): the baseline a sequence model must beat."""
    counts = torch.bincount(torch.tensor([t for e in train_set for t in e.labels[1:]]))
    targets = torch.tensor([t for e in val_set for t in e.labels[1:]])
    counts = torch.nn.functional.pad(counts, (0, max(0, int(targets.max()) + 1 - len(counts)))) + 1.0
    return round(float(-(counts / counts.sum()).log()[targets].mean()), 4)


def step_stage1(args, settings, report):
    """Modality adaptation: next-unit prediction on the training speech's unit sequences."""
    rows, pairs, units = corpus(args)
    model, tokenizer = new_language_model(args, settings, rows, pairs, units)
    block = min(settings["block_size"], model.config.max_seq_len)
    train_set = pack_stage1(tokenizer, stage1_texts(in_split(rows, "train"), units, args.seed), block)
    val_set = pack_stage1(tokenizer, stage1_texts(in_split(rows, "valid"), units, args.seed), block)
    history = train(model, train_set, train_config(args, settings, "stage1"), val_set)
    save_stage(args, "stage1", model, tokenizer)
    report["stage1.val_loss"] = val_loss(history)
    report["stage1.unigram_val_loss"] = unigram_loss(train_set, val_set)
    print(f"stage1: validation loss {report['stage1.val_loss']} (unigram baseline {report['stage1.unigram_val_loss']})")


def step_stage2(args, settings, report):
    """Cross-modal instruction: ASR and TTS pairs, every weight trained."""
    rows, _, units = corpus(args)
    model, tokenizer = load_stage(args, "stage1")
    context = model.config.max_seq_len
    train_set = encode_dialogues(tokenizer, stage2_dialogues(in_split(rows, "train"), units, args.seed), context)
    val_set = encode_dialogues(tokenizer, stage2_dialogues(in_split(rows, "valid"), units, args.seed), context)
    history = train(model, train_set, train_config(args, settings, "stage2"), val_set)
    save_stage(args, "stage2", model, tokenizer)
    report["stage2.val_loss"] = val_loss(history)
    print(f"stage2: validation loss {report['stage2.val_loss']}")


def step_stage3(args, settings, report):
    """Chain of modality: LoRA on the stage-2 model (the base stays frozen)."""
    _, pairs, units = corpus(args)
    model, tokenizer = load_stage(args, "stage2")
    lora = LoRAConfig.from_preset(settings["lora"])
    inject(model, lora)
    context = model.config.max_seq_len
    train_set = encode_dialogues(tokenizer, stage3_dialogues(in_split(pairs, "train"), units, args.seed), context)
    val_set = encode_dialogues(tokenizer, stage3_dialogues(in_split(pairs, "valid"), units, args.seed), context)
    history = train(model, train_set, train_config(args, settings, "stage3"), val_set)
    save_adapter(model, args.out / "stage3" / "adapter", lora, base_model_name_or_path=str(args.out / "stage2" / "model"))
    report["stage3.val_loss"] = val_loss(history)
    print(f"stage3: validation loss {report['stage3.val_loss']}")


def corpus(args):
    """Manifest, question/answer pairs and the units step's unit table."""
    rows = read_manifest(args.data)
    try:
        pairs = load_pairs(args.data / "qa.jsonl")
    except DataError as error:
        raise UserError(str(error)) from None
    return rows, pairs, read_units(args.out)


def vocoder_items(args, rows, units):
    """(wav, deduplicated units, durations in frames) per utterance."""
    durations = read_units(args.out, "durations")
    wavs = load_wavs(args.data, rows)
    return [(w, torch.tensor(units[r["id"]]), torch.tensor(durations[r["id"]])) for w, r in zip(wavs, rows)]


def step_vocoder(args, settings, report):
    """The unit vocoder: learns to speak the run's units, from the training speech."""
    rows, _, units = corpus(args)
    train_items = vocoder_items(args, in_split(rows, "train"), units)
    config = VocoderConfig.from_preset(settings["vocoder_preset"])
    config.num_embeddings = settings["n_units"]
    vocoder = UnitVocoder(config)
    print(f"vocoder: {sum(p.numel() for p in vocoder.parameters()) / 1e6:.2f}M parameters, "
          f"{len(train_items)} training utterances")
    history = train_vocoder(vocoder, train_items, seed=args.seed, **settings["vocoder"])
    vocoder.save_pretrained(args.out / "vocoder")
    report["vocoder.final_train_mel_l1"] = round(sum(h["mel"] for h in history[-20:]) / len(history[-20:]), 4)


def step_eval(args, settings, report):
    """Held-out evaluation of the whole run: nothing here was trained on."""
    rows, pairs, units = corpus(args)
    try:
        sgpt = SpeechGPT.from_run(args.out, device=args.device)
    except PipelineError as error:
        raise UserError(str(error)) from None
    limit = settings["eval_tokens"]
    by_id = {r["id"]: r for r in rows}
    sentences = {split: [r for r in rows if r["split"] == split and r.get("kind", "sent") == "sent"]
                 for split in ("test", "test_unseen_voice")}
    test_pairs = in_split(pairs, "test")
    for split, suffix in (("test", ""), ("test_unseen_voice", "_unseen_voice")):
        if sentences[split]:
            asr = evaluate_asr(sgpt, [(units[r["id"]], r["text"]) for r in sentences[split]], limit["asr"])
            report[f"stage2.asr_wer{suffix}"], report[f"stage2.asr_cer{suffix}"] = round(asr["wer"], 4), round(asr["cer"], 4)
        chain_items = [(units[qid], p["question"]["text"], p["answer"]["text"], units[p["answer"]["audio"][0]])
                       for p in test_pairs for qid in p["question"]["audio"] if by_id[qid]["split"] == split]
        if chain_items:
            chain = evaluate_chain(sgpt, evenly_spaced(chain_items, settings["eval_spoken_questions"]), limit["chain"])
            for key in ("transcript_wer", "answer_accuracy", "speech_answer_unit_edit_distance", "well_formed", "n"):
                report[f"stage3.{key}{suffix}"] = round(chain[key], 4)
    tts = evaluate_tts(sgpt, [(r["text"], units[r["id"]]) for r in sentences["test"]], limit["tts"])
    report["stage2.tts_unit_edit_distance"] = round(tts["unit_edit_distance"], 4)
    # Text questions (no speech in): does the model answer the held-out phrasings in text?
    text_items = [(p["question"]["text"], p["answer"]["text"]) for p in test_pairs]
    answers = [sgpt.chat(text=q, temperature=0, speak=False, max_new_tokens=limit["chain"]).text_answer
               for q, _ in text_items]
    report["stage3.text_answer_accuracy"] = round(exact_match_accuracy([a for _, a in text_items], answers), 4)
    evaluate_vocoder_on_test(args, sgpt, sentences["test"], units, report)


def evenly_spaced(items, n):
    """At most n of items, spread evenly over the list (so every skill of the test set is in)."""
    return items if len(items) <= n else [items[i * len(items) // n] for i in range(n)]


def evaluate_vocoder_on_test(args, sgpt, test_rows, units, report):
    """Mel L1 with true durations; with predicted ones, the unit edit distance after re-encoding, the
    real-time factor, and (where Whisper is installed) the WER of vocoded next to original speech."""
    if sgpt.vocoder is None:
        return
    items = vocoder_items(args, test_rows, units)
    report["vocoder.mel_l1"] = round(evaluate_vocoder(sgpt.vocoder, items), 4)
    seconds_of_audio, compute, refs, hyps, vocoded = 0.0, 0.0, [], [], []
    for _, u, _ in items:
        start = time.perf_counter()
        with torch.inference_mode():
            wav = sgpt.vocoder(u[None])[0]
        compute += time.perf_counter() - start
        seconds_of_audio += len(wav) / 16000
        refs.append(u.tolist())
        hyps.append(sgpt.speech_to_units(wav))
        vocoded.append(wav)
    report["vocoder.rtf"] = round(compute / seconds_of_audio, 4)
    report["vocoder.resynthesis_unit_edit_distance"] = round(unit_edit_distance(refs, hyps), 4)
    if whisper_available():
        texts = [r["text"] for r in test_rows]
        report["vocoder.whisper_wer_original"] = round(word_error_rate(texts, whisper_transcribe([w for w, _, _ in items])), 4)
        report["vocoder.whisper_wer_vocoded"] = round(word_error_rate(texts, whisper_transcribe(vocoded)), 4)


STEPS = {"units": step_units, "stage1": step_stage1, "stage2": step_stage2, "stage3": step_stage3,
         "vocoder": step_vocoder, "eval": step_eval}


# ----------------------------------------------------------------------------- driver

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["all", *STEPS], default="all",
                        help="run one step (from the previous step's output in --out), or all of them (default)")
    parser.add_argument("--preset", choices=sorted(DEFAULTS), default="toy",
                        help="model sizes and step budgets (default: toy, a few minutes on 2 CPU cores)")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parent / "tiny_data",
                        help="corpus directory with manifest.jsonl (default: tiny_data/)")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<preset>)")
    parser.add_argument("--init-from", type=Path, default=None, metavar="DIR",
                        help="start the LM from an HF LLaMA directory (e.g. SmolLM2-135M, LLaMA-7B), "
                             "growing its vocabulary by the unit and special tokens")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run: skip finished steps, resume a stage from its checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    args.out = args.out or Path("runs") / args.preset
    if args.init_from is not None and not (args.init_from / "config.json").is_file():
        parser.error(f"--init-from {args.init_from}: not an HF model directory (no config.json)")
    return args


def main(argv=None):
    args = parse_args(argv)
    settings = DEFAULTS[args.preset]
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    report_path = args.out / "report.json"
    keep = report_path.exists() and (args.stage != "all" or args.resume)
    report = json.loads(report_path.read_text()) if keep else {}

    for name in (STEPS if args.stage == "all" else [args.stage]):
        if args.resume and args.stage == "all" and f"{name}.seconds" in report:
            print(f"== {name}: already done ({report_path})")
            continue
        if not args.resume:  # a fresh start: no stale checkpoint may be resumed from
            (args.out / name / "ckpt.pt").unlink(missing_ok=True)
            (args.out / name / "metrics.jsonl").unlink(missing_ok=True)
        step_start = time.time()
        STEPS[name](args, settings, report)
        report[f"{name}.seconds"] = round(time.time() - step_start, 1)
        report_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"== {name} done in {report[f'{name}.seconds']:.0f} s")
    # The whole pipeline's time, whether its steps ran in one call or several.
    report["wall_seconds"] = round(sum(v for k, v in report.items() if k.endswith(".seconds")), 1)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {report_path}")
    for key, value in report.items():
        print(f"  {key}: {value}")


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit("interrupted")
