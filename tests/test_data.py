"""Stage 1-3 training data: exact strings, loss masks token by token, packing, batching, errors."""
import json
import random

import pytest
import torch

from speechgpt_min.data import (
    ASR_INSTRUCTIONS, CHAIN_TEMPLATE, CHAIN_VARIANTS, SYSTEM_PROMPT, TTS_INSTRUCTIONS, DataError, Dialogue, Example,
    asr_dialogue, chain_dialogue, collate, encode_dialogue, encode_dialogues, encode_prompt, in_split,
    inference_prompt, load_manifest, load_pairs, n_targets, pack_blocks, speech_text, stage1_texts,
    stage2_dialogues, stage3_dialogues, tts_dialogue,
)
from speechgpt_min.model import IGNORE_INDEX
from speechgpt_min.tokenizer import Tokenizer


def fake_units(ids, seed=0, k=100):
    rng = random.Random(seed)
    return {i: [rng.randrange(k) for _ in range(rng.randrange(5, 30))] for i in ids}


# ----------------------------------------------------------------------------- exact strings

def test_system_prompt_is_the_released_text():
    expected = ("You are an AI assistant whose name is SpeechGPT.\n- SpeechGPT is a intrinsic cross-modal "
                "conversational language model that is developed by Fudan University.  SpeechGPT can understand "
                "and communicate fluently with human through speech or text chosen by the user.\n- It can "
                "perceive cross-modal inputs and generate cross-modal outputs.\n")
    assert SYSTEM_PROMPT == expected


def test_speech_text_merges_repeats_without_spaces():
    assert speech_text([12, 12, 7, 305, 305, 7]) == "<sosp><12><7><305><7><eosp>"
    assert speech_text([]) == "<sosp><eosp>"


def test_tts_golden():
    d = tts_dialogue("The alchemist rode in front.", [5, 5, 17, 3], "Try to speak out this sentence, please.")
    assert d.text() == SYSTEM_PROMPT + (
        "[Human]: Try to speak out this sentence, please. This is input: The alchemist rode in front.<eoh> "
        "[SpeechGPT]: <sosp><5><17><3><eosp><eoa>")
    assert d.prompt.endswith("[SpeechGPT]: ") and d.task == "tts"


def test_asr_golden():
    d = asr_dialogue([9, 1, 1, 40], "the frog is in the garden", "Transcribe this speech, please.")
    assert d.text() == SYSTEM_PROMPT + (
        "[Human]: Transcribe this speech, please. This is input: <sosp><9><1><40><eosp><eoh> "
        "[SpeechGPT]: the frog is in the garden<eoa>")


def test_chain_of_modality_golden():
    q, a = "what is four plus three", "four plus three is seven"
    assert chain_dialogue("s2s", q, a, [1, 2, 2], [3, 4]).text() == SYSTEM_PROMPT + (
        "[Human]: <sosp><1><2><eosp><eoh>. [SpeechGPT]: what is four plus three; "
        "[ta] four plus three is seven; [ua] <sosp><3><4><eosp><eoa>.")
    assert chain_dialogue("s2t", q, a, [1, 2]).text(system_prompt="") == (
        "[Human]: <sosp><1><2><eosp><eoh>. [SpeechGPT]: what is four plus three; [ta] four plus three is seven<eoa>.")
    assert chain_dialogue("t2s", q, a, answer_units=[3, 4]).text(system_prompt="") == (
        "[Human]: what is four plus three<eoh>. [SpeechGPT]: [ta] four plus three is seven; "
        "[ua] <sosp><3><4><eosp><eoa>.")
    assert chain_dialogue("t2t", q, a).text(system_prompt="") == (
        "[Human]: what is four plus three<eoh>. [SpeechGPT]: [ta] four plus three is seven<eoa>.")
    with pytest.raises(DataError, match="valid: s2s, s2t, t2s, t2t"):
        chain_dialogue("speech2speech", q, a)


def test_inference_prompt_golden_and_shared_with_training():
    assert inference_prompt("<sosp><1><eosp>") == SYSTEM_PROMPT + "[Human]: <sosp><1><eosp> <eoh>. [SpeechGPT]: "
    # with the stage-3 template the inference prompt is exactly a training example's prompt
    d = chain_dialogue("s2s", "q", "a", [1], [2])
    assert inference_prompt(speech_text([1]), template=CHAIN_TEMPLATE) == SYSTEM_PROMPT + d.prompt


def test_instruction_paraphrases():
    for instructions in (TTS_INSTRUCTIONS, ASR_INSTRUCTIONS):
        assert len(set(instructions)) == len(instructions) >= 10
    assert TTS_INSTRUCTIONS[0] == "Try to speak out this sentence, please."


# ----------------------------------------------------------------------------- token ids and masks

def pieces(tok, ids):
    return ["<s>" if i == tok.bos_id else "</s>" if i == tok.eos_id else tok.decode([i]) for i in ids]


def test_masks_token_by_token():
    d = tts_dialogue("hi there", [3, 3, 5], "Say it.")
    system = "sys\n"
    tok = Tokenizer.train([d.text(system)], n_units=10, min_count=1)
    expected = [  # (piece, carries loss by default)
        ("<s>", 0), ("sys", 0), ("\n", 0), ("[Human]", 0), (":", 0), (" Say", 0), (" it", 0), (".", 0),
        (" This", 0), (" is", 0), (" input", 0), (":", 0), (" hi", 0), (" there", 0), ("<eoh>", 0), (" ", 0),
        ("[SpeechGPT]", 0), (":", 0),
        (" ", 1), ("<sosp>", 1), ("<3>", 1), ("<5>", 1), ("<eosp>", 1), ("<eoa>", 1), ("</s>", 1),
    ]
    e = encode_dialogue(tok, d, system_prompt=system)
    assert pieces(tok, e.tokens) == [p for p, _ in expected]
    assert e.labels == [t if loss else IGNORE_INDEX for t, (_, loss) in zip(e.tokens, expected)]
    # the released recipe: only BOS and the system prompt are masked
    e = encode_dialogue(tok, d, system_prompt=system, train_on_inputs=True)
    assert e.labels == [IGNORE_INDEX] * 3 + e.tokens[3:]
    # the inference prompt's ids are exactly the masked prefix
    assert encode_prompt(tok, system + d.prompt) == e.tokens[:18]


def test_response_mask_on_real_vocabulary():
    """With the full system prompt and a tokenizer trained on many examples, the unmasked tokens
    decode to exactly the response (plus the space before it)."""
    units = fake_units(["u1", "u2"])
    dialogues = [chain_dialogue("s2s", "what is one plus one", "one plus one is two", units["u1"], units["u2"]),
                 asr_dialogue(units["u1"], "the cat sleeps", ASR_INSTRUCTIONS[3])]
    tok = Tokenizer.train([d.text() for d in dialogues] * 2, n_units=100)
    for d in dialogues:
        e = encode_dialogue(tok, d)
        kept = [t for t, label in zip(e.tokens, e.labels) if label != IGNORE_INDEX]
        assert kept[-1] == tok.eos_id
        assert tok.decode(kept) == " " + d.response
        assert n_targets(e) == len(kept)


def test_collate_shifts_and_pads():
    a = Example([1, 10, 11, 12], [-100, -100, 11, 12])
    b = Example([1, 20, 21], [-100, 20, 21])
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 10, 11], [1, 20, 0]]
    assert batch["labels"].tolist() == [[-100, 11, 12], [20, 21, -100]]
    assert batch["lengths"].tolist() == [3, 2]


def test_too_long_examples_are_dropped_with_a_count():
    units = {"short": [1, 2], "long": list(range(60))}
    dialogues = [tts_dialogue("hello", units["short"]), tts_dialogue("hello", units["long"])]
    tok = Tokenizer.train([d.text() for d in dialogues], n_units=100)
    lengths = [len(encode_dialogue(tok, d).tokens) for d in dialogues]
    with pytest.warns(UserWarning, match=r"dropped 1 of 2 examples longer than the context of"):
        kept = encode_dialogues(tok, dialogues, max_len=lengths[0] - 1)
    assert [len(e.tokens) for e in kept] == [lengths[0]]
    with pytest.raises(DataError, match="every example is longer"), pytest.warns(UserWarning):
        encode_dialogues(tok, dialogues, max_len=5)


def test_stage1_blocks_cover_every_token_once():
    texts = [speech_text(u) for u in fake_units(range(12)).values()]
    tok = Tokenizer.train(texts, n_units=100)
    stream = []
    for t in texts:
        stream += [tok.bos_id] + tok.encode(t)
    blocks = pack_blocks(tok, texts, block_size=16)
    assert len(blocks) == (len(stream) - 1) // 16
    assert all(len(b.tokens) == 17 and b.labels == b.tokens for b in blocks)
    targets = [t for b in blocks for t in b.tokens[1:]]
    assert targets == stream[1:1 + len(targets)]
    assert blocks[1].tokens[0] == blocks[0].tokens[-1]  # consecutive blocks overlap by one token
    with pytest.raises(DataError, match="fewer than one block"):
        pack_blocks(tok, texts[:1], block_size=10_000)
    with pytest.raises(DataError, match="fewer than one block"):
        pack_blocks(tok, [], block_size=16)


# ----------------------------------------------------------------------------- the corpus

def test_stages_on_tiny_data_are_deterministic(tiny_data):
    rows, pairs = load_manifest(tiny_data / "manifest.jsonl"), load_pairs(tiny_data / "qa.jsonl")
    units = fake_units([r["id"] for r in rows])
    train_rows, train_pairs = in_split(rows, "train"), in_split(pairs, "train")

    s1 = stage1_texts(train_rows, units, seed=0)
    assert len(s1) == len(train_rows) and s1 == stage1_texts(train_rows, units, seed=0)
    assert s1 != stage1_texts(train_rows, units, seed=1)
    assert sorted(s1) == sorted(speech_text(units[r["id"]]) for r in train_rows)

    s2 = stage2_dialogues(train_rows, units, seed=0)
    assert len(s2) == 2 * len(train_rows)
    assert s2 == stage2_dialogues(train_rows, units, seed=0) != stage2_dialogues(train_rows, units, seed=1)
    used = {d.prompt.split(" This is input:")[0][len("[Human]: "):] for d in s2}
    assert used == set(TTS_INSTRUCTIONS) | set(ASR_INSTRUCTIONS)  # all paraphrases occur

    # TTS in one voice, the answer voice; ASR in all of them
    s2_one_voice = stage2_dialogues(train_rows, units, seed=0, tts_voice="fest_slt")
    assert sum(d.task == "asr" for d in s2_one_voice) == len(train_rows)
    assert sum(d.task == "tts" for d in s2_one_voice) == sum(r["voice"] == "fest_slt" for r in train_rows) > 0

    s3 = stage3_dialogues(train_pairs, units, seed=0, variants=CHAIN_VARIANTS)
    n_speech = sum(len(p["question"]["audio"]) for p in train_pairs)
    assert len(s3) == 2 * n_speech + 2 * len(train_pairs)
    assert s3 == stage3_dialogues(train_pairs, units, seed=0, variants=CHAIN_VARIANTS)
    assert len(stage3_dialogues(train_pairs, units)) == n_speech + len(train_pairs)  # default: s2s, t2t
    p = train_pairs[0]
    s2s = [d for d in s3 if d.task == "s2s" and p["question"]["text"] + ";" in d.response]
    assert s2s[0].prompt == CHAIN_TEMPLATE.format(question=speech_text(units[p["question"]["audio"][0]]))
    assert s2s[0].response.endswith(speech_text(units[p["answer"]["audio"][0]]) + "<eoa>.")


def test_corpus_errors_name_the_problem(tmp_path, tiny_data):
    rows = load_manifest(tiny_data / "manifest.jsonl")
    with pytest.raises(DataError, match=r"no units for utterance 'sent_00000_fest_slt'"):
        stage2_dialogues(rows[:1], {})
    with pytest.raises(DataError, match=r"no rows in split 'dev'; splits present: \['test', 'test_knowledge', 'test_unseen_voice'"):
        in_split(rows, "dev")
    bad = tmp_path / "m.jsonl"
    bad.write_text(json.dumps({"id": "a", "text": "x", "audio": "a.ogg"}) + "\n")
    with pytest.raises(DataError, match=r"m.jsonl:1: missing \['voice', 'split'\]"):
        load_manifest(bad)
    row = {"id": "a", "text": "x", "audio": "a.ogg", "voice": "v"}
    bad.write_text(json.dumps({**row, "split": "dev"}) + "\n")
    with pytest.raises(DataError, match=r"utterance 'a' has unknown split 'dev'; valid: train, valid, test"):
        load_manifest(bad)
    bad.write_text(json.dumps({**row, "split": "train"}) + "\n{oops\n")
    with pytest.raises(DataError, match="m.jsonl:2: not valid JSON"):
        load_manifest(bad)
    with pytest.raises(DataError, match="no such file"):
        load_manifest(tmp_path / "missing.jsonl")


def test_encoded_tiny_data_batches(tiny_data):
    rows = in_split(load_manifest(tiny_data / "manifest.jsonl"), "valid")
    units = fake_units([r["id"] for r in rows])
    dialogues = stage2_dialogues(rows, units)
    tok = Tokenizer.train([d.text() for d in dialogues], n_units=100)
    examples = encode_dialogues(tok, dialogues, max_len=512)
    batch = collate(examples[:4])
    assert batch["input_ids"].shape == batch["labels"].shape == (4, int(batch["lengths"].max()))
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == sum(n_targets(e) for e in examples[:4])
    assert batch["input_ids"].dtype == torch.long and isinstance(dialogues[0], Dialogue)
