"""Speech-to-speech latency of a trained run: a spoken question in, a spoken answer out, on CPU.

Times the three parts of one exchange separately, with greedy decoding so every repeat does the
same work: the ears (HuBERT + k-means), the LM (prompt + generation of transcript, text answer and
answer units) and the mouth (the vocoder). Prints the median of several repeats.

    python train.py                                   # makes runs/toy
    python benchmarks/bench_chat.py --run runs/toy    # a ~3 s held-out question from tiny_data
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from speechgpt_min.audio import load_audio
from speechgpt_min.pipeline import SpeechGPT, parse_response

ROOT = Path(__file__).resolve().parents[1]


def pick_question(data, seconds):
    """The held-out spoken question whose length is closest to `seconds`."""
    rows = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]
    questions = [r for r in rows if r.get("kind") == "q" and r["split"] == "test"]
    return min(questions, key=lambda r: abs(r["duration"] - seconds))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "toy")
    parser.add_argument("--data", type=Path, default=ROOT / "tiny_data")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of the spoken question")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    sgpt = SpeechGPT.from_run(args.run, device="cpu")
    question = pick_question(args.data, args.seconds)
    wav = load_audio(args.data / question["audio"])
    print(f"question {question['id']} ({len(wav) / 16000:.2f} s): {question['text']!r}; "
          f"{torch.get_num_threads()} threads")

    times = {"encoder": [], "lm": [], "vocoder": []}
    for repeat in range(args.repeats + 1):  # the first exchange warms up
        start = time.perf_counter()
        units = sgpt.speech_to_units(wav)
        encoded = time.perf_counter()
        text = sgpt.generate(sgpt.prompt("dialogue", units), max_new_tokens=384, temperature=0)
        generated = time.perf_counter()
        answer = parse_response(text, sgpt.tokenizer.n_units)
        speech = sgpt.units_to_speech(answer.answer_units)
        spoken = time.perf_counter()
        if repeat:
            for key, seconds in (("encoder", encoded - start), ("lm", generated - encoded), ("vocoder", spoken - generated)):
                times[key].append(seconds)

    n_tokens = len(sgpt.tokenizer.encode(text))
    answer_seconds = 0.0 if speech is None else len(speech) / 16000
    medians = {key: statistics.median(values) for key, values in times.items()}
    print(f"response: {text!r}")
    print(f"LM generated {n_tokens} tokens ({n_tokens / medians['lm']:.0f} tokens/s); "
          f"spoken answer {answer_seconds:.2f} s")
    print("| part | median seconds |\n| --- | ---: |")
    for key, value in medians.items():
        print(f"| {key} | {value:.3f} |")
    print(f"| **total** | **{sum(medians.values()):.3f}** |")


if __name__ == "__main__":
    main()
