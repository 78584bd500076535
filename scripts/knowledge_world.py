"""A variant of tiny_data's world in text only, for docs/recipe.md §11: can typed lookups follow the text?

tiny_data holds out a quarter of the lookup facts (animal sounds, colours of things, opposites) for
the knowledge split, but 27 of their words occur in no training question, and a model does not copy
such a word into its answer. In this variant animals have colours too, and the held-out facts are the
sounds of five animals and the colours of six others: every held-out animal is asked about in
training under the other skill. The opposites, sums and differences are held out as in tiny_data.
Writes DIR/qa.jsonl (typed pairs, no audio) and DIR/text_corpus.txt: every fact in each of its
statement forms, and nothing else unless --sentences N adds N sentences of the world.

    python scripts/knowledge_world.py --out /tmp/world
    python scripts/typed_qa.py --data /tmp/world --out runs/world/mixed --corpus 1.6   # all 3433 lines mixed in
    python scripts/knowledge_world.py --out /tmp/world-sentences --sentences 8000        # 11433 lines
"""
import argparse
import importlib.util
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ANIMAL_COLOURS = {"cow": "black", "dog": "brown", "cat": "gray", "duck": "yellow", "sheep": "white", "pig": "pink",
                  "horse": "brown", "owl": "brown", "lion": "yellow", "bee": "yellow", "frog": "green",
                  "snake": "green", "mouse": "gray", "bird": "blue", "goat": "white", "wolf": "gray",
                  "hen": "red", "crow": "black", "donkey": "gray", "goose": "white"}


def load_generator():
    """tiny_data/make_tiny_data.py as a module: its world, templates and splitting."""
    spec = importlib.util.spec_from_file_location("make_tiny_data", ROOT / "tiny_data" / "make_tiny_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_facts(m, rng):
    """make_tiny_data's facts (the animals among its coloured things), the text-only sounds and colours
    chosen from disjoint animals."""
    held = rng.sample(list(m.ANIMAL_SOUNDS), 11)
    text_only_animals = {"animal_sound": set(held[:5]), "colour": set(held[5:])}
    facts = []
    for skill, items in m.fact_slots().items():
        if skill == "opposite":  # whole pairs, as in tiny_data
            text_only = {f"opposite:{w}" for pair in rng.sample(m.OPPOSITES, 6) for w in pair}
        elif skill in text_only_animals:
            text_only = {f"{skill}:{animal}" for animal in text_only_animals[skill]}
        elif skill in ("plus", "minus"):
            text_only = {key for key, _ in rng.sample(items, 20)}
        else:
            text_only = set()
        facts += [(skill, key, slots, "text_only" if key in text_only else "speech") for key, slots in items]
    return facts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for qa.jsonl and text_corpus.txt")
    parser.add_argument("--sentences", type=int, default=0,
                        help="also this many sentences of the world in the corpus, as tiny_data has 8000 (default: 0)")
    args = parser.parse_args()
    m = load_generator()
    m.THING_COLOURS.update(ANIMAL_COLOURS)  # the world's coloured things now include the animals
    rng = random.Random(m.SEED)
    _, valid, test = m.make_sentences(rng, 2500, 150, 200)  # drawn as tiny_data draws them, so the seeds line up
    facts = make_facts(m, rng)
    pairs = m.make_qa(rng, facts)
    corpus = m.make_text_corpus(rng, facts, set(valid) | set(test), n_sentences=args.sentences)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "qa.jsonl", "w") as f:
        for n, item in enumerate(pairs):
            f.write(json.dumps({"id": f"qa_{n:05d}", "skill": item["skill"], "fact": item["fact"],
                                "split": item["split"], "question": {"text": item["question"], "audio": []},
                                "answer": {"text": item["answer"], "audio": []}}) + "\n")
    (args.out / "text_corpus.txt").write_text("\n".join(corpus) + "\n")
    asked = {w for item in pairs if item["split"] == "train" for w in item["question"].split()}
    knowledge = [item for item in pairs if item["split"] == "test_knowledge"]
    unasked = sorted({w for item in knowledge for w in item["question"].split()} - asked)
    print(f"{args.out}: {len(pairs)} pairs ({sum(p['split'] == 'train' for p in pairs)} train, {len(knowledge)} "
          f"knowledge), {len(corpus)} corpus lines; knowledge words in no training question: {', '.join(unasked)}")


if __name__ == "__main__":
    main()
