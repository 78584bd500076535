"""Error rates and exact match on hand-computed cases; number spelling for Whisper transcripts."""
import pytest

from speechgpt_min.evaluate import (char_error_rate, edit_distance, exact_match_accuracy, normalize_text,
                                    spell_numbers, unit_edit_distance, word_error_rate)


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


def test_spell_numbers():
    assert spell_numbers("4 plus 3 is 7.") == "four plus three is seven."
    assert spell_numbers("after 19 comes 20, not 21") == "after nineteen comes twenty, not 21"


def test_cross_voice_similarity_of_units():
    from speechgpt_min.evaluate import cross_voice_similarity

    utterances = [("a cat", "v1", [1, 2, 3, 4]), ("a cat", "v2", [1, 2, 3, 5]),   # same text: 2 of 4 bigrams shared
                  ("a dog", "v1", [7, 8, 9]), ("a dog", "v2", [7, 8, 9])]          # same text: all shared
    scores = cross_voice_similarity(utterances)
    assert scores["same_text"] == pytest.approx((2 / 4 + 1) / 2)
    assert scores["other_text"] == 0.0  # the two texts share no bigram
    # one text only: no other-text pairs exist (the search is bounded, it does not hang)
    assert cross_voice_similarity(utterances[:2]) == {"same_text": 0.5, "other_text": None}
    assert cross_voice_similarity([("a cat", "v1", [1, 2])]) is None  # no text in two voices
