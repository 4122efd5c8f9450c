"""Streaming document readers: JSONL, plain text, Wikitext-103 raw, the Pile (.jsonl/.jsonl.zst), Parquet.

Every reader is a generator of :class:`Document` that holds one record in memory at a time. A bad
record (invalid UTF-8, invalid JSON, a missing or non-string text field, empty text) is counted in
an :class:`IngestStats`, logged with a warning naming the file and line, and skipped; with
``strict=True`` it raises :class:`IngestError` instead.

Compressed input (``.zst``, ``.gz``) and Parquet files that end before their end-of-stream marker
(footer) are *truncated*: the documents before the cut are kept and the file is reported
(``file: truncated after N documents``) as a warning counted in ``IngestStats.truncated``, or as
an :class:`IngestError` with ``strict=True``. A truncated stream is never taken as end of data.
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
    truncated: list[str] = field(default_factory=list)

    def cut(self, path: str | os.PathLike[str], documents: int, detail: str, strict: bool) -> None:
        """Record that ``path`` is truncated after ``documents`` documents; raise if ``strict``."""
        msg = f"{path}: truncated after {documents} documents ({detail})"
        if strict:
            raise IngestError(msg)
        self.truncated.append(str(path))
        logger.warning("%s; the rest of the file is lost", msg)

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


class _Truncated(Exception):
    """Raised by :func:`_open_lines` after the last complete line of a truncated stream."""


def _zstd_blocks(raw: io.BufferedIOBase) -> Iterator[bytes]:
    """Decompressed blocks of a zstandard file (frames in sequence); _Truncated if cut short."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    dobj, in_frame = dctx.decompressobj(), False
    while block := raw.read(1 << 20):
        while block:
            try:
                out = dobj.decompress(block)
            except zstandard.ZstdError as e:
                raise _Truncated(f"corrupt zstandard data: {e}") from None
            in_frame = True
            if out:
                yield out
            if dobj.eof:
                block, dobj, in_frame = dobj.unused_data, dctx.decompressobj(), False
            else:
                block = b""
    if in_frame:
        raise _Truncated("the zstandard frame has no end")


def _open_lines(path: Path) -> Iterator[bytes]:
    """Yield raw lines (bytes) of a plain, zstandard- or gzip-compressed file, streaming.

    A compressed stream cut short raises :class:`_Truncated` after its last complete line (a
    partial last line is not yielded).
    """
    if path.name.endswith((".zst", ".gz")):
        with open(path, "rb") as raw:
            if path.name.endswith(".zst"):
                blocks = _zstd_blocks(raw)
            else:
                import gzip
                import zlib

                def _gz() -> Iterator[bytes]:
                    try:
                        with gzip.GzipFile(fileobj=raw) as g:
                            while block := g.read(1 << 20):
                                yield block
                    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
                        raise _Truncated(f"gzip: {e}") from None

                blocks = _gz()
            rest = b""
            for block in blocks:
                lines = (rest + block).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    yield line + b"\n"
            if rest:
                yield rest
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
    yielded = 0
    lines = _open_lines(path)
    lineno = 0
    while True:
        try:
            raw = next(lines)
        except StopIteration:
            return
        except _Truncated as e:
            st.cut(path, yielded, str(e), strict)
            return
        lineno += 1
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
        yielded += 1
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
    first = st.documents

    def flush() -> Iterator[Document]:
        if title is None:
            if "".join(lines).strip():
                st.bad(f"{path}:1", "text before the first ' = Title = ' heading", strict)
            return
        text = "".join(lines)
        st.documents += 1
        yield Document(title, text, {"line": start})

    lines_it = _open_lines(path)
    lineno = 0
    while True:
        try:
            raw = next(lines_it)
        except StopIteration:
            break
        except _Truncated as e:  # the article cut short is dropped, as a JSONL line would be
            st.cut(path, st.documents - first, str(e), strict)
            return
        lineno += 1
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
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        if path.is_file() and path.stat().st_size and _parquet_tail_missing(path):
            st.cut(path, 0, f"no Parquet footer: {e}", strict)
            return
        raise IngestError(f"{path}: not a readable Parquet file ({e})") from None
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
        try:
            table = pf.read_row_group(g, columns=columns)
        except (pa.ArrowException, OSError) as e:
            st.cut(path, row, f"row group {g} unreadable: {e}", strict)
            return
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


def _parquet_tail_missing(path: Path) -> bool:
    """True when a file starts like Parquet (``PAR1``) but does not end with ``PAR1``."""
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(0, path.stat().st_size - 4))
        tail = f.read(4)
    return head == b"PAR1" and tail != b"PAR1"


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

    auto: ``*.parquet`` -> parquet; ``*.jsonl.zst`` -> pile; ``*.jsonl``/``*.json`` (also
    ``.gz``) -> jsonl;
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
        elif name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst")):
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
