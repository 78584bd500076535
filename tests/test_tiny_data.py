"""tiny_data/ integrity: every file is there and as long as the manifest says, the splits are
disjoint, and what the test splits hold out (phrasings of facts, command slot combinations, one
whole voice) really is absent from training."""
import json
from collections import defaultdict
from pathlib import Path

import pytest
import soundfile as sf

TINY = Path(__file__).resolve().parents[1] / "tiny_data"
HELD_OUT_VOICE = "fest_ked"
SPLITS = {"train", "valid", "test", "test_unseen_voice"}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def manifest():
    return read_jsonl(TINY / "manifest.jsonl")


@pytest.fixture(scope="module")
def qa():
    return read_jsonl(TINY / "qa.jsonl")


@pytest.fixture(scope="module")
def by_id(manifest):
    return {row["id"]: row for row in manifest}


def test_manifest_fields_and_unique_ids(manifest, by_id):
    required = {"id", "audio", "text", "voice", "split", "duration", "alignment"}
    for row in manifest:
        assert required <= row.keys(), row["id"]
        assert row["split"] in SPLITS
        assert row["text"] and row["text"] == row["text"].strip()
    assert len(by_id) == len(manifest)


def test_every_audio_file_exists_with_its_duration(manifest):
    for row in manifest:
        info = sf.info(str(TINY / row["audio"]))
        assert info.samplerate == 16000 and info.channels == 1, row["id"]
        assert abs(info.duration - row["duration"]) < 0.01, row["id"]


def test_alignments_exist_and_span_the_audio(manifest):
    aligned = [row for row in manifest if row["alignment"]]
    assert aligned
    for row in aligned:
        lines = (TINY / row["alignment"]).read_text().splitlines()
        body = lines[lines.index("#") + 1:]
        ends = [float(line.split()[0]) for line in body]
        assert ends == sorted(ends) and all(len(line.split()) == 3 for line in body), row["id"]
        assert abs(ends[-1] - row["duration"]) < 0.05, row["id"]


def test_corpus_size_voices_and_alignments(manifest):
    minutes = sum(row["duration"] for row in manifest) / 60
    assert minutes >= 20
    voices = {row["voice"] for row in manifest}
    assert len(voices) >= 8
    aligned_voices = {row["voice"] for row in manifest if row["alignment"]}
    assert len(aligned_voices) >= 2 and HELD_OUT_VOICE in aligned_voices
    vocabulary = {word for row in manifest for word in row["text"].split()}
    assert 150 <= len(vocabulary) <= 400
    megabytes = sum(path.stat().st_size for path in TINY.rglob("*") if path.is_file()) / 2**20
    assert megabytes <= 30


def test_held_out_voice_only_in_its_split(manifest):
    for row in manifest:
        assert (row["voice"] == HELD_OUT_VOICE) == (row["split"] == "test_unseen_voice"), row["id"]


def test_sentence_splits_are_disjoint_texts(manifest):
    texts = defaultdict(set)
    for row in manifest:
        if row["id"].startswith("sent_"):
            texts[row["split"]].add(row["text"])
    assert texts["train"] and texts["valid"] and texts["test"]
    assert not texts["train"] & texts["valid"]
    assert not texts["train"] & texts["test"]
    assert not texts["valid"] & texts["test"]
    assert texts["test_unseen_voice"] == texts["test"]


def test_qa_audio_ids_resolve_to_the_right_texts(qa, by_id):
    assert len({item["id"] for item in qa}) == len(qa)
    for item in qa:
        for side in ("question", "answer"):
            assert item[side]["audio"], item["id"]
            for audio_id in item[side]["audio"]:
                assert by_id[audio_id]["text"] == item[side]["text"], (item["id"], audio_id)
        question_splits = {by_id[a]["split"] for a in item["question"]["audio"]}
        expected = {"test", "test_unseen_voice"} if item["split"] == "test" else {item["split"]}
        assert question_splits == expected, item["id"]


def test_held_out_combinations_are_absent_from_train(qa, manifest):
    train = [item for item in qa if item["split"] == "train"]
    train_pairs = {(item["fact"], item["template"]) for item in train}
    train_facts = {item["fact"] for item in train}
    train_texts = {row["text"] for row in manifest if row["split"] == "train"}
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
