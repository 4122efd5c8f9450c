"""Streaming document readers: JSONL, plain text, Wikitext-103 raw, the Pile (.jsonl/.jsonl.zst), Parquet.

Every reader is a generator of :class:`Document` that holds one record in memory at a time. A bad
record (invalid UTF-8, invalid JSON, a missing or non-string text field, empty text) is counted in
an :class:`IngestStats`, logged with a warning naming the file and line, and skipped; with
``strict=True`` it raises :class:`IngestError` instead.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "Document",
    "IngestError",
    "IngestStats",
    "read_documents",
    "read_jsonl",
    "read_parquet",
    "read_pile",
    "read_text",
    "read_wikitext103",
]


@dataclass(frozen=True)
class Document:
    """One document: a stable id, its text, and small metadata (e.g. ``pile_set_name``)."""

    doc_id: str
    text: str
    meta: dict[str, Any] = field(default_factory=dict)


class IngestError(ValueError):
    """A bad record under ``strict=True``: names the file, the line and what was expected."""


@dataclass
class IngestStats:
    """Counts of what a reader yielded and skipped (shared across readers if passed in)."""

    documents: int = 0
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def bad(self, where: str, reason: str, strict: bool) -> None:
        """Record a bad record at ``where`` (``file:line``); raise if ``strict``."""
        if strict:
            raise IngestError(f"{where}: {reason}")
        self.skipped += 1
        key = reason.split(":")[0]
        self.reasons[key] = self.reasons.get(key, 0) + 1
        logger.warning("skipping bad record %s: %s", where, reason)


def _stats(stats: IngestStats | None) -> IngestStats:
    return stats if stats is not None else IngestStats()


def _open_lines(path: Path) -> Iterator[bytes]:
    """Yield raw lines (bytes) of a plain or zstandard-compressed file, streaming."""
    if path.name.endswith(".zst"):
        import zstandard

        with open(path, "rb") as raw:
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            yield from io.BufferedReader(reader, buffer_size=1 << 20)
    else:
        with open(path, "rb") as f:
            yield from f


def _get_field(record: dict[str, Any], dotted: str) -> Any:
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def read_jsonl(
    path: str | os.PathLike[str],
    text_field: str = "text",
    *,
    id_field: str | None = None,
    meta_fields: Iterable[str] = (),
    strict: bool = False,
    stats: IngestStats | None = None,
) -> Iterator[Document]:
    """Stream documents from a JSON-lines file (``.jsonl`` or ``.jsonl.zst``).

    Args:
        path: the file.
        text_field: field holding the text; dots reach into nested objects (``"a.b"``).
        id_field: field holding a document id; default ``"<file name>:<line>"``.
        meta_fields: fields copied into ``Document.meta`` (dotted names allowed; the key is the
            last part).
        strict: raise IngestError on the first bad record instead of skipping it.
        stats: counts are added here.
    """
    path = Path(path)
    st = _stats(stats)
    meta_fields = tuple(meta_fields)
    for lineno, raw in enumerate(_open_lines(path), start=1):
        where = f"{path}:{lineno}"
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            st.bad(where, f"invalid UTF-8 at byte {e.start}", strict)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            st.bad(where, f"invalid JSON ({e.msg})", strict)
            continue
        if not isinstance(record, dict):
            st.bad(where, "expected a JSON object", strict)
            continue
        text = _get_field(record, text_field)
        if text is None:
            st.bad(where, f"missing field {text_field!r}", strict)
            continue
        if not isinstance(text, str):
            st.bad(
                where, f"field {text_field!r}: expected a string, got {type(text).__name__}", strict
            )
            continue
        if not text.strip():
            st.bad(where, f"empty text in field {text_field!r}", strict)
            continue
        doc_id = f"{path.name}:{lineno}"
        if id_field is not None:
            value = _get_field(record, id_field)
            if value is None:
                st.bad(where, f"missing id field {id_field!r}", strict)
                continue
            doc_id = str(value)
        meta = {f.split(".")[-1]: _get_field(record, f) for f in meta_fields}
        st.documents += 1
        yield Document(doc_id, text, meta)


def read_pile(
    path: str | os.PathLike[str], *, strict: bool = False, stats: IngestStats | None = None
) -> Iterator[Document]:
    """Stream a Pile shard (``.jsonl`` or ``.jsonl.zst``): ``{"text", "meta": {"pile_set_name"}}``.

    ``Document.meta`` holds ``pile_set_name``; ids are ``"<file name>:<line>"``.
    """
    yield from read_jsonl(
        path, "text", meta_fields=("meta.pile_set_name",), strict=strict, stats=stats
    )


def read_text(
    path: str | os.PathLike[str],
    *,
    suffixes: tuple[str, ...] = (".txt",),
    strict: bool = False,
    stats: IngestStats | None = None,
) -> Iterator[Document]:
    """One document per plain-text file: ``path`` is a file, or a folder walked in sorted order.

    In a folder only files ending in one of ``suffixes`` are read; ids are the paths relative to
    the folder (the file name for a single file).
    """
    path = Path(path)
    st = _stats(stats)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(suffixes))
        names = [str(p.relative_to(path)) for p in files]
    elif path.is_file():
        files, names = [path], [path.name]
    else:
        raise FileNotFoundError(f"{path}: no such file or folder")
    for p, name in zip(files, names, strict=True):
        raw = p.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            st.bad(f"{p}:{line}", f"invalid UTF-8 at byte {e.start}", strict)
            continue
        if not text.strip():
            st.bad(f"{p}:1", "empty text", strict)
            continue
        st.documents += 1
        yield Document(name, text, {})


# A top-level Wikitext-103 heading is " = Title = " (one '='); subsections are " = = Sub = = ".
_WIKITEXT_TITLE = re.compile(r"^ = (?!=)(.*?) = $")


def read_wikitext103(
    path: str | os.PathLike[str], *, strict: bool = False, stats: IngestStats | None = None
) -> Iterator[Document]:
    """Split a Wikitext-103 raw file (``wiki.train.raw``...) into articles.

    An article starts at a line `` = Title = `` (exactly one ``=`` each side; `` = = Sub = = ``
    lines stay inside the article) and runs to the next such line. The text keeps the heading line
    and the file's own spacing; ``doc_id`` is the title, ``meta`` has the starting line.
    """
    path = Path(path)
    st = _stats(stats)
    title: str | None = None
    start = 0
    lines: list[str] = []

    def flush() -> Iterator[Document]:
        if title is None:
            if "".join(lines).strip():
                st.bad(f"{path}:1", "text before the first ' = Title = ' heading", strict)
            return
        text = "".join(lines)
        st.documents += 1
        yield Document(title, text, {"line": start})

    for lineno, raw in enumerate(_open_lines(path), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            st.bad(f"{path}:{lineno}", f"invalid UTF-8 at byte {e.start}", strict)
            continue
        m = _WIKITEXT_TITLE.match(line.rstrip("\n"))
        if m:
            yield from flush()
            title, start, lines = m.group(1), lineno, [line]
        else:
            lines.append(line)
    yield from flush()


def read_parquet(
    path: str | os.PathLike[str],
    text_field: str = "text",
    *,
    id_field: str | None = None,
    meta_fields: Iterable[str] = (),
    strict: bool = False,
    stats: IngestStats | None = None,
) -> Iterator[Document]:
    """Stream a Parquet file as exported by ``datasets`` (``Dataset.to_parquet``), a row group at a time.

    Rows are numbered from 1 across row groups; ids default to ``"<file name>:<row>"``.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    st = _stats(stats)
    meta_fields = tuple(meta_fields)
    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    if text_field not in names:
        msg = f"column {text_field!r} missing (columns: {sorted(names)})"
        if strict:
            raise IngestError(f"{path}: {msg}")
        logger.warning("skipping %s: %s", path, msg)
        st.skipped += pf.metadata.num_rows
        return
    columns = [c for c in {text_field, id_field, *meta_fields} if c is not None and c in names]
    row = 0
    for g in range(pf.num_row_groups):
        table = pf.read_row_group(g, columns=columns)
        data = {c: table.column(c).to_pylist() for c in columns}
        for i in range(table.num_rows):
            row += 1
            where = f"{path}:{row}"
            text = data[text_field][i]
            if text is None:
                st.bad(where, f"missing field {text_field!r}", strict)
                continue
            if not isinstance(text, str):
                st.bad(where, f"field {text_field!r}: expected a string", strict)
                continue
            if not text.strip():
                st.bad(where, f"empty text in field {text_field!r}", strict)
                continue
            doc_id = f"{path.name}:{row}"
            if id_field is not None and id_field in data:
                doc_id = str(data[id_field][i])
            meta = {f: data[f][i] for f in meta_fields if f in data}
            st.documents += 1
            yield Document(doc_id, text, meta)


FORMATS = ("auto", "jsonl", "text", "wikitext103", "pile", "parquet")


def read_documents(
    path: str | os.PathLike[str],
    format: str = "auto",
    *,
    text_field: str = "text",
    id_field: str | None = None,
    strict: bool = False,
    stats: IngestStats | None = None,
) -> Iterator[Document]:
    """Dispatch on ``format`` (or guess it from the name with ``"auto"``) and stream documents.

    auto: ``*.parquet`` -> parquet; ``*.jsonl.zst`` -> pile; ``*.jsonl``/``*.json`` -> jsonl;
    ``wiki.*.raw`` / ``*.raw`` -> wikitext103; a folder or anything else -> text.
    """
    p = Path(path)
    name = p.name
    if format == "auto":
        if p.is_dir():
            format = "text"
        elif name.endswith(".parquet"):
            format = "parquet"
        elif name.endswith(".jsonl.zst"):
            format = "pile"
        elif name.endswith((".jsonl", ".json")):
            format = "jsonl"
        elif name.endswith(".raw") or name.startswith("wiki."):
            format = "wikitext103"
        else:
            format = "text"
    if format == "jsonl":
        return read_jsonl(p, text_field, id_field=id_field, strict=strict, stats=stats)
    if format == "pile":
        return read_pile(p, strict=strict, stats=stats)
    if format == "text":
        return read_text(p, strict=strict, stats=stats)
    if format == "wikitext103":
        return read_wikitext103(p, strict=strict, stats=stats)
    if format == "parquet":
        return read_parquet(p, text_field, id_field=id_field, strict=strict, stats=stats)
    raise ValueError(f"format {format!r}: expected one of {', '.join(FORMATS)}")
