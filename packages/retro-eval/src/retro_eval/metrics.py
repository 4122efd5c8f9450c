"""SQuAD v1.1 answer metrics: normalisation, exact match and F1, as the official evaluation script.

The official ``evaluate-v1.1.py`` (Rajpurkar et al. 2016) lower-cases, removes ASCII punctuation
(``string.punctuation``), removes the articles a/an/the as whole words and collapses whitespace; exact
match compares the normalised strings; F1 is the harmonic mean of token precision and recall over the
normalised whitespace tokens (multiset overlap, 0 when nothing is shared, including when both are
empty); a prediction scores the maximum over the gold answers. The corpus score is 100 x the mean
over *all* questions, an unanswered one counting 0. Natural Questions open-domain evaluation uses the
same normalisation and exact match.
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "exact_match",
    "exact_match_score",
    "f1",
    "f1_score",
    "normalize_answer",
    "squad_evaluate",
]

logger = logging.getLogger(__name__)

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    """Whether prediction and one gold answer are equal after :func:`normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token-level F1 between a prediction and one gold answer (normalised tokens, multiset overlap)."""
    pred = normalize_answer(prediction).split()
    gold = normalize_answer(ground_truth).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred)
    recall = same / len(gold)
    return 2 * precision * recall / (precision + recall)


def _golds(answers: str | Sequence[str]) -> list[str]:
    golds = [answers] if isinstance(answers, str) else list(answers)
    if not golds:
        raise ValueError("answers must hold at least one gold answer")
    if not all(isinstance(a, str) for a in golds):
        raise ValueError("answers must be strings")
    return golds


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if the prediction exactly matches any gold answer after normalisation, else 0.0."""
    return float(max(exact_match_score(prediction, g) for g in _golds(answers)))


def f1(prediction: str, answers: str | Sequence[str]) -> float:
    """The best token F1 of the prediction over the gold answers, in [0, 1]."""
    return max(f1_score(prediction, g) for g in _golds(answers))


def squad_evaluate(
    examples: Iterable[Any] | Mapping[str, Sequence[str]], predictions: Mapping[str, str]
) -> dict[str, float]:
    """Corpus exact match and F1 in percent, as the official SQuAD v1.1 ``evaluate``.

    Args:
        examples: QA examples with ``id`` and ``answers`` (e.g. ``retro_eval.benchmarks.QAExample``),
            or a mapping id -> gold answers.
        predictions: id -> predicted answer text.

    Returns:
        ``{"exact_match": 100 * mean EM, "f1": 100 * mean F1, "total": questions, "answered": n}``;
        a question with no prediction scores 0 (logged, as the official script prints it).
    """
    items = (
        list(examples.items())
        if isinstance(examples, Mapping)
        else [(e.id, e.answers) for e in examples]
    )
    em_sum = f1_sum = 0.0
    answered = 0
    for qid, answers in items:
        if qid not in predictions:
            logger.warning("Unanswered question %s will receive score 0.", qid)
            continue
        answered += 1
        em_sum += exact_match(predictions[qid], answers)
        f1_sum += f1(predictions[qid], answers)
    total = len(items)
    if total == 0:
        raise ValueError("squad_evaluate: no questions")
    return {
        "exact_match": 100.0 * em_sum / total,
        "f1": 100.0 * f1_sum / total,
        "total": total,
        "answered": answered,
    }
