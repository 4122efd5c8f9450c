"""Small file helpers shared by the benchmark readers: transparent .gz / .zst text, JSONL."""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .types import BenchmarkError


def open_text(path: str | Path) -> IO[str]:
    """Open a UTF-8 text file for reading, decompressing ``.gz`` and ``.zst`` by suffix.

    Raises:
        BenchmarkError: the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: no such file")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    if path.suffix == ".zst":
        import zstandard

        fh = path.open("rb")
        reader = zstandard.ZstdDecompressor().stream_reader(fh, closefd=True)
        return io.TextIOWrapper(reader, encoding="utf-8", newline="")
    return path.open("r", encoding="utf-8", newline="")


def strip_compression(name: str) -> str:
    """``wiki.test.raw.gz`` -> ``wiki.test.raw``; ``val.jsonl.zst`` -> ``val.jsonl``."""
    for ext in (".gz", ".zst"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for every non-blank line of a (compressed) JSONL file.

    Raises:
        BenchmarkError: a line is not a JSON object (names the file and line).
    """
    with open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BenchmarkError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise BenchmarkError(f"{path}:{lineno}: expected a JSON object per line")
            yield lineno, rec
