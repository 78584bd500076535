"""The main job: run SpeechGPT's pipeline on a corpus, step by step, into a run directory.

    python train.py                       # the whole toy pipeline on tiny_data/ into runs/toy/
    python train.py --stage units         # one step, from the previous step's output
    python train.py --set stage2.steps=900 --set lm.dim=192   # change any setting of the preset

Steps, in order (each writes into the run directory and adds its numbers to report.json):
  units   the toy's ears: a phone recogniser (phones.py) learnt from festival's alignments and forced
          alignment, or with --set units=hubert HuBERT pretraining + k-means; units for every
          utterance (units.jsonl), and their quality: PNMI and phone accuracy on held-out speech, and
          how alike one sentence's units are in two voices.
  stage0  text pretraining: the LM learns the corpus's text and answers the training questions typed
          (the toy's stand-in for what LLaMA brings: the world's facts, learnt from text, and answering
          in text). --no-text-pretraining skips it.
  stage1  modality adaptation: the LM learns unit sequences of the training speech (the toy preset
          skips it, stage1.steps=0: in its budget it slowed stage 2 down; docs/recipe.md).
  stage2  cross-modal instruction: ASR (every voice) and TTS (the answer voice), every weight trained.
  stage3  chain of modality: spoken question -> transcript -> text answer -> spoken answer (LoRA).
  vocoder the toy's mel vocoder (units -> log-mel with context -> Griffin-Lim, mel_vocoder.py), trained
          on the answer voice's training speech and its units.
  eval    everything on held-out data: ASR, TTS, spoken and typed questions (known facts in new
          phrasings, and facts only the text corpus stated), the vocoder; seen and unseen voices.

While the LM trains, each stage decodes a few held-out examples at every evaluation and logs
what the model can do (fact completion, ASR CER, answer accuracy) beside the loss in
STAGE/metrics.jsonl; curves.png plots both for every stage.

Start the LM from pretrained weights with --init-from DIR (an HF LLaMA directory such as
SmolLM2-135M or LLaMA-7B): its tokenizer gains the unit and special tokens and its embedding grows.

The full-size recipe, --preset speechgpt-7b: LLaMA-7B, mHuBERT layer-11 units (K=1000), the released
LoRA, each stage's batch, length and steps (speechgpt_min/costing.py says where each comes from); its
LM stages run on GPUs, one at a time, under torchrun. Checkable here: `python train.py --preset speechgpt-7b --dry-run --nproc 8` prints
each stage's parameters, memory per GPU under FSDP, tokens and FLOPs per step, the time per step on
A100 and H100 at --mfu, and the torchrun command of each stage (docs/scaling.md).
"""
import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from speechgpt_min.audio import AudioError, load_audio
from speechgpt_min.costing import STAGES, report as full_size_report, stage_settings
from speechgpt_min.data import (ASR_INSTRUCTIONS, SYSTEM_PROMPT, TTS_INSTRUCTIONS, DataError, check_corpus,
                                encode_dialogues, in_split, load_text_corpus, pack_blocks, stage0_texts,
                                stage1_texts, stage2_dialogues, stage3_dialogues, text_examples)
from speechgpt_min.evaluate import (WHISPER_MISSING, cross_voice_similarity, evaluate_asr, evaluate_chain, evenly_spaced,
                                    evaluate_text_questions, evaluate_tts, evaluate_vocoder_speech,
                                    fact_completion_accuracy, speech_whisper_wer, unigram_loss, whisper_available)
from speechgpt_min.hubert import HubertConfig
from speechgpt_min.hubert_training import mfcc_features, train_unit_encoder
from speechgpt_min.lora import LoRAConfig, inject, save_adapter
from speechgpt_min.model import LMConfig, Transformer
from speechgpt_min.pipeline import PipelineError, SpeechGPT
from speechgpt_min.tokenizer import Tokenizer
from speechgpt_min.device import fast_bfloat16
from speechgpt_min.trainer import TrainConfig, train
from speechgpt_min.phones import PhoneRecognizerConfig, n_frames, normalised_mfcc, train_phone_recognizer
from speechgpt_min.units import dedup, frame_phones, read_run_units, read_segs, score_units, speech_to_units
from speechgpt_min.mel_vocoder import MelVocoder, MelVocoderConfig
from speechgpt_min.vocoder_training import train_mel_vocoder, vocoder_items
from speechgpt_min.weights import expand_vocab, load_pretrained, reinit_rows, save_pretrained

ANSWER_VOICE = "fest_kal"  # tiny_data's answer voice: TTS targets and spoken answers

# The embedded default: the toy preset on tiny_data, sized for minutes on 2 CPU cores.
DEFAULTS = {
    "toy": dict(
        units="phones", phone_epochs=[2, 2], phone_recognizer=dict(channels=192),  # the toy's ears (phones.py)
        hubert_preset="toy", n_units=100, hubert_steps=[700], target_layer=0, unit_layer=1,  # with units=hubert
        lm_preset="toy", lm={}, block_size=256, answer_voice=ANSWER_VOICE, text_replay=0.3, typed_qa=2,
        stage0=dict(steps=300, batch_size=64, lr=2e-3, min_lr=2e-4, warmup_steps=20),
        stage1=dict(steps=0, batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=5),  # 0: skipped (README)
        stage2=dict(steps=800, batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=20),
        stage3=dict(steps=300, batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=10),
        lora="toy",
        # the mel vocoder on the answer voice: 1000 steps of 4 utterances, about a minute (README, vocoder)
        vocoder_preset="toy", vocoder=dict(steps=1000, batch_size=4, lr=4e-3),
        eval_tokens=dict(asr=64, tts=256, chain=384),  # generation limits: tiny_data's longest answers fit
        eval_sentences=100,        # ASR and TTS: per split, evenly spread over the test sentences
        eval_spoken_questions=60,  # per split, evenly spread over the test questions (every skill)
        eval_typed_questions=100,
        watch=8,                   # held-out examples each stage decodes at every evaluation
    ),
    # A few steps of everything: checks that the pipeline runs end to end (the tests use it).
    "smoke": dict(
        units="phones", phone_epochs=[1, 1], phone_recognizer=dict(channels=32),
        hubert_preset="toy", n_units=20, hubert_steps=[2, 2], target_layer=2, unit_layer=3,
        lm_preset="toy", lm={}, block_size=64, answer_voice=ANSWER_VOICE, text_replay=0.3, typed_qa=1,
        stage0=dict(steps=2, batch_size=2, lr=1e-3, min_lr=1e-4, warmup_steps=1),
        stage1=dict(steps=2, batch_size=2, lr=1e-3, min_lr=1e-4, warmup_steps=1),
        stage2=dict(steps=2, batch_size=2, lr=1e-3, min_lr=1e-4, warmup_steps=1),
        stage3=dict(steps=2, batch_size=2, lr=1e-3, min_lr=1e-4, warmup_steps=1),
        lora="speechgpt",
        vocoder_preset="toy", vocoder=dict(steps=2, batch_size=2),
        eval_tokens=dict(asr=8, tts=8, chain=8),
        eval_sentences=4, eval_spoken_questions=4, eval_typed_questions=4,
        watch=2,
    ),
}
# SpeechGPT-7B as the paper trained it: LLaMA-7B, mHuBERT's layer-11 units with K=1000 (made outside
# this script), the released LoRA, each stage's batch, length and steps (speechgpt_min/costing.py has
# the numbers and their sources). LM stages only, on GPUs; --dry-run prints what each stage costs.
DEFAULTS["speechgpt-7b"] = dict(DEFAULTS["toy"], n_units=1000, unit_layer=11, lm_preset="llama-7b",
                                block_size=STAGES[0].seq_len, lora="speechgpt", **stage_settings())
LM_STAGES = ("stage0", "stage1", "stage2", "stage3")


class UserError(Exception):
    """A mistake in the command line or the inputs: printed as one line, without a traceback."""


def load_wavs(data_dir, rows):
    try:
        return [load_audio(Path(data_dir) / row["audio"]) for row in rows]
    except AudioError as error:
        raise UserError(str(error)) from None


# ----------------------------------------------------------------------------- the corpus

class Corpus:
    """The corpus directory, checked once: manifest rows, question/answer pairs, and what the run made of them."""

    def __init__(self, args, settings):
        try:
            self.rows, self.pairs = check_corpus(args.data)
        except DataError as error:
            raise UserError(f"{error} (expected a corpus directory like tiny_data/)") from None
        self.data, self.run, self.settings = args.data, args.out, settings
        self.by_id = {r["id"]: r for r in self.rows}
        self._read_units = None

    def text_corpus(self):
        try:
            return load_text_corpus(self.data / "text_corpus.txt")
        except DataError as error:
            raise UserError(f"{error}; or skip stage 0 with --no-text-pretraining") from None

    def n_units(self):
        """K, the unit vocabulary: the phone recogniser's phones, or the k-means size."""
        return self._units()[2]

    def units(self, field="units"):
        """{utterance id: its deduplicated units} (or their durations, field="durations") from units.jsonl."""
        return self._units()[0 if field == "units" else 1]

    def _units(self):
        """units.jsonl, read once (after the units step wrote it)."""
        if self._read_units is None:
            if not (self.run / "units.jsonl").is_file():
                raise UserError(f"{self.run}/units.jsonl: no units yet; run the units step first "
                                f"(python train.py --stage units)")
            self._read_units = read_run_units(self.run)
        return self._read_units

    def sentences(self, split, answer_voice):
        """Read sentences of a split: (the other voices' readings, the answer voice's)."""
        rows = [r for r in self.rows if r["split"] == split and r.get("kind", "sent") == "sent"]
        return [r for r in rows if r["voice"] != answer_voice], [r for r in rows if r["voice"] == answer_voice]

    def spoken_questions(self, pair_split, audio_split, units):
        """(question units, question text, answer text, answer units) of the pairs of a split whose
        question audio is in `audio_split` (a held-out voice's recordings are in test_unseen_voice)."""
        return [(units[qid], p["question"]["text"], p["answer"]["text"], units[p["answer"]["audio"][0]])
                for p in self.pairs if p["split"] == pair_split
                for qid in p["question"]["audio"] if self.by_id[qid]["split"] == audio_split]

    def typed_questions(self, pair_split):
        return [(p["question"]["text"], p["answer"]["text"]) for p in self.pairs if p["split"] == pair_split]


# ----------------------------------------------------------------------------- steps

def step_units(args, settings, report, corpus):
    """The ears: a phone recogniser (the toy default) or HuBERT + k-means, learnt from the training
    speech; then units for the whole corpus (units.jsonl) and their quality."""
    rows = corpus.rows
    print(f"units: loading {len(rows)} utterances from {args.data}")
    wavs = load_wavs(args.data, rows)
    train_rows = [(w, r) for w, r in zip(wavs, rows) if r["split"] == "train"]
    print(f"units: {len(train_rows)} training utterances, {sum(len(w) for w, _ in train_rows) / 16000 / 60:.1f} min")
    if settings["units"] == "phones":
        frame_units, names = learn_phone_units(args, settings, train_rows, wavs, rows)
    else:
        frame_units, names = learn_hubert_units(args, settings, [w for w, _ in train_rows], wavs, rows, report)
    merged = {}
    with open(args.out / "units.jsonl", "w") as f:
        for row, units in zip(rows, frame_units):
            merged[row["id"]], durations = (u.tolist() for u in dedup(units))
            f.write(json.dumps({"id": row["id"], "units": merged[row["id"]], "durations": durations}) + "\n")

    # Unit quality on held-out speech with phone alignments: the unseen voice, and the seen voices' test split.
    for split, suffix in (("test_unseen_voice", ""), ("test", "_seen_voices")):
        picked = [i for i, r in enumerate(rows) if r["split"] == split and r.get("alignment")]
        if picked:
            quality = score_units([frame_units[i] for i in picked], [args.data / rows[i]["alignment"] for i in picked])
            report[f"units.pnmi{suffix}"] = round(quality["pnmi"], 4)
            report[f"units.phone_purity{suffix}"] = round(quality["phone_purity"], 4)
            if names is not None:  # phone units: how often the recognised phone is festival's
                hits = [names[int(u)] == p for i in picked for u, p in
                        zip(frame_units[i], frame_phones(read_segs(args.data / rows[i]["alignment"]), len(frame_units[i])))]
                report[f"units.phone_accuracy{suffix}"] = round(sum(hits) / len(hits), 4)
    # Does a sentence read by two voices give alike units? (PNMI, on festival voices only, does not say.)
    similarity = cross_voice_similarity([(r["text"], r["voice"], merged[r["id"]]) for r in rows])
    if similarity is not None:
        report["units.cross_voice_same_text"] = round(similarity["same_text"], 4)
        report["units.cross_voice_other_text"] = rounded(similarity["other_text"])
    report["units.kind"], report["units.n_units"] = settings["units"], corpus.n_units()
    report["units.per_second"] = round(sum(len(merged[r["id"]]) for r in rows) / sum(len(w) for w in wavs) * 16000, 2)
    print(f"units: PNMI on the unseen voice {report.get('units.pnmi')}; one sentence in two voices: unit-bigram "
          f"overlap {report.get('units.cross_voice_same_text')} (two sentences: {report.get('units.cross_voice_other_text')})")


def learn_phone_units(args, settings, train_rows, wavs, corpus_rows):
    """The toy's ears: a phone recogniser, from festival's alignments and forced alignment (phones.py)."""
    labels = [frame_phones(read_segs(args.data / r["alignment"]), n_frames(w)) if r.get("alignment") else None
              for w, r in train_rows]
    if not any(labels) or not all(r.get("phones") for _, r in train_rows):
        raise UserError("phone units need phone alignments for some training voices and a 'phones' field (the "
                        "text's pronunciation) on every training utterance; or use --set units=hubert")
    features = [normalised_mfcc(w) for w in tqdm(wavs, desc="MFCC")]
    train_features = [f for f, r in zip(features, corpus_rows) if r["split"] == "train"]
    recognizer = train_phone_recognizer(train_features, labels, [r["phones"].split() for _, r in train_rows],
                                        PhoneRecognizerConfig(**settings["phone_recognizer"]),
                                        epochs=settings["phone_epochs"], seed=args.seed)
    recognizer.save_pretrained(args.out / "phones")
    print("units: recognising the corpus")
    return recognizer.recognize(features, progress=True), recognizer.config.phones


def learn_hubert_units(args, settings, train_wavs, wavs, rows, report):
    """HuBERT's pretraining iterations on MFCC k-means targets, then k-means on the chosen layer."""
    config = HubertConfig.from_preset(settings["hubert_preset"], num_clusters=settings["n_units"])
    result = train_unit_encoder(train_wavs, config, n_units=settings["n_units"], steps=settings["hubert_steps"],
                                target_layer=settings["target_layer"], unit_layer=settings["unit_layer"],
                                seed=args.seed, bf16=fast_bfloat16(torch.device("cpu")))
    encoder, layer, kmeans = result["encoder"], result["layer"], result["kmeans"]
    encoder.save_pretrained(args.out / "hubert")
    kmeans.save_pretrained(args.out / "kmeans")
    (args.out / "hubert" / "unit_layer.json").write_text(json.dumps({"layer": layer}))
    picked = [i for i, r in enumerate(rows) if r["split"] == "test_unseen_voice" and r.get("alignment")]
    if picked:  # the baseline HuBERT must beat: k-means of MFCCs
        mfcc_units = [result["mfcc_kmeans"].assign(mfcc_features(wavs[i])) for i in picked]
        report["units.pnmi_mfcc"] = round(score_units(mfcc_units, [args.data / rows[i]["alignment"] for i in picked])["pnmi"], 4)
    report["units.layer"] = layer
    report["units.hubert_final_loss"] = [round(sum(l[-10:]) / len(l[-10:]), 4) for l in result["losses"]]
    print("units: encoding the corpus")
    return speech_to_units(wavs, encoder, layer, kmeans, progress=True), None


def train_config(args, settings, stage):
    return TrainConfig(out_dir=str(args.out / stage), seed=args.seed, device=args.device, resume=args.resume,
                       eval_every=max(1, settings[stage]["steps"] // 8), checkpoint_every=100, **settings[stage])


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


def skipped(args, settings, stage):
    """Stage 0 without text pretraining, and any LM stage the settings give no steps, do not run."""
    return (stage == "stage0" and args.no_text_pretraining) or (stage in LM_STAGES and settings[stage]["steps"] == 0)


def previous_lm_stage(args, settings, stage):
    """The stage whose model this one starts from (the last earlier stage that ran, else a new model)."""
    earlier = [s for s in LM_STAGES[:LM_STAGES.index(stage)] if not skipped(args, settings, s)]
    return earlier[-1] if earlier else None


def val_loss(history):
    losses = [record["val_loss"] for record in history if "val_loss" in record]
    return round(losses[-1], 4) if losses else None


def new_language_model(args, settings, corpus):
    """The tokenizer (text + units + special tokens) and the LM that the first LM stage starts from."""
    n_units = corpus.n_units()
    if args.init_from:
        tokenizer = Tokenizer.from_pretrained(args.init_from, n_units=n_units)
        model = load_pretrained(args.init_from)
        old = model.config.vocab_size
        expand_vocab(model, max(old, tokenizer.vocab_size))
        print(f"LM: {args.init_from}: vocabulary {old} -> {model.config.vocab_size}")
    else:  # a word vocabulary of everything the model will read and write in training
        units = corpus.units()
        texts = [SYSTEM_PROMPT, *ASR_INSTRUCTIONS, *TTS_INSTRUCTIONS]
        texts += [d.text() for d in stage2_dialogues(in_split(corpus.rows, "train"), units, args.seed)]
        texts += [d.text() for d in stage3_dialogues(in_split(corpus.pairs, "train"), units, args.seed)]
        if not args.no_text_pretraining:
            texts += corpus.text_corpus()
        tokenizer = Tokenizer.train(texts, n_units=n_units)
        try:
            config = LMConfig.from_preset(settings["lm_preset"], vocab_size=tokenizer.vocab_size, **settings["lm"])
        except ValueError as error:
            raise UserError(f"LM settings: {error}") from None
        model = Transformer(config)
    print(f"LM: {model.num_params() / 1e6:.2f}M parameters, vocabulary {tokenizer.vocab_size}")
    return model, tokenizer


def start_lm(args, settings, corpus, stage):
    previous = previous_lm_stage(args, settings, stage)
    return load_stage(args, previous) if previous else new_language_model(args, settings, corpus)


def step_stage0(args, settings, report, corpus):
    """Text pretraining: next-token prediction on the corpus's text, where the world's facts are stated."""
    model, tokenizer = new_language_model(args, settings, corpus)
    train_set = stage0_examples(settings, corpus, tokenizer, model.config.max_seq_len, args.seed)
    valid_sentences, _ = corpus.sentences("valid", answer_voice=None)  # sentences the text corpus never states
    val_set = text_examples(tokenizer, sorted({r["text"] for r in valid_sentences}))
    facts = {p["answer"]["text"] for p in corpus.pairs
             if p["split"] in ("valid", "test_knowledge") and p.get("skill") != "command"}
    watched = evenly_spaced(sorted(facts), 2 * settings["watch"])
    typed = evenly_spaced(corpus.typed_questions("valid"), 2 * settings["watch"])

    def score(lm):  # does the model complete the statement of a fact, and answer a typed question?
        sgpt = SpeechGPT(lm, tokenizer)
        scores = {"fact_accuracy": fact_completion_accuracy(sgpt, watched)}
        if settings["typed_qa"]:
            scores["typed_accuracy"] = evaluate_text_questions(sgpt, typed, settings["eval_tokens"]["chain"], progress=False)
        return scores

    history = train(model, train_set, train_config(args, settings, "stage0"), val_set, score if watched else None)
    seen = {token for example in train_set for token in example.tokens}
    reinit_rows(model, [i for i in range(tokenizer.vocab_size) if i not in seen], seed=args.seed)  # units etc.
    save_stage(args, "stage0", model, tokenizer)
    report["stage0.val_loss"] = val_loss(history)
    report["stage0.fact_accuracy"] = history[-1].get("fact_accuracy")
    report["stage0.typed_accuracy"] = history[-1].get("typed_accuracy")
    print(f"stage0: validation loss {report['stage0.val_loss']}, facts completed {report['stage0.fact_accuracy']}, "
          f"typed questions answered {report['stage0.typed_accuracy']}")


def stage0_examples(settings, corpus, tokenizer, context, seed):
    """Stage 0's text: the corpus's lines, and (typed_qa > 0) that many copies of the training pairs as
    typed questions in the chain's text-to-text format. The toy's stand-in for what an LLM brings to
    SpeechGPT: it knows the world from text and already answers questions typed to it, so stage 3 only
    has to chain hearing, answering and speaking."""
    examples = text_examples(tokenizer, stage0_texts(corpus.text_corpus(), seed))
    if settings["typed_qa"]:
        pairs = in_split(corpus.pairs, "train")
        typed = encode_dialogues(tokenizer, stage3_dialogues(pairs, {}, seed, variants=("t2t",)), context)
        examples += typed * settings["typed_qa"]
        random.Random(seed).shuffle(examples)
    return examples


def step_stage1(args, settings, report, corpus):
    """Modality adaptation: next-unit prediction on the training speech's unit sequences."""
    units = corpus.units()
    model, tokenizer = start_lm(args, settings, corpus, "stage1")
    block = min(settings["block_size"], model.config.max_seq_len)
    train_set = pack_blocks(tokenizer, stage1_texts(in_split(corpus.rows, "train"), units, args.seed), block)
    val_set = pack_blocks(tokenizer, stage1_texts(in_split(corpus.rows, "valid"), units, args.seed), block)
    history = train(model, train_set, train_config(args, settings, "stage1"), val_set)
    save_stage(args, "stage1", model, tokenizer)
    report["stage1.val_loss"] = val_loss(history)
    report["stage1.unigram_val_loss"] = unigram_loss(train_set, val_set)
    print(f"stage1: validation loss {report['stage1.val_loss']} (unigram baseline {report['stage1.unigram_val_loss']})")


def step_stage2(args, settings, report, corpus):
    """Cross-modal instruction: ASR of every voice and TTS in the answer voice, every weight trained."""
    units, voice = corpus.units(), settings["answer_voice"]
    model, tokenizer = start_lm(args, settings, corpus, "stage2")
    context = model.config.max_seq_len
    dialogues = {split: stage2_dialogues(in_split(corpus.rows, split), units, args.seed, tts_voice=voice)
                 for split in ("train", "valid")}
    train_set = encode_dialogues(tokenizer, dialogues["train"], context)
    val_set = encode_dialogues(tokenizer, dialogues["valid"], context)
    if not skipped(args, settings, "stage0") and settings["text_replay"] > 0:
        # Text replay: stage 0's lines mixed in (text_replay per instruction example), so that learning
        # to read and write units does not wash out what the text taught (catastrophic forgetting).
        text = stage0_examples(settings, corpus, tokenizer, context, args.seed + 1)
        train_set += text[:int(settings["text_replay"] * len(train_set))]
        print(f"stage2: {len(train_set)} training examples, text replay {settings['text_replay']}")
    others, _ = corpus.sentences("valid", voice)
    watched = [(units[r["id"]], r["text"]) for r in evenly_spaced(others, settings["watch"])]

    def score(lm):
        sgpt = SpeechGPT(lm, tokenizer)
        return {"asr_cer": evaluate_asr(sgpt, watched, settings["eval_tokens"]["asr"], progress=False)["cer"]}

    history = train(model, train_set, train_config(args, settings, "stage2"), val_set, score if watched else None)
    save_stage(args, "stage2", model, tokenizer)
    report["stage2.val_loss"] = val_loss(history)
    print(f"stage2: validation loss {report['stage2.val_loss']}, ASR CER on {len(watched)} valid "
          f"sentences {history[-1].get('asr_cer')}")


def step_stage3(args, settings, report, corpus):
    """Chain of modality: LoRA on the stage-2 model (the base stays frozen)."""
    units = corpus.units()
    model, tokenizer = load_stage(args, "stage2")
    lora = LoRAConfig.from_preset(settings["lora"])
    inject(model, lora)
    context = model.config.max_seq_len
    train_set = encode_dialogues(tokenizer, stage3_dialogues(in_split(corpus.pairs, "train"), units, args.seed), context)
    val_set = encode_dialogues(tokenizer, stage3_dialogues(in_split(corpus.pairs, "valid"), units, args.seed), context)
    watched = evenly_spaced(corpus.spoken_questions("valid", "valid", units), settings["watch"])

    def score(lm):
        chain = evaluate_chain(SpeechGPT(lm, tokenizer), watched, settings["eval_tokens"]["chain"], progress=False,
                               speech_answer=False)
        return {"answer_accuracy": chain["answer_accuracy"]}

    history = train(model, train_set, train_config(args, settings, "stage3"), val_set, score if watched else None)
    save_adapter(model, args.out / "stage3" / "adapter", lora, base_model_name_or_path=str(args.out / "stage2" / "model"))
    report["stage3.val_loss"] = val_loss(history)
    print(f"stage3: validation loss {report['stage3.val_loss']}, answer accuracy on {len(watched)} valid spoken "
          f"questions {history[-1].get('answer_accuracy')}")


def vocoder_data(args, rows, units, durations):
    try:
        return vocoder_items(args.data, rows, units, durations)
    except AudioError as error:
        raise UserError(str(error)) from None


def step_vocoder(args, settings, report, corpus):
    """The mel vocoder: learns to speak the run's units in the answer voice, from that voice's training speech."""
    voice = settings["answer_voice"]
    train_rows = [r for r in in_split(corpus.rows, "train") if r["voice"] == voice]
    if not train_rows:
        raise UserError(f"{args.data}/manifest.jsonl has no training utterances of the answer voice {voice!r}")
    vocoder = MelVocoder(MelVocoderConfig.from_preset(settings["vocoder_preset"], num_embeddings=corpus.n_units()))
    print(f"vocoder: {sum(p.numel() for p in vocoder.parameters()) / 1e6:.2f}M parameters, "
          f"{len(train_rows)} training utterances of {voice}")
    items = vocoder_data(args, train_rows, corpus.units(), corpus.units("durations"))
    history = train_mel_vocoder(vocoder, items, seed=args.seed, **settings["vocoder"])
    vocoder.save_pretrained(args.out / "vocoder")
    report["vocoder.final_train_mel_l1"] = round(sum(h["mel"] for h in history[-20:]) / len(history[-20:]), 4)


def step_eval(args, settings, report, corpus):
    """Held-out evaluation of the whole run: nothing here was trained on."""
    units = corpus.units()
    try:  # ASR and TTS are stage 2's tasks; stage 3's adapter answers everything as a chain
        stage2, sgpt = (SpeechGPT.from_run(args.out, device=args.device, adapter=a) for a in (False, True))
    except PipelineError as error:
        raise UserError(str(error)) from None
    limit, voice = settings["eval_tokens"], settings["answer_voice"]
    # ASR on held-out sentences: the seen voices' readings, and the unseen voice's.
    seen, answer_voice_readings = corpus.sentences("test", voice)
    unseen, _ = corpus.sentences("test_unseen_voice", voice)
    for rows, suffix in ((seen, ""), (unseen, "_unseen_voice")):
        if rows:
            items = [(units[r["id"]], r["text"]) for r in evenly_spaced(rows, settings["eval_sentences"])]
            asr = evaluate_asr(stage2, items, limit["asr"])
            report[f"stage2.asr_wer{suffix}"], report[f"stage2.asr_cer{suffix}"] = round(asr["wer"], 4), round(asr["cer"], 4)
    # TTS of held-out sentences, against the answer voice's reading of them.
    if answer_voice_readings:
        items = [(r["text"], units[r["id"]]) for r in evenly_spaced(answer_voice_readings, settings["eval_sentences"])]
        tts = evaluate_tts(stage2, items, limit["tts"])
        report["stage2.tts_unit_edit_distance"] = round(tts["unit_edit_distance"], 4)
        report["stage2.tts_whisper_wer"] = rounded(speech_whisper_wer(stage2, tts["answer_units"], [t for t, _ in items]))
    # Spoken questions about known facts in held-out phrasings: seen voices, and the unseen voice.
    for audio_split, suffix in (("test", ""), ("test_unseen_voice", "_unseen_voice")):
        items = corpus.spoken_questions("test", audio_split, units)
        if items:
            asked = evenly_spaced(items, settings["eval_spoken_questions"])
            chain = evaluate_chain(sgpt, asked, limit["chain"])
            for key in ("answer_accuracy", "transcript_wer", "speech_answer_unit_edit_distance", "well_formed", "n"):
                report[f"stage3.{key}{suffix}"] = round(chain[key], 4)
            report[f"stage3.speech_answer_whisper_wer{suffix}"] = rounded(
                speech_whisper_wer(sgpt, chain["answer_units"], [answer for _, _, answer, _ in asked]))
    # Spoken questions about facts that only the text corpus (stage 0) stated: does text knowledge reach speech?
    for audio_split, suffix in (("test_knowledge", ""), ("test_unseen_voice", "_unseen_voice")):
        items = corpus.spoken_questions("test_knowledge", audio_split, units)
        if items:
            chain = evaluate_chain(sgpt, items, limit["chain"], speech_answer=False)
            report[f"stage3.knowledge_accuracy{suffix}"] = round(chain["answer_accuracy"], 4)
    # The same questions typed.
    for pair_split, key in (("test", "text_answer_accuracy"), ("test_knowledge", "knowledge_text_accuracy")):
        typed = corpus.typed_questions(pair_split)
        if typed:
            typed = evenly_spaced(typed, settings["eval_typed_questions"])
            report[f"stage3.{key}"] = round(evaluate_text_questions(sgpt, typed, limit["chain"]), 4)
    evaluate_vocoder_on_test(args, sgpt, evenly_spaced(answer_voice_readings, settings["eval_sentences"]), units,
                             corpus.units("durations"), report)
    if not whisper_available():
        print(f"eval: {WHISPER_MISSING}")


def evaluate_vocoder_on_test(args, sgpt, test_rows, units, durations, report):
    """What a listener hears: held-out utterances of the answer voice resynthesised from their units
    (mel L1, real-time factor, re-encoded units, Whisper WER next to the original audio's)."""
    if sgpt.vocoder is None or not test_rows:
        return
    scores = evaluate_vocoder_speech(sgpt.vocoder, vocoder_data(args, test_rows, units, durations),
                                     [r["text"] for r in test_rows], sgpt.speech_to_units)
    report.update({f"vocoder.{key}": rounded(value) for key, value in scores.items()})
    report["vocoder.n"] = len(test_rows)


def rounded(value):
    return None if value is None else round(value, 4)


STEPS = {"units": step_units, "stage0": step_stage0, "stage1": step_stage1, "stage2": step_stage2,
         "stage3": step_stage3, "vocoder": step_vocoder, "eval": step_eval}


# ----------------------------------------------------------------------------- learning curves

def plot_curves(run_dir):
    """curves.png: per LM stage, training and validation loss, and the task score, against the step."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("curves.png: not drawn, matplotlib is not installed (pip install matplotlib)")
        return
    stages = [s for s in LM_STAGES if (run_dir / s / "metrics.jsonl").is_file()]
    if not stages:
        return
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        records = [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=0.8, label="train loss")
        evals = [r for r in records if "val_loss" in r]
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="valid loss")
        ax.set(title=stage, xlabel="step", ylabel="loss (nats/token)")
        scores = sorted({k for r in records for k in r} - {"step", "loss", "lr", "grad_norm", "tokens_per_s",
                                                           "epoch", "val_loss"})
        if scores:
            twin = ax.twinx()
            for key in scores:
                scored = [r for r in records if key in r]
                twin.plot([r["step"] for r in scored], [r[key] for r in scored], "s--", color="C3", label=key)
            twin.set(ylabel=", ".join(scores), ylim=(0, max(1.0, max(r[k] for r in records for k in scores if k in r))))
            twin.legend(loc="center right", fontsize=8)
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- driver

def apply_overrides(settings, assignments):
    """--set stage2.steps=900 --set lm.dim=192: values are JSON (numbers, lists, true/false) or strings."""
    settings = json.loads(json.dumps(settings))  # a deep copy
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep:
            raise UserError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set stage2.steps=900")
        *path, last = key.split(".")
        target = settings
        for part in path:
            if not isinstance(target.get(part), dict):
                raise UserError(f"--set {key}: {part!r} is not a group of settings; groups: "
                                f"{', '.join(k for k, v in target.items() if isinstance(v, dict))}")
            target = target[part]
        if last not in target and path != ["lm"]:  # lm.* may set any LMConfig field
            raise UserError(f"--set {key}: unknown setting {last!r}; settings here: {', '.join(target)}")
        try:
            target[last] = json.loads(value)
        except json.JSONDecodeError:
            target[last] = value
    return settings


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["all", *STEPS], default="all",
                        help="run one step (from the previous step's output in --out), or all of them (default)")
    parser.add_argument("--preset", choices=sorted(DEFAULTS), default="toy",
                        help="model sizes and step budgets (default: toy, sized for minutes on 2 CPU cores; smoke: a few "
                             "steps of each; speechgpt-7b: the paper's LLaMA-7B recipe, on GPUs)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="change one setting of the preset, e.g. stage2.steps=900 or lm.dim=192 (repeatable)")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parent / "tiny_data",
                        help="corpus directory with manifest.jsonl, qa.jsonl, text_corpus.txt (default: tiny_data/)")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<preset>)")
    parser.add_argument("--no-text-pretraining", action="store_true",
                        help="skip stage 0: the LM starts from nothing at stage 1 (to measure what the text brings)")
    parser.add_argument("--init-from", type=Path, default=None, metavar="DIR",
                        help="start the LM from an HF LLaMA directory (e.g. SmolLM2-135M, LLaMA-7B), "
                             "growing its vocabulary by the unit and special tokens")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help=f"CPU threads for every step (PyTorch and k-means) (default: all {os.cpu_count()} "
                             "cores; use 1 to run two jobs side by side)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run: skip finished steps, resume a stage from its checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--dry-run", action="store_true",
                        help="with --preset speechgpt-7b: print each stage's parameters, memory per GPU, tokens and "
                             "FLOPs per step, time per step on A100 and H100, and its torchrun command; then exit")
    parser.add_argument("--nproc", type=int, default=8, metavar="N",
                        help="with --dry-run: the number of GPUs (default: 8; above 8, nodes of 8)")
    parser.add_argument("--mfu", type=float, default=0.4,
                        help="with --dry-run: the model-FLOPs utilisation the times assume (default: 0.4)")
    args = parser.parse_args(argv)
    if args.dry_run and (args.preset != "speechgpt-7b" or args.overrides):
        parser.error("--dry-run prints the full-size preset as it is: use it with --preset speechgpt-7b, without --set")
    if args.nproc < 1 or not 0 < args.mfu <= 1:
        parser.error(f"--nproc {args.nproc} --mfu {args.mfu}: need at least one GPU and a utilisation in (0, 1]")
    args.out = args.out or Path("runs") / args.preset
    if args.init_from is not None and not (args.init_from / "config.json").is_file():
        parser.error(f"--init-from {args.init_from}: not an HF model directory (no config.json)")
    if args.threads < 1:
        parser.error(f"--threads {args.threads}: need at least one thread")
    if args.init_from is not None and not args.no_text_pretraining:
        args.no_text_pretraining = True  # a pretrained LM has had its text pretraining
        print("--init-from: the pretrained LM replaces stage 0 (text pretraining)")
    return args


def check_full_size(args):
    """The full-size preset trains LLaMA-7B one LM stage at a time on GPUs: name what is missing."""
    missing = []
    if args.stage not in ("stage1", "stage2", "stage3"):
        missing.append("one LM stage (--stage stage1, stage2 or stage3)")
    if args.stage in ("all", "stage1") and args.init_from is None:
        missing.append("the LLaMA-7B weights (--init-from DIR)")
    if not torch.cuda.is_available():
        missing.append("CUDA GPUs under torchrun")
    if missing:
        raise UserError(f"--preset speechgpt-7b needs {', '.join(missing)}; --dry-run prints what each stage "
                        f"costs and the command that runs it")


def main(argv=None):
    args = parse_args(argv)
    settings = apply_overrides(DEFAULTS[args.preset], args.overrides)
    if args.dry_run:  # before any data or device is touched
        try:
            print(full_size_report(settings["lm_preset"], settings["n_units"], settings["unit_layer"],
                                   settings["lora"], args.nproc, args.mfu))
        except ValueError as error:  # an --nproc that no stage's batch, or no node of 8, divides
            raise UserError(str(error)) from None
        return
    if args.preset == "speechgpt-7b":
        check_full_size(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    steps = [s for s in STEPS if not skipped(args, settings, s)]
    if args.stage != "all" and skipped(args, settings, args.stage):
        raise UserError(f"--stage {args.stage}: the settings skip it (--no-text-pretraining, or 0 steps)")
    corpus = Corpus(args, settings)  # checks the whole corpus before any work
    if "stage0" in steps and args.stage in ("all", "stage0"):
        corpus.text_corpus()
    args.out.mkdir(parents=True, exist_ok=True)
    report_path = args.out / "report.json"
    keep = report_path.exists() and (args.stage != "all" or args.resume)
    report = json.loads(report_path.read_text()) if keep else {}
    (args.out / "settings.json").write_text(json.dumps({"preset": args.preset, **settings}, indent=1) + "\n")

    from threadpoolctl import threadpool_limits  # scikit-learn's k-means threads follow --threads too
    with threadpool_limits(args.threads):
        for name in (steps if args.stage == "all" else [args.stage]):
            if args.resume and args.stage == "all" and f"{name}.seconds" in report:
                print(f"== {name}: already done ({report_path})")
                continue
            if not args.resume:  # a fresh start: no stale checkpoint may be resumed from
                (args.out / name / "ckpt.pt").unlink(missing_ok=True)
                (args.out / name / "metrics.jsonl").unlink(missing_ok=True)
            step_start = time.time()
            STEPS[name](args, settings, report, corpus)
            report[f"{name}.seconds"] = round(time.time() - step_start, 1)
            report_path.write_text(json.dumps(report, indent=2) + "\n")
            print(f"== {name} done in {report[f'{name}.seconds']:.0f} s")
    plot_curves(args.out)
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
