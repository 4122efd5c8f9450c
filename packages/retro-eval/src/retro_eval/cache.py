"""Resumable evaluation: results cached in the output directory, and the identities they are keyed by.

``retro-eval run`` scores documents (and answers questions) in fixed groups of consecutive items
(``cache_group`` in run.yaml, default 8; 1 = one entry per document) and stores each group's
per-document results as one entry under ``<output>/cache/``. An entry's key is the SHA-256 of
everything its numbers depend on: the model (:func:`model_checksum`, its weights and config), the
database (:func:`retriever_checksum`, its manifest, which holds the SHA-256 of every file), the
settings (window, stride, batch size, k, ...) and the group's own input (its token ids and the
neighbours it is given). A second run, or a run killed halfway and started again, reuses every
complete entry and computes the rest; as each group is computed the same way whether or not the
others were cached, the numbers are identical.

Entries are ``.npz`` (numbers, read with ``allow_pickle=False``) or ``.json`` (text), written to a
temporary file and renamed into place (a kill never leaves half an entry under its name). Each
holds its key and a SHA-256 of its content; an entry that cannot be read, holds another key or
fails its checksum is logged, deleted and recomputed, never used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_FORMAT",
    "ResultCache",
    "arrays_checksum",
    "cache_key",
    "model_checksum",
    "retriever_checksum",
    "tokens_checksum",
]

#: bumped when the layout or meaning of an entry changes (old entries are then never matched).
CACHE_FORMAT = 1


def cache_key(*parts: Any) -> str:
    """SHA-256 (hex) of a JSON-serialisable description of what a result depends on."""
    blob = json.dumps([CACHE_FORMAT, *parts], sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def tokens_checksum(token_documents: Sequence[Sequence[int]]) -> str:
    """SHA-256 of token documents (each document's length and ids)."""
    h = hashlib.sha256()
    for d in token_documents:
        a = np.asarray(d, dtype=np.int64)
        h.update(np.int64(len(a)).tobytes())
        h.update(a.tobytes())
    return h.hexdigest()


def arrays_checksum(arrays: Sequence[np.ndarray | None]) -> str:
    """SHA-256 of arrays (dtype, shape and bytes of each; None counts as absent)."""
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def model_checksum(model: Any) -> str:
    """SHA-256 of a model's weights (every tensor of its state dict: name, dtype, shape, bytes) and
    of its config, so a retrained or retro-fitted checkpoint never matches another's entries."""
    import torch

    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    cfg = getattr(model, "config", None)
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        h.update(json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str).encode())
    else:
        h.update(repr(cfg).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def retriever_checksum(retriever: Any) -> str | None:
    """A database's identity: SHA-256 of its manifest (which lists the SHA-256 of every file), or
    None for a retriever without one (its results are then never cached, only what is computed
    from the neighbours it returned, keyed by those neighbours)."""
    manifest = getattr(retriever, "manifest", None)
    if not isinstance(manifest, Mapping):
        return None
    return cache_key("database", manifest)


class ResultCache:
    """Entries under one directory (``None``: a disabled cache that stores nothing).

    Counts ``hits``, ``misses`` and ``corrupted`` entries (logged at the end of a run).
    """

    def __init__(self, directory: str | os.PathLike[str] | None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.hits = 0
        self.misses = 0
        self.corrupted = 0

    def _path(self, key: str, suffix: str) -> Path:
        assert self.directory is not None
        return self.directory / key[:2] / f"{key}{suffix}"

    def _bad(self, path: Path, why: str) -> None:
        self.corrupted += 1
        logger.warning("cache entry %s is corrupted (%s): recomputing it", path, why)
        try:
            path.unlink()
        except OSError:
            pass

    def _write(self, path: Path, write: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_arrays(self, key: str) -> dict[str, np.ndarray] | None:
        """The arrays stored under ``key``, or None (absent, or corrupted: then deleted)."""
        if self.directory is None:
            return None
        path = self._path(key, ".npz")
        if not path.is_file():
            self.misses += 1
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {name: z[name] for name in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
            self._bad(path, f"unreadable: {type(e).__name__}")
            self.misses += 1
            return None
        stored_key = data.pop("__key__", None)
        digest = data.pop("__sha256__", None)
        names = sorted(data)
        if stored_key is None or str(stored_key) != key:
            self._bad(path, "holds another key")
        elif digest is None or str(digest) != arrays_checksum([data[n] for n in names]):
            self._bad(path, "checksum mismatch")
        else:
            self.hits += 1
            return data
        self.misses += 1
        return None

    def put_arrays(self, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Store arrays under ``key`` (atomically: a temporary file renamed into place)."""
        if self.directory is None:
            return
        data = {n: np.asarray(a) for n, a in arrays.items()}
        if any(a.dtype == object for a in data.values()):
            raise TypeError("cache entries hold numeric arrays only (no pickled objects)")
        names = sorted(data)
        payload = dict(data)
        payload["__key__"] = np.array(key)
        payload["__sha256__"] = np.array(arrays_checksum([data[n] for n in names]))
        self._write(self._path(key, ".npz"), lambda fh: np.savez(fh, **payload))

    def get_json(self, key: str) -> Any:
        """The JSON value stored under ``key``, or None (absent, or corrupted: then deleted)."""
        if self.directory is None:
            return None
        path = self._path(key, ".json")
        if not path.is_file():
            self.misses += 1
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            self._bad(path, f"unreadable: {type(e).__name__}")
            self.misses += 1
            return None
        if not isinstance(entry, dict) or entry.get("key") != key or "value" not in entry:
            self._bad(path, "holds another key")
        elif entry.get("sha256") != cache_key("value", entry["value"]):
            self._bad(path, "checksum mismatch")
        else:
            self.hits += 1
            return entry["value"]
        self.misses += 1
        return None

    def put_json(self, key: str, value: Any) -> None:
        """Store a JSON value under ``key`` (atomically)."""
        if self.directory is None:
            return
        entry = {"key": key, "sha256": cache_key("value", value), "value": value}
        blob = json.dumps(entry, allow_nan=False).encode("utf-8")
        self._write(self._path(key, ".json"), lambda fh: fh.write(blob))

    def summary(self) -> dict[str, int]:
        """``{"hits", "misses", "corrupted"}`` so far."""
        return {"hits": self.hits, "misses": self.misses, "corrupted": self.corrupted}
