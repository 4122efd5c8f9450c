"""Atomic file writes: every file retro-core writes appears whole or not at all.

The one pattern, used by every writer (checkpoints, retro-fit weights, datasets, training state,
run metadata): write to a temporary file in the destination's directory, flush and fsync it, then
``os.replace`` it onto the final name. A crash or a full disk leaves the previous file (or none)
and removes the temporary one; a reader never sees half a file.

:func:`sha256_file` is the hash the writers record of what they wrote (checkpoint integrity
records, dataset manifests) and the readers check.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_path",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
    "sha256_file",
]

_BLOCK = 1 << 20


@contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``final`` to write to; on exit fsynced and renamed onto ``final``.

    For writers that want a file name (e.g. ``safetensors.torch.save_file``). When the block
    raises, the temporary file is removed and ``final`` is left as it was.
    """
    final = Path(final)
    # A unique name (not mkstemp: its 0600 mode would stick to the final file).
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(final: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> Path:
    """Write ``final`` atomically: ``write(f)`` on a binary temporary file, fsync, rename."""
    final = Path(final)
    with atomic_path(final) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
    return final


def atomic_write_text(final: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``final`` atomically."""
    return atomic_write(final, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(final: str | os.PathLike[str], obj: Any, **dumps_kwargs: Any) -> Path:
    """Write ``json.dumps(obj, **dumps_kwargs)`` plus a newline to ``final`` atomically."""
    return atomic_write_text(final, json.dumps(obj, **dumps_kwargs) + "\n")


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory, so that the renames into it survive a power loss (where supported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) of a file's bytes, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()
