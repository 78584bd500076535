"""What do the units cost ASR? A run's stage-2 model transcribes held-out sentences twice: from the
units the run heard (its phone recogniser), and from perfect units, the text's own pronunciation
(the manifest's festival phones, repeats merged, spelled exactly as phone units are). The gap is
what better ears would buy; the oracle's CER is what the language model itself gets wrong.

    python scripts/asr_oracle.py runs/toy                 # 100 sentences of the seen voices, 100 of the unseen

Needs a run with phone units (units=phones, the toy default). Prints CER per split and unit source.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from speechgpt_min.data import load_manifest  # noqa: E402
from speechgpt_min.evaluate import evaluate_asr, evenly_spaced  # noqa: E402
from speechgpt_min.pipeline import SpeechGPT  # noqa: E402
from speechgpt_min.units import dedup, read_run_units  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run directory of train.py (phone units)")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parent.parent / "tiny_data")
    parser.add_argument("--sentences", type=int, default=100, help="per split (default: 100)")
    parser.add_argument("--answer-voice", default=None,
                        help="left out, as the eval leaves it out of ASR (default: the run's answer voice)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    config = args.run / "phones" / "config.json"
    if not config.is_file():
        sys.exit(f"{config}: no phone recogniser; the oracle spells the text's phones as phone units")
    torch.set_num_threads(args.threads)
    args.answer_voice = args.answer_voice or json.loads((args.run / "settings.json").read_text())["answer_voice"]
    unit_of = {phone: i for i, phone in enumerate(json.loads(config.read_text())["phones"])}
    heard = read_run_units(args.run)[0]
    rows = load_manifest(args.data / "manifest.jsonl")
    sgpt = SpeechGPT.from_run(args.run, device="cpu", adapter=False)
    for split in ("test", "test_unseen_voice"):
        chosen = evenly_spaced([r for r in rows if r["split"] == split and r.get("kind", "sent") == "sent"
                                and r["voice"] != args.answer_voice], args.sentences)
        perfect = [dedup([unit_of[p] for p in r["phones"].split()])[0].tolist() for r in chosen]
        cer = {source: evaluate_asr(sgpt, list(zip(units, [r["text"] for r in chosen])), 64, progress=False)["cer"]
               for source, units in (("heard", [heard[r["id"]] for r in chosen]), ("perfect", perfect))}
        print(f"{split}: CER from the run's units {cer['heard']:.3f}, from the text's phones {cer['perfect']:.3f} "
              f"({len(chosen)} sentences)")


if __name__ == "__main__":
    main()
