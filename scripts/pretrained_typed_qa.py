"""What a pretrained LM answers to tiny_data's typed questions before any stage (docs/scaling.md).

Loads an HF LLaMA directory the way `train.py --init-from DIR` does (weights.load_pretrained, then
Tokenizer.from_pretrained with the unit and special tokens added and the embedding grown), and asks
the 100 test questions (evenly spaced over split "test") and the 63 "test_knowledge" questions of
tiny_data/qa.jsonl, typed, greedily. Two scorings:

  exact    the package's own prompt format (SpeechGPT.chat, task "dialogue", as evaluate_text_questions
           asks it) and exact match of the answer sentence as tiny_data writes it ("two plus three is
           five"): what the trained pipeline is scored on. A model that never saw the format gets ~0.
  keyword  the model's own chat template (chat_template.jinja or tokenizer_config.json's, else a plain
           "Question: ...\\nAnswer:"), and a hit when the answer's key word (its last word, "five")
           is a word of the reply's first line, digits spelt out ("5" -> "five"), more often than
           in the question (an echo of "two plus zero" is no answer): what it knows.

    python scripts/pretrained_typed_qa.py --model /work/runs/smollm2-135m-instruct --out /work/runs/smol_qa.json

Prints both accuracies per split and writes them, with every reply, to --out (JSON).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from speechgpt_min.data import load_pairs  # noqa: E402
from speechgpt_min.evaluate import evaluate_text_questions, evenly_spaced, normalize_text, spell_numbers  # noqa: E402
from speechgpt_min.model import left_pad  # noqa: E402
from speechgpt_min.pipeline import SpeechGPT  # noqa: E402
from speechgpt_min.tokenizer import Tokenizer  # noqa: E402
from speechgpt_min.weights import expand_vocab, load_pretrained  # noqa: E402


def chat_prompt(model_dir, question):
    """The model's own chat template with one user turn and the assistant's turn opened."""
    template = None
    if (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text()
    elif (model_dir / "tokenizer_config.json").is_file():
        template = json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template")
    if not template:
        return f"Question: {question}\nAnswer:"
    import jinja2
    return jinja2.Template(template).render(messages=[{"role": "user", "content": question}],
                                            add_generation_prompt=True)


def keyword_hit(question, answer, reply):
    """Is the answer's last word ("five") a word of the reply's first line, digits spelt out, more often
    than in the question? ("how much is two plus zero": "Two plus zero is a classic problem" echoes the
    question and misses; "2 + 0 = 2" hits.)"""
    lines = [line for line in reply.strip().splitlines() if line.strip()]
    first = normalize_text(spell_numbers(lines[0] if lines else "")).split()
    key = answer.split()[-1]
    return first.count(key) > normalize_text(question).split().count(key)


@torch.no_grad()
def own_template_replies(model, tokenizer, model_dir, questions, max_new_tokens, batch_size=16):
    stop = [i for i in (tokenizer.backend.tk.token_to_id("<|im_end|>"), tokenizer.eos_id) if i is not None]
    replies = []
    for start in range(0, len(questions), batch_size):
        prompts = [tokenizer.encode(chat_prompt(model_dir, q)) for q in questions[start:start + batch_size]]
        ids, pad_mask = left_pad(prompts, pad_id=tokenizer.eos_id)
        out = model.generate(ids, max_new_tokens, temperature=0, stop_ids=stop, pad_mask=pad_mask)
        for row in out[:, ids.shape[1]:].tolist():
            row = row[:row.index(stop[0]) if stop[0] in row else len(row)]
            replies.append(tokenizer.decode(row))
    return replies


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="HF LLaMA directory (config.json, safetensors)")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parent.parent / "tiny_data")
    parser.add_argument("--out", type=Path, required=True, help="result JSON")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--limit", type=int, default=None, help="first N questions of each split (a quick check)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_pretrained(args.model).eval()  # as lm_stages.new_language_model does for --init-from
    tokenizer = Tokenizer.from_pretrained(args.model, n_units=40)
    expand_vocab(model, max(model.config.vocab_size, tokenizer.vocab_size))
    sgpt = SpeechGPT(model, tokenizer)

    pairs = load_pairs(args.data / "qa.jsonl")
    splits = {"test": evenly_spaced([p for p in pairs if p["split"] == "test"], 100),
              "test_knowledge": [p for p in pairs if p["split"] == "test_knowledge"]}
    result = {"model": str(args.model), "max_new_tokens": args.max_new_tokens}
    for split, chosen in splits.items():
        items = [(p["question"]["text"], p["answer"]["text"]) for p in chosen][:args.limit]
        start = time.time()
        exact = evaluate_text_questions(sgpt, items, args.max_new_tokens, progress=False)
        replies = own_template_replies(model, tokenizer, args.model, [q for q, _ in items], args.max_new_tokens)
        hits = [keyword_hit(q, a, r) for (q, a), r in zip(items, replies)]
        result[split] = {"n": len(items), "exact_package_format": exact, "keyword_own_template": sum(hits) / len(hits),
                         "seconds": round(time.time() - start, 1),
                         "replies": [dict(question=q, answer=a, reply=r, hit=h) for (q, a), r, h in zip(items, replies, hits)]}
        print(f"{split}: {len(items)} questions, exact match (package format) {exact:.2f}, "
              f"key word in the first line (own chat template) {sum(hits) / len(hits):.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
