"""How much faster is batched evaluation? The same N prompts decoded greedily one at a time and
batch_size at a time (evaluate.chat_in_batches -> SpeechGPT.chat_batch), side by side, on one thread.

    python scripts/bench_eval.py                                  # a random toy-preset LM
    python scripts/bench_eval.py --run runs/toy --task dialogue   # a trained run, held-out questions

With a run the prompts are tiny_data's held-out test items (ASR and dialogue: their units, from the
run's units.jsonl; TTS: their texts), through the stage-2 model for ASR and TTS and the stage-3 one
for dialogue, as train.py evaluates them. The random model writes no <eoa>, so every response runs
to max_new_tokens. Prints the seconds of each, the speed-up, and how many responses differ (batched
greedy decoding gives each prompt its own greedy text, up to float rounding: 0 expected).
"""
import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from speechgpt_min.data import SYSTEM_PROMPT, load_manifest  # noqa: E402
from speechgpt_min.evaluate import chat_in_batches, evenly_spaced  # noqa: E402
from speechgpt_min.model import LMConfig, Transformer  # noqa: E402
from speechgpt_min.pipeline import SpeechGPT  # noqa: E402
from speechgpt_min.tokenizer import Tokenizer  # noqa: E402
from speechgpt_min.units import read_run_units  # noqa: E402

MAX_NEW_TOKENS = {"asr": 64, "tts": 256, "dialogue": 384}  # train.py's eval_tokens
TOY_UNITS = 100


def run_inputs(run, data, task, n):
    """n of tiny_data's held-out test items for a task, spread over the split: their units as the
    run heard them (ASR: sentences, dialogue: questions), or their texts (TTS: sentences)."""
    kind = "q" if task == "dialogue" else "sent"
    rows = [r for r in load_manifest(data / "manifest.jsonl") if r["split"] == "test" and r["kind"] == kind]
    rows = evenly_spaced(rows, n)
    if task == "tts":
        return [dict(text=r["text"]) for r in rows]
    units, _, _ = read_run_units(run)
    return [dict(units=units[r["id"]]) for r in rows]


def toy_pipeline(data):
    """A randomly initialised toy-preset LM with a word tokenizer trained on tiny_data's sentences."""
    texts = [SYSTEM_PROMPT] + [r["text"] for r in load_manifest(data / "manifest.jsonl")]
    tokenizer = Tokenizer.train(texts, n_units=TOY_UNITS, min_count=1)
    torch.manual_seed(0)
    return SpeechGPT(Transformer(LMConfig.from_preset("toy", vocab_size=len(tokenizer))), tokenizer)


def toy_inputs(data, task, n):
    """n random unit sequences of 10-60 units (ASR, dialogue), or n test sentences (TTS)."""
    if task == "tts":
        rows = [r for r in load_manifest(data / "manifest.jsonl") if r["split"] == "test" and r["kind"] == "sent"]
        return [dict(text=r["text"]) for r in evenly_spaced(rows, n)]
    rng = random.Random(0)
    return [dict(units=[rng.randrange(TOY_UNITS) for _ in range(rng.randint(10, 60))]) for _ in range(n)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a train.py run (default: a random toy LM)")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parent.parent / "tiny_data")
    parser.add_argument("--task", choices=list(MAX_NEW_TOKENS), default="asr")
    parser.add_argument("--n", type=int, default=64, help="prompts (default: 64)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, help="default: train.py's for the task (asr 64, tts 256, "
                                                            "dialogue 384)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    max_new_tokens = args.max_new_tokens or MAX_NEW_TOKENS[args.task]
    if args.run is not None:
        sgpt = SpeechGPT.from_run(args.run, device="cpu", adapter=args.task == "dialogue")
        inputs = run_inputs(args.run, args.data, args.task, args.n)
    else:
        sgpt = toy_pipeline(args.data)
        inputs = toy_inputs(args.data, args.task, args.n)
    print(f"{args.task}: {len(inputs)} prompts, up to {max_new_tokens} new tokens each, "
          f"LM of {sgpt.lm.num_params() / 1e6:.1f}M parameters, 1 thread")
    sgpt.chat_batch(inputs[:2], args.task, 4)  # warm-up
    results, seconds = {}, {}
    for batch_size in (1, args.batch_size):
        start = time.perf_counter()
        results[batch_size] = chat_in_batches(sgpt, inputs, batch_size, progress=False, task=args.task,
                                              max_new_tokens=max_new_tokens)
        seconds[batch_size] = time.perf_counter() - start
        print(f"batch_size {batch_size:3d}: {seconds[batch_size]:7.1f} s")
    differ = sum(a.response.text != b.response.text for a, b in zip(results[1], results[args.batch_size]))
    print(f"speed-up {seconds[1] / seconds[args.batch_size]:.1f}x; responses that differ: {differ} of {len(inputs)}")


if __name__ == "__main__":
    main()
