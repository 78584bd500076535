"""train.py's LM stages, in order: the language model learns text, then units, then both together,
then to answer a spoken question through text (SpeechGPT's three stages, after the toy's stage 0).

    step_stage0     text pretraining: the corpus's text and its training questions typed
    step_stage1     modality adaptation: next-unit prediction on the training speech's units
    step_stage2     cross-modal instruction: ASR (every voice) and TTS (the answer voice), all weights
    step_stage3     chain of modality: spoken question -> transcript -> text answer -> spoken answer (LoRA)
    plot_curves     curves.png: each stage's losses and task scores against the step

Stage 0 builds the tokenizer and a new LM (new_language_model); stages 1 and 2 start from the model
of the last earlier stage that ran (previous_lm_stage: a stage the settings skip hands its place on;
none: a new LM, or the --init-from weights), and stage 3 adds LoRA to stage 2's. Each trains with
trainer.train and saves into STAGE/model (stage 3: STAGE/adapter). Each step is
step_NAME(args, settings, report, corpus), as in speech_steps.py.
"""
import json
import random

from speechgpt_min.data import (ASR_INSTRUCTIONS, SYSTEM_PROMPT, TTS_INSTRUCTIONS, encode_dialogues, in_split,
                                pack_blocks, stage0_texts, stage1_texts, stage2_dialogues, stage3_dialogues,
                                text_examples)
from speechgpt_min.evaluate import (evaluate_asr, evaluate_chain, evaluate_text_questions, evenly_spaced,
                                    fact_completion_accuracy, unigram_loss)
from speechgpt_min.lora import LoRAConfig, inject, save_adapter
from speechgpt_min.model import LMConfig, Transformer
from speechgpt_min.pipeline import SpeechGPT
from speechgpt_min.run_corpus import UserError
from speechgpt_min.tokenizer import Tokenizer
from speechgpt_min.trainer import TrainConfig, train
from speechgpt_min.weights import expand_vocab, load_pretrained, reinit_rows, save_pretrained

LM_STAGES = ("stage0", "stage1", "stage2", "stage3")


# ----------------------------------------------------------------------------- what every stage shares

def train_config(args, settings, stage):
    defaults = dict(eval_every=max(1, settings[stage]["steps"] // 8), checkpoint_every=100)  # --set may change them
    return TrainConfig(out_dir=str(args.out / stage), seed=args.seed, device=args.device, resume=args.resume,
                       **{**defaults, **settings[stage]})


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


# ----------------------------------------------------------------------------- the stages

def step_stage0(args, settings, report, corpus):
    """Text pretraining: next-token prediction on the corpus's text, where the world's facts are stated,
    and on the typed training questions' answers (stage0_examples)."""
    model, tokenizer = new_language_model(args, settings, corpus)
    train_set = stage0_examples(settings, corpus, tokenizer, model.config.max_seq_len, args.seed)
    valid_sentences, _ = corpus.sentences("valid", answer_voice=None)  # sentences the text corpus never states
    val_set = text_examples(tokenizer, sorted({r["text"] for r in valid_sentences}))
    watched = watched_facts(settings, corpus)
    typed = evenly_spaced(corpus.typed_questions("valid"), 2 * settings["watch"])

    def score(lm):  # does the model complete the statement of a fact, and answer a typed question?
        sgpt = SpeechGPT(lm, tokenizer)
        scores = {"fact_accuracy": fact_completion_accuracy(sgpt, watched)}
        if settings["typed_qa"].get("stage0"):
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
    """Stage 0's text: the corpus's lines, and typed_qa.stage0 copies of the training pairs as typed
    questions (typed_pairs). The toy's stand-in for what an LLM brings to SpeechGPT: it knows the world
    from text and already answers questions typed to it, so stage 3 only has to chain hearing,
    answering and speaking."""
    examples = text_examples(tokenizer, stage0_texts(corpus.text_corpus(), seed))
    examples += typed_pairs(settings, corpus, tokenizer, context, seed, "stage0")
    random.Random(seed).shuffle(examples)
    return examples


def watched_facts(settings, corpus):
    """A few facts' statements ("the owl is brown") for a stage to complete at every evaluation: held-out
    facts (valid), and facts that only the text states (test_knowledge)."""
    facts = {p["answer"]["text"] for p in corpus.pairs
             if p["split"] in ("valid", "test_knowledge") and p.get("skill") != "command"}
    return evenly_spaced(sorted(facts), 2 * settings["watch"])


def copies_of(items, copies, seed):
    """`copies` times the list; a fractional part adds that share of it, chosen by `seed`
    (2.25 -> twice every item, then a quarter of them once more)."""
    whole, part = int(copies), copies - int(copies)
    return list(items) * whole + random.Random(seed).sample(list(items), round(part * len(items)))


def typed_pairs(settings, corpus, tokenizer, context, seed, stage):
    """typed_qa[stage] copies of the training pairs as typed questions, in the chain's text-to-text format
    ("[Human]: what is two plus three <eoh> [SpeechGPT]: [ta] two plus three is five<eoa>"). In stage 2,
    beside the fact statements, the LM learns to answer from the facts with every weight (recipe §13)."""
    copies = settings["typed_qa"].get(stage, 0)
    if copies == 0:
        return []
    pairs = stage3_dialogues(in_split(corpus.pairs, "train"), {}, seed, variants=("t2t",))
    typed = copies_of(encode_dialogues(tokenizer, pairs, context), copies, seed)
    print(f"{stage}: {len(typed)} typed questions ({copies} x each training pair)")
    return typed


def replay_examples(args, settings, corpus, tokenizer, stage):
    """Text replay: the corpus's fact statements, each text_replay[stage] times, mixed into the stage's
    examples, so that the LM learns the facts beside hearing, speaking and answering, and keeps them
    (no catastrophic forgetting). Each statement is an example of its own, BOS + statement + EOS (packed
    into blocks instead, one copy of them carried less knowledge: recipe §13). Without a stage 0 it is
    the only text the LM reads; --no-text-pretraining turns it off with stage 0."""
    copies = settings["text_replay"].get(stage, 0)
    if args.no_text_pretraining or copies == 0:
        return []
    statements = copies_of(corpus.fact_statements(), copies, args.seed)
    print(f"{stage}: {len(statements)} fact statements replayed ({copies} x each)")
    return text_examples(tokenizer, statements)


def text_stream(cfg, examples, text):
    """A stage's text (fact statements, typed questions) beside its dialogues -> (train_set, text_set).
    With the stage's text_batch_size > 0 the text is a stream of its own: that many of its examples in
    every step, their mean loss added to the dialogues' (trainer.train), so the text takes no share of
    the dialogues' loss (recipe §14). With 0 it is mixed into the dialogues, one loss over both."""
    return (examples, text) if cfg.text_batch_size else (examples + text, [])


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
    replayed = replay_examples(args, settings, corpus, tokenizer, "stage2")
    typed_examples = typed_pairs(settings, corpus, tokenizer, context, args.seed, "stage2")
    cfg = train_config(args, settings, "stage2")
    train_set, text_set = text_stream(cfg, train_set, replayed + typed_examples)
    others, _ = corpus.sentences("valid", voice)
    watched = [(units[r["id"]], r["text"]) for r in evenly_spaced(others, settings["watch"])]
    facts = watched_facts(settings, corpus) if replayed else []
    typed = evenly_spaced(corpus.typed_questions("valid"), 2 * settings["watch"]) if typed_examples else []

    def score(lm):  # does the model hear, and (with text mixed in) complete a fact and answer a typed question?
        sgpt = SpeechGPT(lm, tokenizer)
        scores = {"asr_cer": evaluate_asr(sgpt, watched, settings["eval_tokens"]["asr"], progress=False)["cer"]}
        if facts:
            scores["fact_accuracy"] = fact_completion_accuracy(sgpt, facts)
        if typed:
            scores["typed_accuracy"] = evaluate_text_questions(sgpt, typed, settings["eval_tokens"]["chain"], progress=False)
        return scores

    history = train(model, train_set, cfg, val_set, score if watched else None, text_set)
    save_stage(args, "stage2", model, tokenizer)
    report["stage2.val_loss"] = val_loss(history)
    watched_scores = ", ".join(f"{key} {history[-1][key]:.2f}" for key in ("asr_cer", "fact_accuracy", "typed_accuracy")
                               if key in history[-1])
    print(f"stage2: validation loss {report['stage2.val_loss']}; on a few held-out examples: {watched_scores}")


def step_stage3(args, settings, report, corpus):
    """Chain of modality: LoRA on the stage-2 model (the base stays frozen)."""
    units = corpus.units()
    model, tokenizer = load_stage(args, "stage2")
    lora = LoRAConfig.from_preset(settings["lora"])
    inject(model, lora)
    context = model.config.max_seq_len
    train_set = encode_dialogues(tokenizer, stage3_dialogues(in_split(corpus.pairs, "train"), units, args.seed), context)
    cfg = train_config(args, settings, "stage3")
    train_set, text_set = text_stream(cfg, train_set, replay_examples(args, settings, corpus, tokenizer, "stage3"))
    val_set = encode_dialogues(tokenizer, stage3_dialogues(in_split(corpus.pairs, "valid"), units, args.seed), context)
    watched = evenly_spaced(corpus.spoken_questions("valid", "valid", units), settings["watch"])

    def score(lm):
        chain = evaluate_chain(SpeechGPT(lm, tokenizer), watched, settings["eval_tokens"]["chain"], progress=False,
                               speech_answer=False)
        return {"answer_accuracy": chain["answer_accuracy"]}

    history = train(model, train_set, cfg, val_set, score if watched else None, text_set)
    save_adapter(model, args.out / "stage3" / "adapter", lora, base_model_name_or_path=str(args.out / "stage2" / "model"))
    report["stage3.val_loss"] = val_loss(history)
    print(f"stage3: validation loss {report['stage3.val_loss']}, answer accuracy on {len(watched)} valid spoken "
          f"questions {history[-1].get('answer_accuracy')}")


# ----------------------------------------------------------------------------- learning curves

def plot_curves(run_dir):
    """curves.png: per LM stage, training (and text stream) and validation loss, and the task scores,
    against the step."""
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
        texts = [r for r in records if "text_loss" in r]  # a text stream's own loss (stage 2)
        if texts:
            ax.plot([r["step"] for r in texts], [r["text_loss"] for r in texts], lw=0.8, color="C7", alpha=0.6,
                    label="text loss")
        evals = [r for r in records if "val_loss" in r]
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="valid loss")
        ax.set(title=stage, xlabel="step", ylabel="loss (nats/token)")
        scores = sorted({k for r in records for k in r} - {"step", "loss", "lr", "grad_norm", "tokens_per_s",
                                                           "seconds", "epoch", "val_loss", "text_loss"})
        if scores:
            twin = ax.twinx()
            for key, color in zip(scores, ("C3", "C2", "C4", "C5")):
                scored = [r for r in records if key in r]
                twin.plot([r["step"] for r in scored], [r[key] for r in scored], "s--", color=color, label=key)
            twin.set(ylabel=", ".join(scores), ylim=(0, max(1.0, max(r[k] for r in records for k in scores if k in r))))
            twin.legend(loc="center right", fontsize=8)
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=110)
    plt.close(fig)

