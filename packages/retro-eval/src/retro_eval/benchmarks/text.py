"""A user's own evaluation text: ``{"text"}`` JSONL, plain text files, or a folder of them.

- JSONL (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``): one document per record. The text is the
  ``text_field`` (default ``text``; a dotted path such as ``body.text`` reaches into nested
  objects; a list of strings is joined with a blank line, as paragraphs). An ``id`` field, when
  present, is the document id (else ``file:line``). ``subset_field`` (optional, dotted) groups the
  documents in the report (as the Pile's ``meta.pile_set_name`` does; a Pile record with no
  ``subset_field`` given is grouped by it).
- Plain text (``.txt``, ``.md``, also ``.gz`` / ``.zst``): one document per file. Invalid UTF-8
  bytes are replaced (U+FFFD) and counted in ``meta["replaced_bytes"]`` (logged), never dropped.
- A folder: every such file under it (recursive, sorted; hidden files and folders skipped), one
  ``source`` line per skipped file in the log.

Documents carry ``meta["subset"]`` (the subset value, when there is one), which
``retro-eval run`` reports per subset.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .types import BenchmarkError, Document

__all__ = ["TEXT_SUFFIXES", "read_text_documents", "text_files"]

logger = logging.getLogger(__name__)

#: file names a text benchmark reads (before a .gz / .zst suffix).
TEXT_SUFFIXES = (".jsonl", ".txt", ".md")


def _base_name(name: str) -> str:
    for ext in (".gz", ".zst"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _read_bytes(path: Path) -> bytes:
    if path.name.endswith(".gz"):
        with gzip.open(path, "rb") as fh:
            return fh.read()
    if path.name.endswith(".zst"):
        import zstandard

        with path.open("rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as r:
            return r.read()
    return path.read_bytes()


def _decode(data: bytes, where: str) -> tuple[str, int]:
    """UTF-8 text with invalid bytes replaced by U+FFFD, and how many bytes were replaced."""
    parts: list[str] = []
    bad = pos = 0
    while True:
        try:
            parts.append(data[pos:].decode("utf-8"))
            break
        except UnicodeDecodeError as e:
            parts.append(data[pos : pos + e.start].decode("utf-8"))
            parts.append("\ufffd")
            bad += e.end - e.start
            pos += e.end
    if bad:
        logger.warning("%s: %d invalid UTF-8 byte(s) replaced by U+FFFD", where, bad)
    return "".join(parts), bad


def text_files(path: Path) -> tuple[list[Path], list[str]]:
    """The files a folder holds for a text benchmark (sorted, recursive, no hidden ones), and
    the names skipped (``"name (why)"``)."""
    files, skipped = [], []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if not p.is_file():
            continue
        if _base_name(p.name).endswith(TEXT_SUFFIXES):
            files.append(p)
        else:
            skipped.append(f"{rel} (not {', '.join(TEXT_SUFFIXES)})")
    return files, skipped


def _get(rec: Mapping[str, Any], dotted: str) -> Any:
    cur: Any = rec
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _text_of(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n\n".join(value)
    return None


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any], int]]:
    text, bad = _decode(_read_bytes(path), str(path))
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchmarkError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise BenchmarkError(f"{path}:{lineno}: expected a JSON object per line")
        yield lineno, rec, bad


def _jsonl_documents(
    path: Path, label: str, text_field: str, subset_field: str | None
) -> list[Document]:
    docs = []
    for lineno, rec, _ in _jsonl_records(path):
        where = f"{path}:{lineno}"
        raw = _get(rec, text_field)
        text = _text_of(raw)
        if text is None:
            has = ", ".join(sorted(rec)) or "no fields"
            got = "missing" if raw is None else f"got {type(raw).__name__}"
            raise BenchmarkError(
                f"{where}: field {text_field!r}: expected a string or a list of strings ({got}; "
                f"the record has: {has})"
            )
        meta: dict[str, Any] = {}
        if subset_field is not None:
            sub = _get(rec, subset_field)
            if sub is None or isinstance(sub, dict | list):
                raise BenchmarkError(
                    f"{where}: subset field {subset_field!r}: expected a string or number "
                    f"(record has: {', '.join(sorted(rec))})"
                )
            meta["subset"] = str(sub)
        else:
            pile = _get(rec, "meta.pile_set_name")
            if isinstance(pile, str):
                meta["subset"] = pile
                meta["pile_set_name"] = pile
        doc_id = rec.get("id")
        doc_id = str(doc_id) if isinstance(doc_id, str | int) else f"{label}:{lineno}"
        docs.append(Document(doc_id=doc_id, text=text, meta=meta))
    return docs


def read_text_documents(
    path: str | Path,
    *,
    text_field: str = "text",
    subset_field: str | None = None,
) -> list[Document]:
    """Read a user's evaluation documents from a JSONL file, a plain text file or a folder.

    Args:
        path: a ``.jsonl[.gz|.zst]`` file, a ``.txt`` / ``.md`` file, or a folder of them.
        text_field: the JSONL field holding the text (dotted path; a list of strings is joined
            with blank lines).
        subset_field: optional JSONL field (dotted) whose value groups the documents in the report.

    Returns:
        Documents; ``meta["subset"]`` holds the subset, ``meta["replaced_bytes"]`` the count of
        invalid UTF-8 bytes replaced in a plain text file.

    Raises:
        BenchmarkError: one line naming the file (and line) and the field: a missing or non-text
        field, invalid JSON, a folder with no text file, or no document at all.
    """
    path = Path(path)
    if path.is_dir():
        files, skipped = text_files(path)
        for s in skipped:
            logger.warning("%s: skipped %s", path, s)
        if not files:
            raise BenchmarkError(
                f"{path}: no evaluation text in this folder (expected files ending in "
                f"{', '.join(TEXT_SUFFIXES)}, optionally .gz/.zst)"
            )
        root = path
    elif path.is_file():
        files, root = [path], path.parent
    else:
        raise BenchmarkError(f"{path}: no such file or directory")
    docs: list[Document] = []
    for f in files:
        label = str(f.relative_to(root))
        if _base_name(f.name).endswith(".jsonl"):
            docs.extend(_jsonl_documents(f, label, text_field, subset_field))
        elif _base_name(f.name).endswith((".txt", ".md")):
            text, bad = _decode(_read_bytes(f), str(f))
            meta: dict[str, Any] = {"replaced_bytes": bad} if bad else {}
            if text.strip():
                docs.append(Document(doc_id=label, text=text, meta=meta))
            else:
                logger.warning("%s: empty file skipped", f)
        else:
            raise BenchmarkError(
                f"{f}: unknown evaluation text type (expected {', '.join(TEXT_SUFFIXES)})"
            )
    if not docs:
        raise BenchmarkError(f"{path}: empty benchmark (no document with text)")
    logger.info("%s: %d evaluation documents from %d file(s)", path, len(docs), len(files))
    return docs
