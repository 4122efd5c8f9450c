"""SQuAD v1.1 metrics on hand-made cases (expected values worked out by hand from the official rules)."""

from __future__ import annotations

import pytest

from retro_eval.benchmarks import QAExample
from retro_eval.metrics import exact_match, f1, f1_score, normalize_answer, squad_evaluate


@pytest.mark.parametrize(
    "text,expected",
    [
        ("The  Cat's hat!", "cats hat"),  # lower, drop ' and !, drop "the", collapse spaces
        ("an apple a day", "apple day"),
        ("Theatre", "theatre"),  # "the" only as a whole word
        ("A.B.C.", "abc"),  # punctuation removed before articles: "abc" is not an article
        ("a-b", "ab"),
        ("1990–91", "1990–91"),  # en dash is not in string.punctuation
        ("  \tNew\nYork ", "new york"),
        ("the", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_hand_cases():
    assert exact_match("Denver Broncos", ["Denver Broncos", "Broncos"]) == 1.0
    assert exact_match("the Denver Broncos.", ["Denver Broncos"]) == 1.0
    assert exact_match("Broncos", "Denver Broncos") == 0.0
    assert exact_match("1990-91", ["1990–91"]) == 0.0  # "199091" != "1990–91"
    assert exact_match("", ["the"]) == 1.0  # both normalise to ""


def test_f1_hand_cases():
    # pred {denver, broncos, won} vs gold {denver, broncos}: P = 2/3, R = 1, F1 = 0.8
    assert f1("Denver Broncos won", ["Denver Broncos"]) == pytest.approx(0.8)
    # max over golds: "Carolina" vs "Carolina Panthers": P = 1, R = 1/2 -> 2/3; vs "Panthers": 0
    assert f1("Carolina", ["Carolina Panthers", "Panthers"]) == pytest.approx(2 / 3)
    # multiset overlap: {x, y, y} & {y, y, z} = {y, y}: P = R = 2/3
    assert f1_score("x y y", "y y z") == pytest.approx(2 / 3)
    # nothing shared, or both empty after normalisation: 0 (v1.1 behaviour)
    assert f1("Paris", ["London"]) == 0.0
    assert f1("", ["the"]) == 0.0
    assert f1("The Eiffel Tower.", ["eiffel tower"]) == 1.0


def test_squad_evaluate_counts_unanswered_as_zero():
    examples = [
        QAExample("q1", "?", ["Denver Broncos"]),
        QAExample("q2", "?", ["Carolina Panthers", "Panthers"]),
        QAExample("q3", "?", ["Santa Clara"]),
    ]
    preds = {"q1": "the Denver Broncos", "q2": "Carolina"}
    out = squad_evaluate(examples, preds)
    # EM: 1 + 0 + 0 over 3; F1: 1 + 2/3 + 0 over 3
    assert out["exact_match"] == pytest.approx(100 / 3)
    assert out["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert out["total"] == 3 and out["answered"] == 2
    same = squad_evaluate(
        {"q1": ["Denver Broncos"], "q2": ["Carolina Panthers", "Panthers"]}, preds
    )
    assert same["exact_match"] == pytest.approx(50.0)


def test_metric_bad_inputs():
    with pytest.raises(ValueError, match="at least one gold answer"):
        exact_match("x", [])
    with pytest.raises(ValueError, match="must be strings"):
        f1("x", [1])
    with pytest.raises(ValueError, match="no questions"):
        squad_evaluate([], {})
