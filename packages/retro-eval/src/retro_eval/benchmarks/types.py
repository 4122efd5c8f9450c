"""Plain record types returned by every benchmark reader."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Benchmark", "BenchmarkError", "Document", "QAExample", "canonical_split"]


class BenchmarkError(ValueError):
    """A benchmark cannot be read: missing file or split, wrong schema, or no documents."""


@dataclass(frozen=True)
class Document:
    """One evaluation document (same field names as ``retro_db.ingest.Document``).

    Attributes:
        doc_id: stable identifier, unique within its benchmark split.
        text: the text a language model scores.
        meta: reader-specific extras (title, ``pile_set_name``, word counts, ...).
    """

    doc_id: str
    text: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class QAExample:
    """One open-domain question with its gold answers (any of them is correct)."""

    id: str
    question: str
    answers: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Benchmark:
    """A loaded benchmark split.

    Attributes:
        name: benchmark name (pack name, hub name or path).
        split: canonical split name (``train``, ``validation`` or ``test``).
        kind: ``"lm"`` (documents to score) or ``"qa"`` (questions, optional passage corpus).
        documents: LM documents (kind ``"lm"``), else empty.
        examples: QA examples (kind ``"qa"``), else empty.
        corpus: the QA retrieval corpus when the benchmark ships one, else None.
        source: where it was read from (paths or hub id), for reports.
    """

    name: str
    split: str
    kind: Literal["lm", "qa"]
    documents: list[Document] = field(default_factory=list)
    examples: list[QAExample] = field(default_factory=list)
    corpus: list[Document] | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.documents) if self.kind == "lm" else len(self.examples)

    def by_subset(self, key: str = "pile_set_name") -> dict[str, list[Document]]:
        """Group the documents by ``meta[key]`` (the Pile's subsets), in first-seen order."""
        groups: dict[str, list[Document]] = {}
        for doc in self.documents:
            groups.setdefault(str(doc.meta.get(key, "")), []).append(doc)
        return groups


_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}


def canonical_split(split: str) -> str:
    """Map a split name and its usual aliases (valid, val, dev) to train / validation / test.

    Raises:
        BenchmarkError: an unknown split name.
    """
    try:
        return _SPLIT_ALIASES[split.lower()]
    except (KeyError, AttributeError):
        raise BenchmarkError(
            f"unknown split {split!r}: expected one of train, validation (valid, val, dev), test"
        ) from None
