"""Streaming document readers and the one entry point for sources: :func:`read_sources`.

Every command that reads documents (``build``, ``add``, ``neighbours --corpus``, ``dedup``) goes
through :func:`read_sources` (or :func:`read_documents`, its one-path form). A source is a file or
a folder; a folder is walked recursively in sorted order and each file is read by its extension:

========================================================  ==========================================
``.txt``, ``.md``                                          one document per file (id: the path
                                                           relative to the folder)
``.jsonl``, ``.json`` (JSON lines or one JSON array),      one document per record, text from
``.jsonl.gz``, ``.json.gz``, ``.jsonl.zst``, ``.json.zst``  ``text_field``
``.parquet`` (as ``datasets`` writes it)                   one document per row
``.raw`` (Wikitext-103 raw, ``wiki.train.raw``)            one document per `` = Title = `` article
========================================================  ==========================================

Hidden files and folders (a name starting with ``.``) and files of any other extension are
skipped; every file read or skipped (and why) is recorded in an :class:`IngestStats`, the summary
the CLIs print (``-v`` lists the files). A file named explicitly is read by the same rules (an
unknown extension is read as plain text).

A text field is a string, or a list of strings (joined with a blank line between paragraphs); a
dotted name (``"a.b"``) reaches into nested objects. A record without the field, or with a value
of another type, is a bad record whose message lists the fields the record does have.

Invalid UTF-8 is replaced (U+FFFD) and counted per document (``IngestStats.replaced``); the
document stays. A bad record (invalid JSON, a missing or wrongly typed text field, empty text) is
counted in :class:`IngestStats`, logged with a warning naming the file and line (the first few of
each kind; the rest are counted), and skipped. With ``strict=True`` either raises
:class:`IngestError` instead.

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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "EXTENSIONS",
    "FORMATS",
    "Document",
    "IngestError",
    "IngestStats",
    "read_documents",
    "read_jsonl",
    "read_parquet",
    "read_pile",
    "read_sources",
    "read_text",
    "read_wikitext103",
]

#: bad records of one kind logged one by one before the rest are only counted
LOG_FIRST = 5


@dataclass(frozen=True)
class Document:
    """One document: a stable id, its text, and small metadata (e.g. ``pile_set_name``).

    ``record`` is the source record as read (JSON object or Parquet row), kept only when a reader
    is asked to (``keep_records=True``: ``dedup`` writes kept documents back unchanged).
    """

    doc_id: str
    text: str
    meta: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] | None = field(default=None, compare=False, repr=False)


class IngestError(ValueError):
    """A bad record under ``strict=True``: names the file, the line and what was expected."""


@dataclass
class IngestStats:
    """What the readers read and skipped: the summary every command prints (shared across readers).

    Attributes:
        documents: documents yielded.
        skipped: bad records skipped (reasons by kind in ``reasons``).
        reasons: bad records by kind (``"missing field 'text'"``, ``"invalid JSON"``...).
        truncated: files cut short (the documents before the cut were read).
        files: ``(path, format, documents)`` of every file read.
        skipped_files: ``(path, reason)`` of every file of a folder left unread.
        replaced: ``{"file:line": n}``: documents kept with n invalid UTF-8 sequences replaced.
    """

    documents: int = 0
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    truncated: list[str] = field(default_factory=list)
    files: list[tuple[str, str, int]] = field(default_factory=list)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    replaced: dict[str, int] = field(default_factory=dict)

    def cut(self, path: str | os.PathLike[str], documents: int, detail: str, strict: bool) -> None:
        """Record that ``path`` is truncated after ``documents`` documents; raise if ``strict``."""
        msg = f"{path}: truncated after {documents} documents ({detail})"
        if strict:
            raise IngestError(msg)
        self.truncated.append(str(path))
        logger.warning("%s; the rest of the file is lost", msg)

    def bad(self, where: str, reason: str, strict: bool, kind: str | None = None) -> None:
        """Record a bad record at ``where`` (``file:line``); raise if ``strict``.

        ``kind`` groups reasons in ``reasons`` (default: ``reason`` up to its first ``:``).
        """
        if strict:
            raise IngestError(f"{where}: {reason}")
        self.skipped += 1
        key = kind if kind is not None else reason.split(":")[0]
        n = self.reasons[key] = self.reasons.get(key, 0) + 1
        if n <= LOG_FIRST:
            logger.warning("skipping bad record %s: %s", where, reason)
        if n == LOG_FIRST:
            logger.warning("further bad records of this kind (%s) are counted, not logged", key)

    def invalid_utf8(self, where: str, count: int, first: int) -> None:
        """Record ``count`` invalid UTF-8 sequences replaced in the document at ``where``."""
        self.replaced[where] = self.replaced.get(where, 0) + count
        if len(self.replaced) <= LOG_FIRST:
            logger.warning(
                "%s: %d invalid UTF-8 sequences replaced with U+FFFD (first at byte %d)",
                where,
                count,
                first,
            )

    def summary(self) -> str:
        """One line: documents and files read, files and records skipped and why, bytes replaced."""
        parts = [f"{self.documents} documents read from {len(self.files)} files"]
        if self.skipped_files:
            by: dict[str, int] = {}
            for _, why in self.skipped_files:
                by[why] = by.get(why, 0) + 1
            parts.append(
                f"{len(self.skipped_files)} files skipped ("
                + ", ".join(f"{n} {why}" for why, n in sorted(by.items()))
                + ")"
            )
        text = f"{self.skipped} bad records skipped"
        if self.reasons:
            text += " (" + ", ".join(f"{k}: {n}" for k, n in sorted(self.reasons.items())) + ")"
        parts.append(text)
        if self.replaced:
            parts.append(
                f"invalid UTF-8 replaced in {len(self.replaced)} documents "
                f"({sum(self.replaced.values())} sequences)"
            )
        if self.truncated:
            parts.append(f"{len(self.truncated)} truncated files ({', '.join(self.truncated)})")
        return ", ".join(parts)

    def details(self) -> list[str]:
        """One line per file read or skipped, and per document with bytes replaced (for ``-v``)."""
        lines = [f"read {p} ({fmt}): {n} documents" for p, fmt, n in self.files]
        lines += [f"skipped {p}: {why}" for p, why in self.skipped_files]
        lines += [f"replaced {n} invalid UTF-8 sequences in {w}" for w, n in self.replaced.items()]
        return lines


def _stats(stats: IngestStats | None) -> IngestStats:
    return stats if stats is not None else IngestStats()


def _decode(raw: bytes, where: str, strict: bool) -> tuple[str, int, int]:
    """``(text, invalid sequences replaced, first bad byte)`` of UTF-8 ``raw``.

    Invalid sequences become U+FFFD; with ``strict`` they raise :class:`IngestError` instead.
    """
    try:
        return raw.decode("utf-8"), 0, -1
    except UnicodeDecodeError as e:
        if strict:
            raise IngestError(f"{where}: invalid UTF-8 at byte {e.start}") from None
        text = raw.decode("utf-8", errors="replace")
        count = text.count("\ufffd") - raw.count("\ufffd".encode())
        return text, max(1, count), e.start


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


_MISSING = object()
_JSON_FILE = re.compile(r"\.json(\.gz|\.zst)?$")  # may hold one JSON array (not .jsonl)


def _get_field(record: Any, dotted: str) -> Any:
    """The value at a dotted name (``"a.b"``), or ``_MISSING``."""
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _field_names(record: dict[str, Any], limit: int = 20) -> str:
    """The fields of a record, nested ones dotted (two levels), for error messages."""
    names: list[str] = []
    for k, v in record.items():
        if isinstance(v, dict) and v:
            names += [f"{k}.{k2}" for k2 in v]
        else:
            names.append(str(k))
    text = ", ".join(names[:limit])
    if len(names) > limit:
        text += f", ... ({len(names)} in all)"
    return text or "none"


def _describe(value: Any) -> str:
    if isinstance(value, list):
        kinds = sorted({type(x).__name__ for x in value})
        return f"a list of {'/'.join(kinds)}" if kinds else "an empty list"
    return type(value).__name__


def _record_text(record: dict[str, Any], text_field: str) -> tuple[str | None, str, str]:
    """``(text, reason, kind)`` of a record: text is None when the field is missing or mistyped.

    A string is the text; a list of strings is joined with a blank line between its items.
    """
    value = _get_field(record, text_field)
    if value is _MISSING or value is None:
        return (
            None,
            f"missing field {text_field!r} (the record has: {_field_names(record)})",
            f"missing field {text_field!r}",
        )
    if isinstance(value, str):
        return value, "", ""
    if isinstance(value, list) and all(isinstance(x, str) for x in value):
        return "\n\n".join(value), "", ""
    return (
        None,
        f"field {text_field!r}: expected a string or a list of strings, got {_describe(value)} "
        f"(the record has: {_field_names(record)})",
        f"field {text_field!r} of another type",
    )


def _record_document(
    record: Any,
    where: str,
    default_id: str,
    text_field: str,
    id_field: str | None,
    meta_fields: tuple[str, ...],
    keep_records: bool,
    st: IngestStats,
    strict: bool,
) -> Document | None:
    """The document of one JSON record or Parquet row (None, counted, for a bad record)."""
    if not isinstance(record, dict):
        st.bad(where, f"expected a JSON object, got {type(record).__name__}", strict)
        return None
    text, reason, kind = _record_text(record, text_field)
    if text is None:
        st.bad(where, reason, strict, kind)
        return None
    if not text.strip():
        st.bad(where, f"empty text in field {text_field!r}", strict)
        return None
    doc_id = default_id
    if id_field is not None:
        value = _get_field(record, id_field)
        if value is _MISSING or value is None:
            st.bad(
                where,
                f"missing id field {id_field!r} (the record has: {_field_names(record)})",
                strict,
                f"missing id field {id_field!r}",
            )
            return None
        doc_id = str(value)
    meta = {}
    for f in meta_fields:
        v = _get_field(record, f)
        meta[f.split(".")[-1]] = None if v is _MISSING else v
    st.documents += 1
    return Document(doc_id, text, meta, record if keep_records else None)


def read_jsonl(
    path: str | os.PathLike[str],
    text_field: str = "text",
    *,
    id_field: str | None = None,
    meta_fields: Iterable[str] = (),
    strict: bool = False,
    stats: IngestStats | None = None,
    name: str | None = None,
    keep_records: bool = False,
) -> Iterator[Document]:
    """Stream documents from a JSON-lines file (``.jsonl``, ``.json``; also ``.gz``/``.zst``).

    A ``.json`` file holding one JSON array (first byte ``[``) is read whole, one record per
    element (numbered from 1 in messages and ids).

    Args:
        path: the file.
        text_field: field holding the text (a string or a list of strings, joined with a blank
            line); dots reach into nested objects (``"a.b"``).
        id_field: field holding a document id; default ``"<name>:<line>"``.
        meta_fields: fields copied into ``Document.meta`` (dotted names allowed; the key is the
            last part).
        strict: raise IngestError on the first bad record (or invalid UTF-8) instead.
        stats: counts are added here.
        name: the file's name in ids (default its file name; a folder passes the relative path).
        keep_records: keep each record in ``Document.record``.
    """
    path = Path(path)
    st = _stats(stats)
    label = name if name is not None else path.name
    meta_fields = tuple(meta_fields)
    first = st.documents
    lines = _open_lines(path)
    lineno = 0
    array = False
    while True:
        try:
            raw = next(lines)
        except StopIteration:
            return
        except _Truncated as e:
            st.cut(path, st.documents - first, str(e), strict)
            return
        lineno += 1
        if lineno == 1 and raw.lstrip().startswith(b"[") and _JSON_FILE.search(path.name):
            array = True
            break
        where = f"{path}:{lineno}"
        if not raw.strip():
            continue
        line, replaced, first_bad = _decode(raw, where, strict)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            st.bad(where, f"invalid JSON ({e.msg})", strict)
            continue
        doc = _record_document(
            record,
            where,
            f"{label}:{lineno}",
            text_field,
            id_field,
            meta_fields,
            keep_records,
            st,
            strict,
        )
        if doc is not None:
            if replaced:
                st.invalid_utf8(where, replaced, first_bad)
            yield doc
    if array:
        yield from _read_json_array(
            path, raw, lines, label, text_field, id_field, meta_fields, keep_records, st, strict
        )


def _read_json_array(
    path: Path,
    first: bytes,
    lines: Iterator[bytes],
    label: str,
    text_field: str,
    id_field: str | None,
    meta_fields: tuple[str, ...],
    keep_records: bool,
    st: IngestStats,
    strict: bool,
) -> Iterator[Document]:
    """The records of a ``.json`` file holding one array (read whole: arrays are not streamed)."""
    parts = [first]
    try:
        parts.extend(lines)
    except _Truncated as e:
        st.cut(path, 0, str(e), strict)
        return
    text, replaced, first_bad = _decode(b"".join(parts), str(path), strict)
    if replaced:
        st.invalid_utf8(str(path), replaced, first_bad)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise IngestError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(records, list):
        raise IngestError(f"{path}: expected JSON lines or one JSON array")
    for i, record in enumerate(records, start=1):
        doc = _record_document(
            record,
            f"{path}[{i}]",
            f"{label}:{i}",
            text_field,
            id_field,
            meta_fields,
            keep_records,
            st,
            strict,
        )
        if doc is not None:
            yield doc


def read_pile(
    path: str | os.PathLike[str],
    *,
    strict: bool = False,
    stats: IngestStats | None = None,
    name: str | None = None,
    keep_records: bool = False,
) -> Iterator[Document]:
    """Stream a Pile shard (``.jsonl`` or ``.jsonl.zst``): ``{"text", "meta": {"pile_set_name"}}``.

    ``Document.meta`` holds ``pile_set_name``; ids are ``"<file name>:<line>"``.
    """
    yield from read_jsonl(
        path,
        "text",
        meta_fields=("meta.pile_set_name",),
        strict=strict,
        stats=stats,
        name=name,
        keep_records=keep_records,
    )


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def read_text(
    path: str | os.PathLike[str],
    *,
    suffixes: tuple[str, ...] = (".txt",),
    strict: bool = False,
    stats: IngestStats | None = None,
    name: str | None = None,
) -> Iterator[Document]:
    """One document per plain-text file: ``path`` is a file, or a folder walked in sorted order.

    In a folder only files ending in one of ``suffixes`` are read, hidden files and folders
    skipped; ids are the paths relative to the folder (``name`` or the file name for a single
    file). Invalid UTF-8 is replaced and counted (an error with ``strict``).
    """
    path = Path(path)
    st = _stats(stats)
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.name.endswith(suffixes) and not _hidden(p.relative_to(path))
        )
        names = [p.relative_to(path).as_posix() for p in files]
    elif path.is_file():
        files, names = [path], [name if name is not None else path.name]
    else:
        raise FileNotFoundError(f"{path}: no such file or folder")
    for p, label in zip(files, names, strict=True):
        raw = p.read_bytes()
        replaced, first_bad = 0, -1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            text, replaced, first_bad = _decode(raw, f"{p}:{line}", strict)
        if not text.strip():
            st.bad(f"{p}:1", "empty text", strict)
            continue
        if replaced:
            st.invalid_utf8(str(p), replaced, first_bad)
        st.documents += 1
        yield Document(label, text, {})


# A top-level Wikitext-103 heading is " = Title = " (one '='); subsections are " = = Sub = = ".
_WIKITEXT_TITLE = re.compile(r"^ = (?!=)(.*?) = $")


def read_wikitext103(
    path: str | os.PathLike[str], *, strict: bool = False, stats: IngestStats | None = None
) -> Iterator[Document]:
    """Split a Wikitext-103 raw file (``wiki.train.raw``...) into articles.

    An article starts at a line `` = Title = `` (exactly one ``=`` each side; `` = = Sub = = ``
    lines stay inside the article) and runs to the next such line. The text keeps the heading line
    and the file's own spacing; ``doc_id`` is the title, ``meta`` has the starting line. Invalid
    UTF-8 is replaced and counted per article (an error with ``strict``).
    """
    path = Path(path)
    st = _stats(stats)
    title: str | None = None
    start = 0
    lines: list[str] = []
    first = st.documents
    replaced = [0, -1]  # sequences replaced in the current article, first bad byte

    def flush() -> Iterator[Document]:
        if title is None:
            if "".join(lines).strip():
                st.bad(f"{path}:1", "text before the first ' = Title = ' heading", strict)
            return
        text = "".join(lines)
        if replaced[0]:
            st.invalid_utf8(f"{path}:{start}", replaced[0], replaced[1])
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
        line, n, first_bad = _decode(raw, f"{path}:{lineno}", strict)
        m = _WIKITEXT_TITLE.match(line.rstrip("\n"))
        if m:
            yield from flush()
            title, start, lines = m.group(1), lineno, [line]
            replaced = [0, -1]
        else:
            lines.append(line)
        if n:
            replaced = [replaced[0] + n, first_bad if replaced[1] < 0 else replaced[1]]
    yield from flush()


def read_parquet(
    path: str | os.PathLike[str],
    text_field: str = "text",
    *,
    id_field: str | None = None,
    meta_fields: Iterable[str] = (),
    strict: bool = False,
    stats: IngestStats | None = None,
    name: str | None = None,
    keep_records: bool = False,
) -> Iterator[Document]:
    """Stream a Parquet file as exported by ``datasets`` (``Dataset.to_parquet``), a row group at a time.

    Rows are numbered from 1 across row groups; ids default to ``"<name>:<row>"``. Fields follow
    :func:`read_jsonl`'s rules (a list-of-strings column is joined; dotted names reach into
    struct columns).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    st = _stats(stats)
    label = name if name is not None else path.name
    meta_fields = tuple(meta_fields)
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        if path.is_file() and path.stat().st_size and _parquet_tail_missing(path):
            st.cut(path, 0, f"no Parquet footer: {e}", strict)
            return
        raise IngestError(f"{path}: not a readable Parquet file ({e})") from None
    names = list(pf.schema_arrow.names)
    if text_field.split(".")[0] not in names:
        msg = f"column {text_field!r} missing (columns: {', '.join(names)})"
        if strict:
            raise IngestError(f"{path}: {msg}")
        logger.warning("skipping %s: %s", path, msg)
        st.skipped += pf.metadata.num_rows
        key = f"missing field {text_field!r}"
        st.reasons[key] = st.reasons.get(key, 0) + pf.metadata.num_rows
        return
    wanted = {text_field, *meta_fields} | ({id_field} if id_field else set())
    columns = (
        names if keep_records else [c for c in names if c in {f.split(".")[0] for f in wanted}]
    )
    row = 0
    for g in range(pf.num_row_groups):
        try:
            table = pf.read_row_group(g, columns=columns)
        except (pa.ArrowException, OSError) as e:
            st.cut(path, row, f"row group {g} unreadable: {e}", strict)
            return
        for record in table.to_pylist():
            row += 1
            doc = _record_document(
                record,
                f"{path}:{row}",
                f"{label}:{row}",
                text_field,
                id_field,
                meta_fields,
                keep_records,
                st,
                strict,
            )
            if doc is not None:
                yield doc


def _parquet_tail_missing(path: Path) -> bool:
    """True when a file starts like Parquet (``PAR1``) but does not end with ``PAR1``."""
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(0, path.stat().st_size - 4))
        tail = f.read(4)
    return head == b"PAR1" and tail != b"PAR1"


FORMATS = ("auto", "jsonl", "text", "wikitext103", "pile", "parquet")

#: file endings a folder walk reads, and the format each is read as
EXTENSIONS: dict[str, str] = {
    ".txt": "text",
    ".md": "text",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".jsonl.gz": "jsonl",
    ".json.gz": "jsonl",
    ".jsonl.zst": "jsonl",
    ".json.zst": "jsonl",
    ".parquet": "parquet",
    ".raw": "wikitext103",
}


def _format_of(name: str) -> str | None:
    """The format of a file name by its ending (:data:`EXTENSIONS`), or None."""
    for ext in sorted(EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return EXTENSIONS[ext]
    return None


def _read_file(
    p: Path,
    fmt: str,
    label: str,
    text_field: str,
    id_field: str | None,
    strict: bool,
    st: IngestStats,
    keep_records: bool,
) -> Iterator[Document]:
    before = st.documents
    if fmt == "jsonl":
        # .jsonl.zst is how the Pile ships: its subset name is kept when records carry one
        meta = ("meta.pile_set_name",) if p.name.endswith(".zst") else ()
        yield from read_jsonl(
            p,
            text_field,
            id_field=id_field,
            meta_fields=meta,
            strict=strict,
            stats=st,
            name=label,
            keep_records=keep_records,
        )
    elif fmt == "pile":
        yield from read_pile(p, strict=strict, stats=st, name=label, keep_records=keep_records)
    elif fmt == "text":
        yield from read_text(p, strict=strict, stats=st, name=label)
    elif fmt == "wikitext103":
        yield from read_wikitext103(p, strict=strict, stats=st)
    elif fmt == "parquet":
        yield from read_parquet(
            p,
            text_field,
            id_field=id_field,
            strict=strict,
            stats=st,
            name=label,
            keep_records=keep_records,
        )
    else:
        raise ValueError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    st.files.append((str(p), fmt, st.documents - before))


def _walk(folder: Path, fmt: str, st: IngestStats) -> Iterator[tuple[Path, str, str]]:
    """``(file, format, relative name)`` of the files a folder walk reads, sorted; skips recorded."""
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        for d in sorted(dirnames):
            if d.startswith("."):
                st.skipped_files.append((str(here / d), "hidden folder"))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            p = here / f
            rel = p.relative_to(folder).as_posix()
            if f.startswith("."):
                st.skipped_files.append((str(p), "hidden file"))
                continue
            got = _format_of(f)
            if got is None:
                st.skipped_files.append((str(p), "unsupported extension"))
            elif fmt != "auto" and got != fmt and not (fmt == "pile" and got == "jsonl"):
                st.skipped_files.append((str(p), f"not --format {fmt}"))
            else:
                yield p, (got if fmt == "auto" else fmt), rel


def read_sources(
    sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    format: str = "auto",
    *,
    text_field: str = "text",
    id_field: str | None = None,
    strict: bool = False,
    stats: IngestStats | None = None,
    keep_records: bool = False,
) -> Iterator[Document]:
    """Stream the documents of files and folders: the one reader every command uses.

    Every path is checked now (a missing one raises FileNotFoundError before anything is read);
    documents are then read lazily, source by source. A folder is walked recursively in sorted
    order, each file read by its ending (:data:`EXTENSIONS`; with an explicit ``format`` only the
    files of that format); hidden files and folders and other endings are skipped and recorded in
    ``stats.skipped_files``. A file named directly is read as ``format``, or by its ending with
    ``"auto"`` (an unknown ending is read as plain text).

    Args:
        sources: a path or a sequence of paths.
        format: ``"auto"`` or one of :data:`FORMATS`.
        text_field: JSON/Parquet field holding the text (string or list of strings; dotted).
        id_field: JSON/Parquet field holding a document id (default ``"<file>:<line>"``).
        strict: a bad record, invalid UTF-8 or a truncated file raises IngestError.
        stats: the summary of what was read and skipped is added here.
        keep_records: keep each JSON record / Parquet row in ``Document.record``.
    """
    if format not in FORMATS:
        raise ValueError(f"format {format!r}: expected one of {', '.join(FORMATS)}")
    paths = (
        [Path(sources)] if isinstance(sources, (str, os.PathLike)) else [Path(s) for s in sources]
    )
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or folder")
    st = _stats(stats)

    def stream() -> Iterator[Document]:
        for p in paths:
            if p.is_dir():
                for f, fmt, rel in _walk(p, format, st):
                    yield from _read_file(
                        f, fmt, rel, text_field, id_field, strict, st, keep_records
                    )
            else:
                fmt = format
                if fmt == "auto":
                    fmt = _format_of(p.name) or (
                        "wikitext103" if p.name.startswith("wiki.") else "text"
                    )
                yield from _read_file(
                    p, fmt, p.name, text_field, id_field, strict, st, keep_records
                )

    return stream()


def read_documents(
    path: str | os.PathLike[str],
    format: str = "auto",
    *,
    text_field: str = "text",
    id_field: str | None = None,
    strict: bool = False,
    stats: IngestStats | None = None,
    keep_records: bool = False,
) -> Iterator[Document]:
    """The documents of one file or folder: :func:`read_sources` with one path."""
    return read_sources(
        [path],
        format,
        text_field=text_field,
        id_field=id_field,
        strict=strict,
        stats=stats,
        keep_records=keep_records,
    )
