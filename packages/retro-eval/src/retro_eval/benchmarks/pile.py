"""The Pile reader: ``.jsonl`` / ``.jsonl.zst`` records ``{"text": ..., "meta": {"pile_set_name": ...}}``.

The release layout is ``train/00.jsonl.zst`` ... ``train/29.jsonl.zst``, ``val.jsonl.zst`` and
``test.jsonl.zst``; results are reported per subset (``pile_set_name``), see
:meth:`Benchmark.by_subset <retro_eval.benchmarks.types.Benchmark.by_subset>`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ._io import iter_jsonl
from .types import BenchmarkError, Document, canonical_split

__all__ = [
    "PILE_SPLIT_NAMES",
    "group_by_subset",
    "pile_documents",
    "pile_split_files",
    "read_pile",
]

logger = logging.getLogger(__name__)

#: canonical split -> file stems used by Pile releases (first match wins).
PILE_SPLIT_NAMES = {
    "train": ("train",),
    "validation": ("val", "valid", "validation"),
    "test": ("test",),
}
_EXTS = (".jsonl.zst", ".jsonl.gz", ".jsonl", ".json.zst", ".json")


def _record_to_document(rec: Mapping[str, Any], doc_id: str, where: str) -> Document:
    text = rec.get("text")
    if not isinstance(text, str):
        raise BenchmarkError(f"{where}: expected a string field 'text'")
    meta = rec.get("meta")
    name = meta.get("pile_set_name") if isinstance(meta, Mapping) else None
    if not isinstance(name, str):
        raise BenchmarkError(f"{where}: expected 'meta': {{'pile_set_name': str}}")
    return Document(doc_id=doc_id, text=text, meta=dict(meta))


def pile_documents(records: Iterable[Mapping[str, Any]], *, prefix: str = "") -> list[Document]:
    """Convert Pile records (e.g. rows of a ``datasets`` split) to documents ``{prefix}{row}``."""
    return [
        _record_to_document(rec, f"{prefix}{i}", f"{prefix or 'record '}{i}")
        for i, rec in enumerate(records)
    ]


def pile_split_files(directory: Path, split: str) -> list[Path]:
    """The files of one canonical split in the Pile release layout (empty when none)."""
    for stem in PILE_SPLIT_NAMES[split]:
        for ext in _EXTS:
            if (directory / f"{stem}{ext}").is_file():
                return [directory / f"{stem}{ext}"]
        sub = directory / stem
        if sub.is_dir():
            files = sorted(p for p in sub.iterdir() if p.name.endswith(_EXTS))
            if files:
                return files
    return []


def read_pile(
    path: str | Path,
    split: str | None = "test",
    *,
    subsets: Iterable[str] | None = None,
    limit: int | None = None,
) -> list[Document]:
    """Read Pile documents.

    Args:
        path: a directory in the release layout (``val.jsonl.zst``, ``test.jsonl.zst``,
            ``train/NN.jsonl.zst``; also ``.jsonl``) or one ``.jsonl[.zst]`` file (``split`` ignored).
        split: ``train``, ``validation`` (``val``) or ``test``.
        subsets: keep only these ``pile_set_name`` values.
        limit: stop after this many kept documents.

    Returns:
        Documents ``doc_id = "{file}:{line}"`` with ``meta`` the record's ``meta`` (holds ``pile_set_name``).

    Raises:
        BenchmarkError: missing split/file, a record without ``text`` or ``meta.pile_set_name``, or no
        document (after filtering).
    """
    path = Path(path)
    if path.is_dir():
        canon = canonical_split(split or "test")
        files = pile_split_files(path, canon)
        if not files:
            names = " or ".join(f"{s}.jsonl[.zst]" for s in PILE_SPLIT_NAMES[canon])
            raise BenchmarkError(f"{path}: no Pile split {canon!r} (expected {names})")
    elif path.is_file():
        files = [path]
    else:
        raise BenchmarkError(f"{path}: no such file or directory")

    keep = set(subsets) if subsets is not None else None
    docs: list[Document] = []
    for f in files:
        for lineno, rec in iter_jsonl(f):
            doc = _record_to_document(rec, f"{f.name}:{lineno}", f"{f}:{lineno}")
            if keep is not None and doc.meta["pile_set_name"] not in keep:
                continue
            docs.append(doc)
            if limit is not None and len(docs) >= limit:
                break
        if limit is not None and len(docs) >= limit:
            break
    if not docs:
        what = f" in subsets {sorted(keep)}" if keep is not None else ""
        raise BenchmarkError(
            f"{', '.join(map(str, files))}: empty Pile benchmark (no document{what})"
        )
    logger.debug("%s: %d documents", path, len(docs))
    return docs


def group_by_subset(docs: Iterable[Document]) -> dict[str, list[Document]]:
    """Group documents by ``meta["pile_set_name"]`` in first-seen order."""
    groups: dict[str, list[Document]] = {}
    for doc in docs:
        groups.setdefault(doc.meta.get("pile_set_name", ""), []).append(doc)
    return groups
