"""Open-domain QA readers: NQ-open JSONL, SQuAD v1.1 JSON, and a passage corpus JSONL.

- NQ-open (Lee et al. 2019): one ``{"question": str, "answer": [str, ...]}`` per line.
- SQuAD v1.1: ``{"version", "data": [{"title", "paragraphs": [{"context", "qas": [{"id",
  "question", "answers": [{"text", "answer_start"}]}]}]}]}``.
- Passage corpus: one ``{"id": str, "title": str, "text": str}`` per line (what a QA database is
  built from).

The question-answering loop itself lives in :mod:`retro_eval.qa`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ._io import iter_jsonl, open_text
from .types import BenchmarkError, Document, QAExample

__all__ = [
    "nq_open_examples",
    "read_nq_open",
    "read_passages",
    "read_squad",
    "squad_examples",
    "squad_flat_examples",
]

logger = logging.getLogger(__name__)


_ANSWER_FORMS = (
    "'answer' (NQ-open: a list of strings) or 'answers' (SQuAD: a list of strings, a list of "
    "{'text': ...}, or {'text': [...]})"
)


def _answers(rec: Mapping[str, Any], where: str) -> list[str]:
    """Gold answers of a flat QA record, NQ-open (``answer``) or SQuAD (``answers``) form."""
    key = "answer" if "answer" in rec else "answers"
    value = rec.get(key)
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, Mapping):  # SQuAD / datasets: {"text": [...], "answer_start": [...]}
        value = value.get("text")
        value = [value] if isinstance(value, str) else value
    if isinstance(value, list):  # SQuAD's official list of {"text", "answer_start"}
        value = [v.get("text") if isinstance(v, Mapping) else v for v in value]
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        if key not in rec:
            has = ", ".join(sorted(rec)) or "no fields"
            raise BenchmarkError(f"{where}: expected {_ANSWER_FORMS}; the record has: {has}")
        raise BenchmarkError(
            f"{where}: expected '{key}' to be a non-empty list of strings ({_ANSWER_FORMS})"
        )
    return [str(a) for a in value]


def _nq_example(rec: Mapping[str, Any], where: str, default_id: str) -> QAExample:
    q = rec.get("question")
    if not isinstance(q, str) or not q.strip():
        has = ", ".join(sorted(rec)) or "no fields"
        raise BenchmarkError(
            f"{where}: expected a non-empty string field 'question' (the record has: {has})"
        )
    answers = _answers(rec, where)
    meta = {k: v for k, v in rec.items() if k not in ("question", "answer", "answers", "id")}
    return QAExample(id=str(rec.get("id", default_id)), question=q, answers=answers, meta=meta)


def nq_open_examples(
    records: Iterable[Mapping[str, Any]], *, source: str = "records"
) -> list[QAExample]:
    """Convert flat QA records ``{"question", "answer": [..]}`` (NQ-open) or ``{"question",
    "answers": [..] | {"text": [..]}}`` (SQuAD); extra fields go to ``meta``."""
    return [_nq_example(rec, f"{source} row {i}", str(i)) for i, rec in enumerate(records)]


def read_nq_open(path: str | Path) -> list[QAExample]:
    """Read a flat QA JSONL file (``.jsonl``, ``.jsonl.gz`` or ``.jsonl.zst``): one question per
    line, its gold answers as NQ-open's ``answer`` list or SQuAD's ``answers`` (a list of strings,
    a list of ``{"text", "answer_start"}``, or ``{"text": [..], "answer_start": [..]}``).

    Raises:
        BenchmarkError: missing file, a record without ``question`` / ``answer``, or no example.
    """
    examples = [
        _nq_example(rec, f"{path}:{lineno}", str(lineno - 1)) for lineno, rec in iter_jsonl(path)
    ]
    if not examples:
        raise BenchmarkError(f"{path}: empty QA benchmark (no question)")
    return examples


def squad_examples(data: Mapping[str, Any], *, source: str = "squad") -> list[QAExample]:
    """Flatten the official SQuAD v1.1 nested JSON into examples.

    ``meta`` holds ``title``, ``context`` and ``answer_starts`` (character offsets, one per answer).
    Gold answers keep the annotators' duplicates, as the official evaluation does.
    """
    articles = data.get("data") if isinstance(data, Mapping) else None
    if not isinstance(articles, list):
        raise BenchmarkError(f"{source}: expected SQuAD JSON {{'data': [articles]}}")
    out = []
    for a, article in enumerate(articles):
        title = article.get("title", "")
        paragraphs = article.get("paragraphs")
        if not isinstance(paragraphs, list):
            raise BenchmarkError(f"{source}: data[{a}] has no list 'paragraphs'")
        for p, para in enumerate(paragraphs):
            context = para.get("context")
            qas = para.get("qas")
            if not isinstance(context, str) or not isinstance(qas, list):
                raise BenchmarkError(
                    f"{source}: data[{a}].paragraphs[{p}] needs 'context' and 'qas'"
                )
            for j, qa in enumerate(qas):
                where = f"{source}: data[{a}].paragraphs[{p}].qas[{j}]"
                answers = qa.get("answers")
                if not isinstance(answers, list) or not answers:
                    raise BenchmarkError(f"{where}: expected a non-empty list 'answers'")
                try:
                    texts = [str(ans["text"]) for ans in answers]
                    starts = [int(ans.get("answer_start", -1)) for ans in answers]
                except (KeyError, TypeError, ValueError):
                    raise BenchmarkError(
                        f"{where}: answers need 'text' (and 'answer_start')"
                    ) from None
                if not isinstance(qa.get("question"), str):
                    raise BenchmarkError(f"{where}: expected a string 'question'")
                out.append(
                    QAExample(
                        id=str(qa.get("id", f"{a}.{p}.{j}")),
                        question=qa["question"],
                        answers=texts,
                        meta={"title": title, "context": context, "answer_starts": starts},
                    )
                )
    return out


def squad_flat_examples(
    records: Iterable[Mapping[str, Any]], *, source: str = "squad"
) -> list[QAExample]:
    """Convert rows of the ``datasets`` SQuAD schema ``{id, title, context, question,
    answers: {text: [..], answer_start: [..]}}`` (one row per question)."""
    out = []
    for i, rec in enumerate(records):
        ans = rec.get("answers")
        if not isinstance(ans, Mapping) or not isinstance(ans.get("text"), list) or not ans["text"]:
            raise BenchmarkError(
                f"{source} row {i}: expected 'answers': {{'text': [..], 'answer_start': [..]}}"
            )
        if not isinstance(rec.get("question"), str):
            raise BenchmarkError(f"{source} row {i}: expected a string 'question'")
        out.append(
            QAExample(
                id=str(rec.get("id", i)),
                question=rec["question"],
                answers=[str(t) for t in ans["text"]],
                meta={
                    "title": rec.get("title", ""),
                    "context": rec.get("context", ""),
                    "answer_starts": [int(s) for s in ans.get("answer_start", [])],
                },
            )
        )
    return out


def read_squad(path: str | Path) -> list[QAExample]:
    """Read an official SQuAD v1.1 JSON file (``.json`` or ``.json.gz``), or a JSON list of flat
    question records (as :func:`read_nq_open` reads).

    Raises:
        BenchmarkError: missing file, not JSON, not the SQuAD schema, or no question.
    """
    with open_text(path) as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise BenchmarkError(f"{path}: not valid JSON ({exc.msg})") from None
    if isinstance(data, list):  # a JSON list of flat records (NQ-open / SQuAD-answers form)
        bad = next((i for i, r in enumerate(data) if not isinstance(r, Mapping)), None)
        if bad is not None:
            raise BenchmarkError(f"{path}: item {bad}: expected a JSON object with 'question'")
        examples = nq_open_examples(data, source=str(path))
    else:
        examples = squad_examples(data, source=str(path))
    if not examples:
        raise BenchmarkError(f"{path}: empty QA benchmark (no question)")
    return examples


def read_passages(path: str | Path) -> list[Document]:
    """Read a passage corpus JSONL ``{"id", "title", "text"}`` into documents (for a QA database).

    Raises:
        BenchmarkError: missing file, a record without ``text``, or no passage.
    """
    docs = []
    for lineno, rec in iter_jsonl(path):
        text = rec.get("text")
        if not isinstance(text, str):
            raise BenchmarkError(f"{path}:{lineno}: expected a string field 'text'")
        doc_id = str(rec.get("id", lineno))
        docs.append(Document(doc_id=doc_id, text=text, meta={"title": rec.get("title", "")}))
    if not docs:
        raise BenchmarkError(f"{path}: empty passage corpus")
    return docs
