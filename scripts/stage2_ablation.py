"""How fast does stage 2 learn to hear? docs/recipe.md's tables.

A fresh toy LM learns ASR (and, with --tts, TTS in the answer voice) on a run's units, optionally after
stage 0 (text pretraining) and stage 1 (unit sequences), then transcribes held-out sentences greedily:
100 test sentences of the seen voices, 100 of the unseen voice, 50 of its own training utterances.

    python train.py --stage units --out runs/u                       # the units (~9 minutes, 1 thread)
    python scripts/stage2_ablation.py --units runs/u/units.jsonl --out runs/abl/asr
    python scripts/stage2_ablation.py --units runs/u/units.jsonl --out runs/abl/s0 --tts --stage0 300

--units may also be any JSON-lines file of {"id", "units"} (e.g. festival's phones, an oracle); only
utterances it covers are used. Prints and writes OUT/result.json.
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from speechgpt_min.data import (ASR_INSTRUCTIONS, SYSTEM_PROMPT, TTS_INSTRUCTIONS, asr_dialogue,  # noqa: E402
                                encode_dialogues, in_split, load_manifest, load_text_corpus, pack_blocks,
                                stage0_texts, stage1_texts, text_examples, tts_dialogue)
from speechgpt_min.evaluate import evaluate_asr, evenly_spaced  # noqa: E402
from speechgpt_min.model import LMConfig, Transformer  # noqa: E402
from speechgpt_min.pipeline import SpeechGPT  # noqa: E402
from speechgpt_min.tokenizer import Tokenizer  # noqa: E402
from speechgpt_min.trainer import TrainConfig, train  # noqa: E402
from speechgpt_min.weights import reinit_rows  # noqa: E402

ANSWER_VOICE = "fest_slt"  # tiny_data's answer voice, as in train.py


def schedule(out, steps, batch_size, warmup, eval_every=0):
    return TrainConfig(out_dir=str(out), steps=steps, batch_size=batch_size, lr=2e-3, min_lr=2e-4,
                       warmup_steps=warmup, eval_every=eval_every or steps, checkpoint_every=0, resume=False,
                       progress=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--units", type=Path, required=True, help="units.jsonl of a run (or any id -> units file)")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parent.parent / "tiny_data")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=600, help="stage 2 steps (default: 600)")
    parser.add_argument("--tts", action="store_true", help="also TTS, the answer voice's utterances as targets")
    parser.add_argument("--prompt", action="store_true", help="the released system prompt before every example")
    parser.add_argument("--stage0", type=int, default=0, help="steps of text pretraining first (64 lines each)")
    parser.add_argument("--keep-unit-rows", action="store_true",
                        help="keep the embeddings stage 0 left for the tokens it never saw (train.py renews them)")
    parser.add_argument("--stage1", type=int, default=0, help="steps of unit sequences first (16 x 256 tokens)")
    parser.add_argument("--replay", type=float, default=0.0, help="text lines mixed into stage 2, per example")
    parser.add_argument("--eval-every", type=int, default=0, help="decode 16 valid sentences every N steps")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)

    units = {r["id"]: r["units"] for r in map(json.loads, args.units.read_text().splitlines())}
    rows = [r for r in load_manifest(args.data / "manifest.jsonl") if r["id"] in units]
    rng = random.Random(0)
    train_rows = in_split(rows, "train")
    dialogues = [asr_dialogue(units[r["id"]], r["text"], rng.choice(ASR_INSTRUCTIONS)) for r in train_rows]
    if args.tts:
        dialogues += [tts_dialogue(r["text"], units[r["id"]], rng.choice(TTS_INSTRUCTIONS))
                      for r in train_rows if r["voice"] == ANSWER_VOICE]
    valid = [asr_dialogue(units[r["id"]], r["text"], rng.choice(ASR_INSTRUCTIONS)) for r in in_split(rows, "valid")]
    corpus = load_text_corpus(args.data / "text_corpus.txt")
    tokenizer = Tokenizer.train([SYSTEM_PROMPT] + [d.text() for d in dialogues] + corpus, n_units=100)
    model = Transformer(LMConfig.from_preset("toy", vocab_size=tokenizer.vocab_size))

    def sentences(split, n):  # read sentences of the other voices, evenly spread
        chosen = [r for r in rows if r["split"] == split and r["kind"] == "sent" and r["voice"] != ANSWER_VOICE]
        return [(units[r["id"]], r["text"]) for r in evenly_spaced(chosen, n)]

    start = time.time()
    if args.stage0:
        lines = text_examples(tokenizer, stage0_texts(corpus))
        train(model, lines, schedule(args.out / "stage0", args.stage0, 64, 20))
        if not args.keep_unit_rows:  # as train.py does: fresh rows for the tokens text never showed
            seen = {token for example in lines for token in example.tokens}
            reinit_rows(model, [i for i in range(tokenizer.vocab_size) if i not in seen])
    if args.stage1:
        blocks = pack_blocks(tokenizer, stage1_texts(train_rows, units), 256)
        train(model, blocks, schedule(args.out / "stage1", args.stage1, 16, 15))
    system_prompt = SYSTEM_PROMPT if args.prompt else ""
    train_set = encode_dialogues(tokenizer, dialogues, 1024, system_prompt=system_prompt)
    if args.replay:
        lines = text_examples(tokenizer, stage0_texts(corpus, seed=1))
        train_set += lines[:int(args.replay * len(train_set))]
    watched = sentences("valid", 16)

    def score(lm):
        return {"cer_valid": evaluate_asr(SpeechGPT(lm, tokenizer, system_prompt=system_prompt), watched, 64,
                                          progress=False)["cer"]}

    stage2_start = time.time()
    history = train(model, train_set, schedule(args.out / "stage2", args.steps, 16, 20, args.eval_every),
                    encode_dialogues(tokenizer, valid, 1024, system_prompt=system_prompt), score)
    stage2_seconds = time.time() - stage2_start
    sgpt = SpeechGPT(model, tokenizer, system_prompt=system_prompt)
    result = {name: round(evaluate_asr(sgpt, items, 64, progress=False)["cer"], 4) for name, items in
              (("cer_test", sentences("test", 100)), ("cer_unseen_voice", sentences("test_unseen_voice", 100)),
               ("cer_own_training", [(units[r["id"]], r["text"]) for r in train_rows[:50]]))}
    result.update(stage2_seconds=round(stage2_seconds), total_seconds=round(time.time() - start),
                  curve=[(h["step"], round(h["val_loss"], 3), round(h["cer_valid"], 3)) for h in history
                         if "val_loss" in h], args={k: str(v) for k, v in vars(args).items()})
    print(json.dumps(result))
    (args.out / "result.json").write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
