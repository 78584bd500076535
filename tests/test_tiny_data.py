"""tiny_data/ integrity: every file is there and as long as the manifest says, the splits are
disjoint, and what the test splits hold out (sentences, phrasings of facts, command slot
combinations, facts only the text corpus states, one whole voice) really is absent from training."""
import io
import json
from collections import defaultdict

import pytest
import soundfile as sf

from speechgpt_min.audio import read_packed
from speechgpt_min.data import SPLITS

HELD_OUT_VOICE = "fest_ked"
ANSWER_VOICE = "fest_slt"


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def manifest(tiny_data):
    return read_jsonl(tiny_data / "manifest.jsonl")


@pytest.fixture(scope="module")
def qa(tiny_data):
    return read_jsonl(tiny_data / "qa.jsonl")


@pytest.fixture(scope="module")
def facts(tiny_data):
    return read_jsonl(tiny_data / "facts.jsonl")


@pytest.fixture(scope="module")
def text_corpus(tiny_data):
    return (tiny_data / "text_corpus.txt").read_text().splitlines()


@pytest.fixture(scope="module")
def by_id(manifest):
    return {row["id"]: row for row in manifest}


def test_manifest_fields_and_unique_ids(manifest, by_id):
    required = {"id", "audio", "text", "voice", "split", "duration", "alignment", "kind"}
    for row in manifest:
        assert required <= row.keys(), row["id"]
        assert row["split"] in SPLITS and row["kind"] in ("sent", "q", "a")
        assert row["text"] and row["text"] == row["text"].strip()
    assert len(by_id) == len(manifest)


def test_every_audio_file_exists_with_its_duration(manifest, tiny_data):
    for row in manifest:
        info = sf.info(io.BytesIO(read_packed(tiny_data / row["audio"])))
        assert info.samplerate == 16000 and info.channels == 1 and info.subtype == "OPUS", row["id"]
        assert abs(info.duration - row["duration"]) < 0.01, row["id"]


def test_alignments_exist_and_span_the_audio(manifest, tiny_data):
    aligned = [row for row in manifest if row["alignment"]]
    assert aligned
    for row in aligned:
        lines = read_packed(tiny_data / row["alignment"]).decode().splitlines()
        body = lines[lines.index("#") + 1:]
        ends = [float(line.split()[0]) for line in body]
        assert ends == sorted(ends) and all(len(line.split()) == 3 for line in body), row["id"]
        assert abs(ends[-1] - row["duration"]) < 0.05, row["id"]


def test_corpus_size_voices_and_alignments(manifest, tiny_data):
    hours = sum(row["duration"] for row in manifest) / 3600
    assert hours >= 3
    voices = {row["voice"] for row in manifest}
    assert len(voices) >= 25
    aligned_voices = {row["voice"] for row in manifest if row["alignment"]}
    assert len(aligned_voices) >= 4 and HELD_OUT_VOICE in aligned_voices
    distinct_train = {row["text"] for row in manifest if row["split"] == "train" and row["kind"] == "sent"}
    assert len(distinct_train) >= 2000
    on_disk = sum(path.stat().st_blocks * 512 for path in tiny_data.rglob("*") if path.is_file()) / 2**20
    assert on_disk <= 40  # megabytes as `du` counts them: every file takes whole disk blocks


def test_every_training_word_is_heard_often(manifest):
    """Every word of the held-out sentences and questions is spoken in training, 95% of them 10 times or more."""
    counts = defaultdict(int)
    for row in manifest:
        if row["split"] == "train":
            for word in row["text"].split():
                counts[word] += 1
    held_out_words = {w for row in manifest if row["split"] != "train" for w in row["text"].split()}
    assert all(counts[w] > 0 for w in held_out_words), sorted(w for w in held_out_words if not counts[w])
    assert sum(counts[w] >= 10 for w in held_out_words) >= 0.95 * len(held_out_words)


def test_held_out_voice_only_in_its_split(manifest):
    for row in manifest:
        assert (row["voice"] == HELD_OUT_VOICE) == (row["split"] == "test_unseen_voice"), row["id"]


def test_sentence_splits_are_disjoint_texts(manifest, text_corpus):
    texts = defaultdict(set)
    for row in manifest:
        if row["kind"] == "sent":
            texts[row["split"]].add(row["text"])
    assert texts["train"] and texts["valid"] and texts["test"]
    assert not texts["train"] & texts["valid"]
    assert not texts["train"] & texts["test"]
    assert not texts["valid"] & texts["test"]
    assert texts["test_unseen_voice"] == texts["test"]
    assert not (texts["valid"] | texts["test"]) & set(text_corpus)  # held out of stage 0's text too


def test_tts_voice_reads_training_and_test_sentences(manifest):
    answer_voice = [row for row in manifest if row["voice"] == ANSWER_VOICE and row["kind"] == "sent"]
    test_texts = {row["text"] for row in manifest if row["split"] == "test" and row["kind"] == "sent"}
    assert sum(row["split"] == "train" for row in answer_voice) >= 1000
    assert {row["text"] for row in answer_voice if row["split"] == "test"} == test_texts
    assert all(row["voice"] == ANSWER_VOICE for row in manifest if row["kind"] == "a")


def test_qa_audio_ids_resolve_to_the_right_texts(qa, by_id):
    assert len({item["id"] for item in qa}) == len(qa)
    for item in qa:
        assert item["answer"]["audio"], item["id"]
        for side in ("question", "answer"):
            for audio_id in item[side]["audio"]:
                assert by_id[audio_id]["text"] == item[side]["text"], (item["id"], audio_id)
        question_splits = {by_id[a]["split"] for a in item["question"]["audio"]}
        if item["split"] in ("test", "test_knowledge"):
            assert question_splits == {item["split"], "test_unseen_voice"}, item["id"]
        elif item["split"] == "valid":
            assert question_splits == {"valid"}, item["id"]
        else:  # training questions: spoken, or typed only (they train the text-to-text variant)
            assert question_splits <= {"train"}, item["id"]


def test_held_out_combinations_are_absent_from_train(qa, manifest):
    train = [item for item in qa if item["split"] == "train"]
    train_pairs = {(item["fact"], item["template"]) for item in train}
    train_facts = {item["fact"] for item in train}
    train_texts = {row["text"] for row in manifest if row["split"] == "train"} | {i["question"]["text"] for i in train}
    train_slots = defaultdict(set)
    for item in train:
        if item["skill"] == "command":
            for position, value in enumerate(item["fact"].split(":")[1:]):
                train_slots[position].add(value)
    held_out = [item for item in qa if item["split"] in ("valid", "test")]
    assert {item["skill"] for item in held_out if item["split"] == "test"} >= {"plus", "opposite", "command"}
    for item in held_out:
        assert (item["fact"], item["template"]) not in train_pairs, item["id"]
        assert item["question"]["text"] not in train_texts, item["id"]
        if item["skill"] == "command":
            assert item["fact"] not in train_facts, item["id"]  # a new (verb, colour, object) triple
            for position, value in enumerate(item["fact"].split(":")[1:]):
                assert value in train_slots[position], item["id"]  # ... of slot values seen in training
        else:
            assert item["fact"] in train_facts, item["id"]  # a known fact, asked in a new phrasing


def test_text_only_facts_are_stated_only_in_text(qa, manifest, facts, text_corpus):
    """The knowledge test: facts that only stage 0's text states, never speech or a training question."""
    text_only = {f["fact"]: f["answer"] for f in facts if f["where"] == "text_only"}
    assert len(text_only) >= 40
    corpus = set(text_corpus)
    trained = [item for item in qa if item["split"] in ("train", "valid")]
    spoken = {row["text"] for row in manifest if row["split"] in ("train", "valid")}
    for fact, answer in text_only.items():
        assert answer in corpus, fact  # stated in text ...
        assert answer not in spoken, fact  # ... never heard in training ...
        assert all(item["fact"] != fact and item["answer"]["text"] != answer for item in trained), fact  # ... nor asked
    knowledge = [item for item in qa if item["split"] == "test_knowledge"]
    assert {item["fact"] for item in knowledge} == set(text_only)
    assert all(item["question"]["audio"] for item in knowledge)


def test_facts_list_their_statements_in_the_text_corpus(facts, text_corpus):
    """facts.jsonl's statements (what stages 2 and 3 replay) are lines of the text corpus, and each
    statement names its fact's answer word."""
    corpus = set(text_corpus)
    for fact in facts:
        assert len(fact["statements"]) >= 7, fact["fact"]
        assert set(fact["statements"]) <= corpus, fact["fact"]
        answer_word = fact["answer"].split()[-1]
        assert all(answer_word in line.split() for line in fact["statements"]), fact["fact"]


def test_knowledge_questions_ask_about_words_training_questions_ask_about(qa):
    """A held-out fact is about something asked in training under another skill (an animal whose
    colour is asked, a word whose synonym is asked): no question word is new to the instruction data."""
    asked = {word for item in qa if item["split"] == "train" for word in item["question"]["text"].split()}
    knowledge = [item for item in qa if item["split"] == "test_knowledge"]
    assert {item["skill"] for item in knowledge} >= {"animal_sound", "colour", "opposite", "synonym"}
    for item in knowledge:
        assert set(item["question"]["text"].split()) <= asked, item["id"]
