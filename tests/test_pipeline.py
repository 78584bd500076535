"""Pipeline: tolerant response parsing (property tests), metrics on hand-computed cases, and the
whole SpeechGPT assembled from a tiny random run directory and from released-format parts."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from speechgpt_min.data import asr_dialogue, chain_dialogue, tts_dialogue
from speechgpt_min.pipeline import (Response, char_error_rate, edit_distance, exact_match_accuracy, normalize_text,
                                    parse_response, unit_edit_distance, word_error_rate)

K = 20  # units of the tiny fixtures

# ----------------------------------------------------------------------------- parse_response

WORDS = st.text(alphabet="abcdefghij ,.?!'", min_size=1, max_size=30).map(str.strip).filter(
    lambda s: s and not s.endswith(";"))
UNITS = st.lists(st.integers(0, K - 1), min_size=1, max_size=20).map(
    lambda us: [u for i, u in enumerate(us) if i == 0 or u != us[i - 1]])  # repeats merged, as the model writes


def test_parse_chain_of_modality():
    r = parse_response("what is two plus two; [ta] four; [ua] <sosp><3><17><5><eosp><eoa>.")
    assert (r.transcript, r.text_answer, r.answer_units, r.problems) == ("what is two plus two", "four", [3, 17, 5], [])
    assert r.complete


def test_parse_asr_and_tts_answers():
    assert parse_response("the frog sings<eoa>") == Response("the frog sings<eoa>", None, "the frog sings", [], [])
    r = parse_response("<sosp><1><2><eosp><eoa>")
    assert (r.text_answer, r.answer_units, r.complete) == (None, [1, 2], True)


@pytest.mark.parametrize("text, expected, problem", [
    ("q; [ta] a; [ua] <sosp><1><2>", dict(transcript="q", text_answer="a", answer_units=[1, 2]), "unterminated"),
    ("q; [ta] a; [ua] <1><2><eosp><eoa>", dict(answer_units=[1, 2]), "without <sosp>"),
    ("[ta] a; [ua] <sosp><1><999><2><eosp><eoa>", dict(transcript=None, answer_units=[1, 2]), "out of range"),
    ("[ta] a; [ua] <sosp><1>zz<2><eosp><eoa>", dict(answer_units=[1, 2]), "non-unit text"),
    ("seven<eoa", dict(text_answer="seven<eoa"), "cut off"),
    ("q; [ta] a<eos> more", dict(transcript="q", text_answer="a"), "<eos> before <eoa>"),
    ("[ta] four<eoh>. [Human]: and", dict(text_answer="four<eoh>."), "[Human] before <eoa>"),
    ("q; [ta] a; <sosp><4><eosp><eoa>", dict(text_answer="a", answer_units=[4]), "without [ua]"),
    ("", dict(transcript=None, text_answer=None, answer_units=[]), "cut off"),
])
def test_parse_recovers_what_it_can(text, expected, problem):
    r = parse_response(text, n_units=K)
    for name, value in expected.items():
        assert getattr(r, name) == value, name
    assert not r.complete and any(problem in p for p in r.problems), r.problems


@given(st.text(max_size=200))
@settings(max_examples=200, deadline=None)
def test_parse_never_raises_on_any_text(text):
    r = parse_response(text, n_units=K)
    assert all(0 <= u < K for u in r.answer_units)
    assert r.complete == (not r.problems)


PIECES = ["[ta]", "[ua]", "<sosp>", "<eosp>", "<eoa>", "<eos>", "[Human]", "<eoh>", ";", " ", "<", ">", "<7>",
          "<12345678901234567890>", "<-1>", "word", "\n", "\x00", "é"]


@given(st.sampled_from(["s2s", "t2t", "s2t", "t2s", "asr", "tts"]), WORDS, WORDS, UNITS, UNITS,
       st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 3), st.sampled_from(PIECES)), max_size=4))
@settings(max_examples=200, deadline=None)
def test_corrupted_valid_responses_never_raise(variant, question, answer, q_units, a_units, edits):
    text = _response(variant, question, answer, q_units, a_units)
    for position, kind, piece in edits:  # delete / insert / replace / truncate at a random place
        p = position % (len(text) + 1)
        text = [text[:p] + text[p + 1:], text[:p] + piece + text[p:], text[:p] + piece + text[p + len(piece):],
                text[:p]][kind]
    r = parse_response(text, n_units=K)
    assert isinstance(r.answer_units, list) and all(0 <= u < K for u in r.answer_units)


def _response(variant, question, answer, q_units, a_units):
    if variant == "asr":
        return asr_dialogue(q_units, answer).response
    if variant == "tts":
        return tts_dialogue(answer, a_units).response
    return chain_dialogue(variant, question, answer, q_units, a_units).response


@given(st.sampled_from(["s2s", "t2t", "s2t", "t2s", "asr", "tts"]), WORDS, WORDS, UNITS, UNITS)
@settings(max_examples=200, deadline=None)
def test_valid_responses_round_trip(variant, question, answer, q_units, a_units):
    r = parse_response(_response(variant, question, answer, q_units, a_units), n_units=K)
    assert r.complete, r.problems
    assert r.transcript == (question if variant in ("s2s", "s2t") else None)
    assert r.text_answer == (None if variant == "tts" else answer)
    assert r.answer_units == (a_units if variant in ("s2s", "t2s", "tts") else [])


# ----------------------------------------------------------------------------- metrics

def test_edit_distance():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([], [1, 2]) == 2 and edit_distance([1, 2], []) == 2 and edit_distance([], []) == 0
    assert edit_distance([1, 2, 3], [1, 3]) == 1


def test_word_and_char_error_rates():
    # pair 1: "the cat sat" -> "the cat sat down": 1 insertion; pair 2: "a b" -> "a c": 1 substitution
    assert word_error_rate(["the cat sat", "a b"], ["the cat sat down", "a c"]) == pytest.approx(2 / 5)
    assert word_error_rate(["The cat, sat."], ["the cat sat"]) == 0.0  # normalised
    assert word_error_rate(["The cat"], ["the cat"], normalize=False) == pytest.approx(1 / 2)
    assert word_error_rate(["one two"], [None]) == 1.0
    # "abc" -> "abd" 1 sub; "hello" -> "hallo" 1 sub: 2 / 8
    assert char_error_rate(["abc", "hello"], ["abd", "hallo"]) == pytest.approx(2 / 8)
    assert char_error_rate(["a b"], ["ab"]) == pytest.approx(1 / 3)  # the space counts
    with pytest.raises(ValueError, match="references"):
        word_error_rate(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        word_error_rate([""], ["x"])


def test_unit_edit_distance_and_exact_match():
    assert unit_edit_distance([[1, 2, 3, 4], [5, 6]], [[1, 2, 4], [5, 6, 7, 8]]) == pytest.approx(3 / 6)
    assert unit_edit_distance([[1, 2]], [[]]) == 1.0
    assert exact_match_accuracy(["Four.", "six", "two"], ["four", "seven", None]) == pytest.approx(1 / 3)
    assert normalize_text("  It's  SEVEN, isn't it? ") == "it's seven isn't it"
