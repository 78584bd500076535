"""Can the toy LM learn to answer typed questions from text alone? docs/recipe.md's stage-0 table.

A new toy LM learns the training question/answer pairs typed, in the chain's text-to-text format
("[Human]: what is two plus three <eoh> [SpeechGPT]: [ta] two plus three is five<eoa>."), with
--corpus R text-corpus lines mixed in per pair (--statements: only the lines that state facts,
facts.jsonl's), and answers held-out typed questions greedily
(known facts in phrasings never paired with them; and, at the end, the knowledge split's facts that
only the text corpus states). Prints and writes OUT/result.json, with accuracy against steps.

    python scripts/typed_qa.py --out runs/typed/qa                    # the pairs alone
    python scripts/typed_qa.py --out runs/typed/mixed --corpus 1.0    # one corpus line per pair

Recipe §11, the knowledge split's lookups:

    python scripts/typed_qa.py --out runs/world/mixed --corpus 1.7 --statements   # every fact statement mixed in
    python scripts/typed_qa.py --out runs/world/stage0 --stage0 600 --statements  # a stage 0 of them, then the pairs
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from speechgpt_min.data import (SYSTEM_PROMPT, chain_dialogue, encode_dialogues, load_pairs,  # noqa: E402
                                load_fact_statements, load_text_corpus, stage0_texts,
                                text_examples)
from speechgpt_min.evaluate import (evaluate_text_questions, evenly_spaced, exact_match_accuracy,  # noqa: E402
                                    fact_completion_accuracy, text_answers)
from speechgpt_min.model import LMConfig, Transformer  # noqa: E402
from speechgpt_min.pipeline import SpeechGPT  # noqa: E402
from speechgpt_min.tokenizer import Tokenizer  # noqa: E402
from speechgpt_min.trainer import TrainConfig, train  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parent.parent / "tiny_data")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1500, help="training steps of 32 examples (default: 1500)")
    parser.add_argument("--corpus", type=float, default=0.0, help="text-corpus lines mixed in per pair (default: 0)")
    parser.add_argument("--statements", action="store_true",
                        help="the text: only the lines that state facts (facts.jsonl), not the whole corpus")
    parser.add_argument("--stage0", type=int, default=0, metavar="STEPS",
                        help="first train on the text alone, STEPS steps of 32 lines (default: 0)")
    parser.add_argument("--prompt", action="store_true", help="the released system prompt before every pair")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    pairs = load_pairs(args.data / "qa.jsonl")
    corpus = load_text_corpus(args.data / "text_corpus.txt")
    if args.statements:
        corpus = load_fact_statements(args.data / "facts.jsonl")
    train_pairs = [p for p in pairs if p["split"] == "train"]
    typed = lambda chosen: [(p["question"]["text"], p["answer"]["text"]) for p in chosen]  # noqa: E731
    test = typed(evenly_spaced([p for p in pairs if p["split"] == "test"], 100))
    knowledge_pairs = [p for p in pairs if p["split"] == "test_knowledge"]
    knowledge = typed(knowledge_pairs)
    own = typed(evenly_spaced(train_pairs, 50))
    dialogues = [chain_dialogue("t2t", q, a) for q, a in typed(train_pairs)]
    tokenizer = Tokenizer.train([SYSTEM_PROMPT] + [d.text() for d in dialogues] + corpus, n_units=40)
    model = Transformer(LMConfig.from_preset("toy", vocab_size=tokenizer.vocab_size))
    system_prompt = SYSTEM_PROMPT if args.prompt else ""
    train_set = encode_dialogues(tokenizer, dialogues, 1024, system_prompt=system_prompt)
    train_set += text_examples(tokenizer, stage0_texts(corpus, seed=1))[:int(args.corpus * len(train_set))]
    answering = lambda lm: SpeechGPT(lm, tokenizer, system_prompt=system_prompt)  # noqa: E731

    def score(lm):  # 50 held-out questions and 20 training questions, greedily
        return {"typed_test": evaluate_text_questions(answering(lm), test[:50], 24, progress=False),
                "typed_own": evaluate_text_questions(answering(lm), own[:20], 24, progress=False)}

    # The lookups of the knowledge split (no sums or differences) as statements: "the owl says hoot".
    statements = [p["answer"]["text"] for p in knowledge_pairs if p["skill"] not in ("plus", "minus")]

    start = time.time()
    if args.stage0:  # a stage 0: the corpus's lines alone, each its own example
        corpus_set = text_examples(tokenizer, stage0_texts(corpus, seed=2))
        train(model, corpus_set, TrainConfig(out_dir=str(args.out / "stage0"), steps=args.stage0, batch_size=32, lr=2e-3,
                                             min_lr=2e-4, warmup_steps=20, eval_every=args.stage0, checkpoint_every=0,
                                             resume=False, progress=False), corpus_set[:32])
        print(f"after stage 0: completes {fact_completion_accuracy(answering(model), statements):.2f} "
              f"of the {len(statements)} lookup statements", flush=True)
    cfg = TrainConfig(out_dir=str(args.out), steps=args.steps, batch_size=32, lr=2e-3, min_lr=2e-4, warmup_steps=20,
                      eval_every=args.eval_every, checkpoint_every=0, resume=False, progress=False)
    history = train(model, train_set, cfg, train_set[:32], score)
    sgpt = answering(model)
    result = {name: round(evaluate_text_questions(sgpt, items, 24, progress=False), 4)
              for name, items in (("typed_test", test), ("typed_own", own))}
    said = text_answers(sgpt, knowledge, 24, progress=False)  # each knowledge question decoded once
    result["typed_knowledge"] = round(exact_match_accuracy([a for _, a in knowledge], said), 4)
    for skill in sorted({p["skill"] for p in knowledge_pairs}):
        mine = [(p["answer"]["text"], answer) for p, answer in zip(knowledge_pairs, said) if p["skill"] == skill]
        result["knowledge_" + skill] = round(exact_match_accuracy(*zip(*mine)), 4)
    if statements:
        result["lookup_fact_completion"] = round(fact_completion_accuracy(sgpt, statements), 4)
        for pair, answer in zip(knowledge_pairs, said):
            if pair["skill"] not in ("plus", "minus"):
                print(f"{pair['question']['text']!r} -> {answer!r} (truth: {pair['answer']['text']!r})")
    result.update(seconds=round(time.time() - start),
                  curve=[(h["step"], h["typed_test"], h["typed_own"]) for h in history if "typed_test" in h],
                  args={k: str(v) for k, v in vars(args).items()})
    print(json.dumps(result))
    (args.out / "result.json").write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
