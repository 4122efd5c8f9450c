"""Versioned manifests, crash-safe file writes and the writer lock (DESIGN.md 2.3).

Every file is written under a temporary name in the same directory, flushed and fsynced, then
renamed into place (an atomic replace on POSIX) and the directory is fsynced: :func:`atomic_file`
does that, and every writer of retro-db (shards, index, manifests, neighbours datasets, dedup
output) goes through it. One writer at a time holds :func:`writer_lock`. A manifest is written
last and records the sha256, size (and for ``.npy`` files shape and dtype) of every file it names,
so a reader that sees a manifest sees complete files. Files named by a manifest are never rewritten:
a new version writes new file names, so a reader holding an old manifest keeps working.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "GC_RECORD",
    "MANIFEST_NAME",
    "DatabaseError",
    "atomic_file",
    "atomic_save_npy",
    "atomic_write_bytes",
    "atomic_write_json",
    "check_files",
    "file_entry",
    "fsync_dir",
    "json_checksum",
    "read_json",
    "remove_stale_temp_files",
    "resolve_inside",
    "sha256_file",
    "write_error",
    "writer_lock",
]

MANIFEST_NAME = "manifest.json"
#: versions whose files ``retro-db gc`` deleted (build.collect_garbage); never named by a manifest
GC_RECORD = "gc.json"
TMP_PREFIX = ".tmp-"


class DatabaseError(ValueError):
    """A database or dataset on disk is missing, truncated, corrupt or inconsistent.

    The message is one line naming the file and what was expected.
    """


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in ``chunk_bytes`` blocks (memory stays flat)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def resolve_inside(
    directory: str | os.PathLike[str], name: str, where: str | os.PathLike[str], field: str
) -> Path:
    """``directory / name``, refused unless it resolves (symbolic links followed) inside ``directory``.

    Args:
        directory: the database or dataset directory the manifest describes.
        name: the relative name the manifest gives.
        where: the manifest file (named in the error).
        field: the manifest field holding ``name`` (named in the error).

    Raises:
        DatabaseError: an absolute name, ``..`` components or a link that leave ``directory``.
    """
    root = Path(directory).resolve()
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\0" in name:
        raise DatabaseError(f"{where}: {field} = {name!r}: expected a relative path inside {root}")
    target = (root / name).resolve()
    if root not in target.parents:
        raise DatabaseError(
            f"{where}: {field} = {name!r} resolves outside {root} (refused: every file a manifest "
            "names must lie inside its directory)"
        )
    return Path(directory) / name


def json_checksum(obj: Mapping[str, Any], skip: str = "checksum") -> str:
    """sha256 of the canonical JSON of ``obj`` without its ``skip`` key (a manifest's self-check)."""
    body = {k: v for k, v in obj.items() if k != skip}
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory so that a rename inside it is durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f"{TMP_PREFIX}{path.name}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], size: int | None = None) -> Iterator[Path]:
    """The one crash-safe way retro-db writes a file: yield a temporary path to write to.

    The body writes the whole file at the yielded path (``.tmp-<name>`` in the same directory,
    which is created if needed), by any means (``open``, ``np.save``, ``faiss.write_index``, a
    memmap). When the body returns, the file is fsynced, renamed onto ``path`` (an atomic replace
    on POSIX) and the directory is fsynced. If the body raises, ``path`` is untouched. A failed
    write (an OSError: disk full, file size limit, read-only) removes the temporary file and raises
    a one-line :class:`DatabaseError` naming ``path``, the bytes written and the bytes free; any
    other exception leaves it for :func:`remove_stale_temp_files` (as after a kill). ``size``, the
    bytes the file will have when known, goes into that error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except OSError as e:
        raise write_error(path, tmp, e, size) from None
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_error(path: Path, tmp: Path, e: OSError, size: int | None = None) -> DatabaseError:
    """The one-line error of a failed write of ``path`` (via ``tmp``, which is removed).

    Names the file, the bytes written (of ``size`` when known), the reason and the bytes free.
    """
    import shutil

    written = tmp.stat().st_size if tmp.is_file() else 0
    tmp.unlink(missing_ok=True)
    try:
        free = f"{shutil.disk_usage(path.parent).free} bytes free there"
    except OSError:
        free = "free space unknown"
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    reason = e.strerror or text  # "No space left on device", numpy's "N requested and M written"
    return DatabaseError(
        f"{path}: write failed after {written}{'' if size is None else f' of {size}'} bytes: "
        f"{reason}; {free} "
        "(nothing was replaced; the partial file is removed)"
    )


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_file`)."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as deterministic JSON (sorted keys, indent 2) atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_npy(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Save ``array`` as ``.npy`` (no pickle) atomically (:func:`atomic_file`)."""
    array = np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    with atomic_file(path, size=header.tell() + array.nbytes) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)


@contextlib.contextmanager
def writer_lock(
    db_dir: Path, what: str = "build or add", remove_when_done: bool = False
) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``db_dir/.lock`` while writing (one writer at a time).

    The kernel drops the lock when the process dies, SIGKILL included, so a restart after a kill
    acquires it again. Readers take no lock: they only read files a manifest names.

    Args:
        db_dir: the directory written (created if needed).
        what: names the writer in the error of a second one.
        remove_when_done: delete the lock file when the body finishes without an error (for
            outputs that are complete then, such as a neighbours dataset).
    """
    import fcntl

    db_dir.mkdir(parents=True, exist_ok=True)
    with open(db_dir / ".lock", "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatabaseError(
                f"{db_dir / '.lock'}: another {what} is writing here (one writer at a time)"
            ) from None
        try:
            yield
            if remove_when_done:
                (db_dir / ".lock").unlink(missing_ok=True)
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def remove_stale_temp_files(directory: str | os.PathLike[str]) -> int:
    """Delete temporary files left by a killed writer under ``directory``; return how many."""
    n = 0
    for p in Path(directory).rglob(f"{TMP_PREFIX}*"):
        if p.is_file():
            p.unlink()
            n += 1
    if n:
        logger.info("removed %d stale temporary files under %s", n, directory)
    return n


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a JSON object, raising DatabaseError with the file name on any problem."""
    path = Path(path)
    if not path.is_file():
        raise DatabaseError(f"{path}: file not found (expected a JSON manifest)")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatabaseError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise DatabaseError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def file_entry(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Manifest entry of a written file: sha256 and size, plus shape/dtype for ``.npy`` files."""
    path = Path(path)
    entry: dict[str, Any] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    if path.suffix == ".npy":
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        entry["shape"] = list(arr.shape)
        entry["dtype"] = str(arr.dtype)
    return entry


def check_files(
    directory: str | os.PathLike[str],
    files: Mapping[str, Mapping[str, Any]],
    verify: bool = False,
    where: str | os.PathLike[str] | None = None,
) -> None:
    """Check that every file a manifest names exists with its recorded size (and hash if verify).

    Args:
        directory: the directory the relative names in ``files`` are under.
        files: ``{relative name: {"sha256": hex, "size": bytes, ...}}``.
        verify: also recompute and compare each sha256 (reads every byte).
        where: the manifest the entries come from (named in errors; default ``directory``).

    Raises:
        DatabaseError: naming the first file that is missing, truncated, corrupt, or named by a
            path that leaves ``directory``.
    """
    directory = Path(directory)
    where = where if where is not None else directory / MANIFEST_NAME
    for name, entry in files.items():
        p = resolve_inside(directory, name, where, f"files[{name!r}]")
        if not isinstance(entry, Mapping) or not isinstance(entry.get("sha256"), str):
            raise DatabaseError(f"{where}: files[{name!r}]: expected an object with a sha256")
        if not p.is_file():
            raise DatabaseError(f"{p}: file missing (the manifest lists it)")
        size = p.stat().st_size
        if "size" in entry and size != int(entry["size"]):
            raise DatabaseError(
                f"{p}: size {size} bytes, expected {entry['size']} (truncated or overwritten)"
            )
        if verify and sha256_file(p) != entry["sha256"]:
            raise DatabaseError(f"{p}: sha256 differs from the manifest's {entry['sha256'][:16]}…")
