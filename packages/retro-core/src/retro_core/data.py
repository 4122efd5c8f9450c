"""The training dataset format (DESIGN.md section 2.2): a writer and a torch ``Dataset`` reader.

A dataset is a directory of ``.npy`` arrays (never pickled) and a ``manifest.json`` written last::

    manifest.json           format name + version, m, k, r, tokenizer id, vocab size, pad id,
                            source database id + manifest hash, counts, sha256/shape/dtype of every file,
                            ``checksum``: sha256 of the rest (:func:`manifest_checksum`)
    tokens.npy              uint16 (vocab <= 65536) or int32 [N, m]   chunk tokens, padded with pad_id
    lengths.npy             int32 [N]          real tokens per chunk (m except a document's last chunk)
    doc_ids.npy             int64 [N]          document of each chunk; a document's chunks are consecutive
    neighbours.npy          uint16|int32 [N, k, r]  neighbour chunk + continuation, padded with pad_id
    neighbour_lengths.npy   int32 [N, k]       real tokens of each neighbour row (a prefix); 0 = none
    neighbour_ids.npy       int64 [N, k]       database chunk id of each neighbour, -1 = none
    neighbour_distances.npy float32 [N, k]     (optional) squared L2 distance of the neighbour's key

retro_db writes this format without importing retro_core; :func:`write_dataset` is the reference
writer (used by tests and small tools). :class:`RetroDataset` reads it with ``np.load(mmap_mode="r")``
and serves training sequences: up to l consecutive chunks of ONE document (sequences never cross
documents and tile each document without overlap), padded at the end.

Integrity (issue 16): every open checks the manifest's self-checksum, each file's header (shape,
dtype) and every token id against the vocabulary; :func:`verify_dataset` (run by ``retro-train``
unless ``--no-verify``) streams every file once and compares its sha256 with the manifest.

Symbols: N chunks, D documents, m chunk size, k neighbours, r = 2m neighbour tokens,
l chunks per sequence, n = l * m tokens per sequence.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .atomic import atomic_write, atomic_write_text, fsync_dir

__all__ = [
    "DATASET_FORMAT",
    "DATASET_VERSION",
    "DatasetFormatError",
    "RetroDataset",
    "chunk_documents",
    "document_split",
    "manifest_checksum",
    "verify_dataset",
    "write_dataset",
]

logger = logging.getLogger(__name__)

DATASET_FORMAT = "retro-dataset"
DATASET_VERSION = 1
MANIFEST = "manifest.json"

# name -> (allowed dtypes, rank); shapes are checked against each other separately.
_TOKEN_DTYPES = ("uint16", "int32")
_FILES: dict[str, tuple[tuple[str, ...], int]] = {
    "tokens.npy": (_TOKEN_DTYPES, 2),
    "lengths.npy": (("int32",), 1),
    "doc_ids.npy": (("int64",), 1),
    "neighbours.npy": (_TOKEN_DTYPES, 3),
    "neighbour_lengths.npy": (("int32",), 2),
    "neighbour_ids.npy": (("int64",), 2),
    "neighbour_distances.npy": (("float32",), 2),
}
_OPTIONAL_FILES = frozenset({"neighbour_distances.npy"})
_HASH_BLOCK = 1 << 20


class DatasetFormatError(ValueError):
    """A training dataset directory is missing, corrupt or inconsistent (message names the file)."""


# ----------------------------------------------------------------------------------------------
# validation shared by the writer and the verifying reader


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def _check_int_array(name: str, a: np.ndarray, ndim: int) -> None:
    if a.ndim != ndim:
        raise DatasetFormatError(f"{name}: expected {ndim} dimensions, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise DatasetFormatError(f"{name}: expected an integer dtype, got {a.dtype}")


def _document_runs(doc_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) chunk index of each run of equal doc ids, int64 [D] each."""
    n = int(doc_ids.shape[0])
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    d = np.asarray(doc_ids)
    starts = np.flatnonzero(np.concatenate(([True], d[1:] != d[:-1]))).astype(np.int64)
    ends = np.concatenate((starts[1:], [n])).astype(np.int64)
    return starts, ends


def _validate_contents(
    where: str,
    *,
    tokens: np.ndarray,
    lengths: np.ndarray,
    doc_ids: np.ndarray,
    neighbours: np.ndarray,
    neighbour_lengths: np.ndarray,
    neighbour_ids: np.ndarray,
    neighbour_distances: np.ndarray | None,
    vocab_size: int,
    pad_id: int,
) -> int:
    """Check shapes and values of the arrays of one dataset; return the number of documents D.

    ``where`` prefixes every message (a directory, or "write_dataset").
    """
    _check_int_array(f"{where}: tokens", tokens, 2)
    n_chunks, m = tokens.shape
    if m < 1:
        raise DatasetFormatError(
            f"{where}: tokens: chunk size m must be >= 1, got shape {tokens.shape}"
        )
    _check_int_array(f"{where}: lengths", lengths, 1)
    _check_int_array(f"{where}: doc_ids", doc_ids, 1)
    _check_int_array(f"{where}: neighbours", neighbours, 3)
    _check_int_array(f"{where}: neighbour_lengths", neighbour_lengths, 2)
    _check_int_array(f"{where}: neighbour_ids", neighbour_ids, 2)
    k, r = neighbours.shape[1:]
    expected = {
        "lengths": (lengths, (n_chunks,)),
        "doc_ids": (doc_ids, (n_chunks,)),
        "neighbours": (neighbours, (n_chunks, k, r)),
        "neighbour_lengths": (neighbour_lengths, (n_chunks, k)),
        "neighbour_ids": (neighbour_ids, (n_chunks, k)),
    }
    if neighbour_distances is not None:
        expected["neighbour_distances"] = (neighbour_distances, (n_chunks, k))
        if not np.issubdtype(neighbour_distances.dtype, np.floating):
            raise DatasetFormatError(
                f"{where}: neighbour_distances: expected float32, got {neighbour_distances.dtype}"
            )
    for name, (a, shape) in expected.items():
        if tuple(a.shape) != shape:
            raise DatasetFormatError(
                f"{where}: {name}: expected shape {list(shape)} (N={n_chunks}, m={m}, k={k}, r={r}) "
                f"from tokens [N, m] and neighbours [N, k, r], got {list(a.shape)}"
            )
    if k < 1 or r < 1:
        raise DatasetFormatError(
            f"{where}: neighbours: expected k >= 1 and r >= 1, got [N, {k}, {r}]"
        )
    if not 0 <= pad_id < vocab_size:
        raise DatasetFormatError(
            f"{where}: pad_id={pad_id} is outside the vocabulary [0, {vocab_size})"
        )
    if n_chunks == 0:
        return 0

    for name, a in (("tokens", tokens), ("neighbours", neighbours)):
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= vocab_size:
            raise DatasetFormatError(
                f"{where}: {name}: token ids must lie in [0, vocab_size={vocab_size}), got [{lo}, {hi}]"
            )
    lengths = np.asarray(lengths)
    if lengths.min() < 1 or lengths.max() > m:
        raise DatasetFormatError(
            f"{where}: lengths: expected values in [1, m={m}], got [{lengths.min()}, {lengths.max()}]"
        )
    if np.any(tokens[np.arange(m) >= lengths[:, None]] != pad_id):
        raise DatasetFormatError(
            f"{where}: tokens: positions past lengths must hold pad_id={pad_id}"
        )

    starts, ends = _document_runs(doc_ids)
    n_docs = int(starts.shape[0])
    if np.unique(np.asarray(doc_ids)).shape[0] != n_docs:
        raise DatasetFormatError(
            f"{where}: doc_ids: a document's chunks must be consecutive (found a document id in "
            "more than one run)"
        )
    not_last = np.ones(n_chunks, dtype=bool)
    not_last[ends - 1] = False
    if np.any(lengths[not_last] != m):
        bad = int(np.flatnonzero(not_last & (lengths != m))[0])
        raise DatasetFormatError(
            f"{where}: lengths: chunk {bad} has {lengths[bad]} < m={m} real tokens but is not the "
            "last chunk of its document"
        )

    neighbour_lengths = np.asarray(neighbour_lengths)
    if neighbour_lengths.min() < 0 or neighbour_lengths.max() > r:
        raise DatasetFormatError(
            f"{where}: neighbour_lengths: expected values in [0, r={r}], got "
            f"[{neighbour_lengths.min()}, {neighbour_lengths.max()}]"
        )
    if np.any(neighbours[np.arange(r) >= neighbour_lengths[..., None]] != pad_id):
        raise DatasetFormatError(
            f"{where}: neighbours: positions past neighbour_lengths must hold pad_id={pad_id}"
        )
    neighbour_ids = np.asarray(neighbour_ids)
    if neighbour_ids.min() < -1:
        raise DatasetFormatError(
            f"{where}: neighbour_ids: expected database chunk ids >= 0 or -1 (none), got "
            f"{neighbour_ids.min()}"
        )
    if np.any((neighbour_ids == -1) != (neighbour_lengths == 0)):
        raise DatasetFormatError(
            f"{where}: neighbour_ids/neighbour_lengths: a missing neighbour must have id -1 and "
            "length 0, a present one an id >= 0 and length >= 1"
        )
    return n_docs


def _check_no_own_document(
    where: str, doc_ids: np.ndarray, neighbour_ids: np.ndarray, database_doc_ids: np.ndarray
) -> None:
    """Raise if any neighbour comes from its chunk's own document (paper: training never does)."""
    database_doc_ids = np.asarray(database_doc_ids)
    present = neighbour_ids >= 0
    if not present.any():
        return
    if int(neighbour_ids.max()) >= database_doc_ids.shape[0]:
        raise DatasetFormatError(
            f"{where}: neighbour_ids: id {int(neighbour_ids.max())} is outside the database of "
            f"{database_doc_ids.shape[0]} chunks (database_doc_ids)"
        )
    nb_docs = database_doc_ids[np.where(present, neighbour_ids, 0)]
    clash = present & (nb_docs == np.asarray(doc_ids)[:, None])
    if clash.any():
        i, j = (int(x) for x in np.argwhere(clash)[0])
        raise DatasetFormatError(
            f"{where}: neighbour_ids: chunk {i} (document {int(doc_ids[i])}) has neighbour {j} = "
            f"database chunk {int(neighbour_ids[i, j])} from its own document; training must "
            "never retrieve from the sequence's own document"
        )


# ----------------------------------------------------------------------------------------------
# writer


def chunk_documents(
    documents: list[list[int]] | list[np.ndarray], chunk_size: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut token documents into chunks of m tokens (the last chunk of each padded).

    Args:
        documents: D token sequences (each at least one token); document i gets doc id i.
        chunk_size: m.
        pad_id: fills a document's partial last chunk.

    Returns:
        tokens int64 [N, m], lengths int32 [N], doc_ids int64 [N], as :func:`write_dataset` takes.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    rows, lengths, doc_ids = [], [], []
    for d, doc in enumerate(documents):
        doc = np.asarray(doc, dtype=np.int64)
        if doc.ndim != 1 or doc.shape[0] == 0:
            raise ValueError(
                f"document {d}: expected a non-empty 1-D token sequence, got {doc.shape}"
            )
        c = -(-doc.shape[0] // chunk_size)
        padded = np.full(c * chunk_size, pad_id, dtype=np.int64)
        padded[: doc.shape[0]] = doc
        rows.append(padded.reshape(c, chunk_size))
        lengths.append(np.minimum(chunk_size, doc.shape[0] - chunk_size * np.arange(c)))
        doc_ids.append(np.full(c, d, dtype=np.int64))
    if not rows:
        return (
            np.zeros((0, chunk_size), np.int64),
            np.zeros(0, np.int32),
            np.zeros(0, np.int64),
        )
    return (
        np.concatenate(rows),
        np.concatenate(lengths).astype(np.int32),
        np.concatenate(doc_ids),
    )


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def manifest_checksum(manifest: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a dataset manifest without its ``checksum`` field.

    The canonical form is ``json.dumps(sort_keys=True, ensure_ascii=False, separators=(",", ":"))``
    in UTF-8, the same as retro-db's ``manifest.json_checksum``, so both writers agree.
    """
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_dataset(
    directory: str | os.PathLike[str],
    *,
    tokens: np.ndarray,
    lengths: np.ndarray,
    doc_ids: np.ndarray,
    neighbours: np.ndarray,
    neighbour_lengths: np.ndarray,
    neighbour_ids: np.ndarray,
    neighbour_distances: np.ndarray | None = None,
    tokenizer_id: str,
    vocab_size: int,
    pad_id: int,
    source_db: Mapping[str, str] | None = None,
    database_doc_ids: np.ndarray | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a training dataset directory (DESIGN.md 2.2), atomically, manifest last.

    Each array goes to a temporary name in ``directory``, is fsynced and renamed into place; the
    manifest (with the sha256, shape and dtype of every file) is written the same way after all
    arrays, so a reader sees either no dataset or a complete one.

    Args:
        directory: output directory (created if missing).
        tokens: int [N, m] chunk tokens, padded with ``pad_id`` past ``lengths``.
        lengths: int [N] real tokens per chunk, in [1, m]; m except for a document's last chunk.
        doc_ids: int [N] document of each chunk; a document's chunks are consecutive and in order.
        neighbours: int [N, k, r] neighbour chunk + continuation (r = 2m), padded with ``pad_id``.
        neighbour_lengths: int [N, k] real tokens of each neighbour row (a prefix); 0 = none.
        neighbour_ids: int [N, k] database chunk id of each neighbour, -1 = none.
        neighbour_distances: float [N, k] squared L2 distances, or None (file omitted).
        tokenizer_id: identity of the LM tokenizer (``LMTokenizer.id``).
        vocab_size: V; token ids must lie in [0, V). Tokens are stored as uint16 when V <= 65536,
            else int32.
        pad_id: the padding token id.
        source_db: ``{"id": str, "manifest_sha256": str}`` of the database the neighbours came from,
            or None.
        database_doc_ids: int [N_db] document id of every database chunk, in the same id space as
            ``doc_ids`` (when the dataset IS the database, pass ``doc_ids``). When given, the writer
            checks that no neighbour comes from its chunk's own document; when None that check is
            skipped (document ids of another database are not comparable).
        overwrite: replace an existing dataset in ``directory`` (its manifest is removed first, so
            no reader ever sees a mix of old and new files).

    Returns:
        The dataset directory.

    Raises:
        DatasetFormatError: an array has the wrong shape/dtype/values (message names the array).
        FileExistsError: ``directory`` already holds a dataset and ``overwrite`` is False.
    """
    where = "write_dataset"
    if not isinstance(tokenizer_id, str) or not tokenizer_id:
        raise DatasetFormatError(
            f"{where}: tokenizer_id must be a non-empty string, got {tokenizer_id!r}"
        )
    if not isinstance(vocab_size, int | np.integer) or vocab_size < 1:
        raise DatasetFormatError(f"{where}: vocab_size must be a positive int, got {vocab_size!r}")
    if source_db is not None and not (
        isinstance(source_db.get("id"), str) and isinstance(source_db.get("manifest_sha256"), str)
    ):
        raise DatasetFormatError(
            f"{where}: source_db must be None or {{'id': str, 'manifest_sha256': str}}, got {source_db!r}"
        )
    arrays = {
        "tokens": np.asarray(tokens),
        "lengths": np.asarray(lengths),
        "doc_ids": np.asarray(doc_ids),
        "neighbours": np.asarray(neighbours),
        "neighbour_lengths": np.asarray(neighbour_lengths),
        "neighbour_ids": np.asarray(neighbour_ids),
    }
    dist = None if neighbour_distances is None else np.asarray(neighbour_distances)
    n_docs = _validate_contents(
        where,
        neighbour_distances=dist,
        vocab_size=int(vocab_size),
        pad_id=int(pad_id),
        **arrays,
    )
    if database_doc_ids is not None:
        _check_no_own_document(where, arrays["doc_ids"], arrays["neighbour_ids"], database_doc_ids)

    tok_dtype = _token_dtype(int(vocab_size))
    cast = {
        "tokens.npy": arrays["tokens"].astype(tok_dtype, copy=False),
        "lengths.npy": arrays["lengths"].astype(np.int32, copy=False),
        "doc_ids.npy": arrays["doc_ids"].astype(np.int64, copy=False),
        "neighbours.npy": arrays["neighbours"].astype(tok_dtype, copy=False),
        "neighbour_lengths.npy": arrays["neighbour_lengths"].astype(np.int32, copy=False),
        "neighbour_ids.npy": arrays["neighbour_ids"].astype(np.int64, copy=False),
    }
    if dist is not None:
        cast["neighbour_distances.npy"] = dist.astype(np.float32, copy=False)

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        if not overwrite:
            raise FileExistsError(
                f"{manifest_path} exists: pass overwrite=True to replace the dataset"
            )
        manifest_path.unlink()
        fsync_dir(out)
        stale = out / "neighbour_distances.npy"
        if dist is None and stale.exists():
            stale.unlink()

    files: dict[str, dict[str, Any]] = {}
    for name, arr in cast.items():
        path = atomic_write(out / name, lambda f, a=arr: np.save(f, np.ascontiguousarray(a)))
        files[name] = {
            "sha256": _sha256_file(path),
            "shape": list(arr.shape),
            "dtype": arr.dtype.name,
        }
    fsync_dir(out)

    n_chunks, m = cast["tokens.npy"].shape
    k, r = cast["neighbours.npy"].shape[1:]
    manifest = {
        "format": DATASET_FORMAT,
        "version": DATASET_VERSION,
        "chunk_size": int(m),
        "num_neighbours": int(k),
        "neighbour_len": int(r),
        "tokenizer_id": tokenizer_id,
        "vocab_size": int(vocab_size),
        "pad_id": int(pad_id),
        "source_db": None if source_db is None else dict(source_db),
        "counts": {"chunks": int(n_chunks), "documents": n_docs},
        "files": files,
    }
    manifest["checksum"] = manifest_checksum(manifest)
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    atomic_write_text(out / MANIFEST, text)
    fsync_dir(out)
    logger.info(
        "wrote training dataset %s: %d chunks, %d documents, k=%d", out, n_chunks, n_docs, k
    )
    return out


# ----------------------------------------------------------------------------------------------
# reader


def _field(
    manifest: Mapping[str, Any], path: Path, name: str, kind: type | tuple[type, ...]
) -> Any:
    if name not in manifest:
        raise DatasetFormatError(f"{path}: missing field {name!r}")
    value = manifest[name]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise DatasetFormatError(f"{path}: field {name!r} has the wrong type: {value!r}")
    return value


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not directory.is_dir():
        raise DatasetFormatError(f"{directory}: not a directory (expected a training dataset)")
    if not path.is_file():
        raise DatasetFormatError(
            f"{path}: missing (not a training dataset, or an unfinished write)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise DatasetFormatError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    if "checksum" not in manifest:
        logger.warning(
            "%s: no 'checksum' field (a dataset written before manifests were self-checked): "
            "its fields are not protected against edits",
            path,
        )
    elif manifest["checksum"] != manifest_checksum(manifest):
        raise DatasetFormatError(
            f"{path}: contents differ from its field 'checksum' "
            f"{str(manifest['checksum'])[:16]}... (edited or corrupted)"
        )
    fmt = _field(manifest, path, "format", str)
    if fmt != DATASET_FORMAT:
        raise DatasetFormatError(f"{path}: field 'format' is {fmt!r}, expected {DATASET_FORMAT!r}")
    version = _field(manifest, path, "version", int)
    if version != DATASET_VERSION:
        raise DatasetFormatError(
            f"{path}: field 'version' is {version}, this reader understands version {DATASET_VERSION}"
        )
    for name in ("chunk_size", "num_neighbours", "neighbour_len", "vocab_size"):
        if _field(manifest, path, name, int) < 1:
            raise DatasetFormatError(f"{path}: field {name!r} must be >= 1, got {manifest[name]}")
    _field(manifest, path, "tokenizer_id", str)
    pad = _field(manifest, path, "pad_id", int)
    if not 0 <= pad < manifest["vocab_size"]:
        raise DatasetFormatError(
            f"{path}: field 'pad_id' is {pad}, outside the vocabulary [0, {manifest['vocab_size']})"
        )
    if "source_db" not in manifest:
        raise DatasetFormatError(f"{path}: missing field 'source_db' (null when unknown)")
    if manifest["source_db"] is not None and not isinstance(manifest["source_db"], dict):
        raise DatasetFormatError(f"{path}: field 'source_db' must be an object or null")
    counts = _field(manifest, path, "counts", dict)
    for name in ("chunks", "documents"):
        c = counts.get(name)
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise DatasetFormatError(
                f"{path}: field 'counts.{name}' must be an int >= 0, got {c!r}"
            )
    files = _field(manifest, path, "files", dict)
    for name in _FILES:
        if name not in files:
            if name in _OPTIONAL_FILES:
                continue
            raise DatasetFormatError(f"{path}: field 'files' has no entry for {name!r}")
        entry = files[name]
        if not isinstance(entry, dict):
            raise DatasetFormatError(f"{path}: field 'files.{name}' must be an object")
        if not isinstance(entry.get("sha256"), str):
            raise DatasetFormatError(f"{path}: field 'files.{name}.sha256' must be a hex string")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
        ):
            raise DatasetFormatError(f"{path}: field 'files.{name}.shape' must be a list of ints")
        dtypes, rank = _FILES[name]
        if len(shape) != rank:
            raise DatasetFormatError(
                f"{path}: field 'files.{name}.shape' is {shape}, expected {rank} dimensions"
            )
        if entry.get("dtype") not in dtypes:
            raise DatasetFormatError(
                f"{path}: field 'files.{name}.dtype' is {entry.get('dtype')!r}, expected one of "
                f"{list(dtypes)}"
            )
    return manifest


def _check_sha256(path: Path, entry: Mapping[str, Any], bar: Any = None) -> None:
    """Stream ``path`` once; raise DatasetFormatError unless its sha256 is the manifest's."""
    if not path.is_file():
        raise DatasetFormatError(f"{path}: missing (listed in {MANIFEST})")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
            if bar is not None:
                bar.update(len(block))
    digest = h.hexdigest()
    if digest != entry["sha256"]:
        raise DatasetFormatError(
            f"{path}: sha256 {digest[:16]}... does not match {MANIFEST} ({entry['sha256'][:16]}...): "
            "the file changed or is corrupted"
        )


def verify_dataset(directory: str | os.PathLike[str], *, progress: bool = False) -> dict[str, Any]:
    """Check the sha256 of every file of a dataset against its manifest (each file read once).

    The cheap checks of every open (manifest self-checksum, headers, token ids in the vocabulary)
    cannot see a changed in-vocabulary token or neighbour; this can. ``retro-train`` runs it before
    training (``--no-verify`` skips it).

    Args:
        directory: the dataset directory.
        progress: show a tqdm bar over the bytes read.

    Returns:
        The dataset's manifest.

    Raises:
        DatasetFormatError: a bad manifest, a missing file or a sha256 that differs (the message
            names the file).
    """
    directory = Path(directory)
    manifest = _read_manifest(directory)
    names = [name for name in _FILES if name in manifest["files"]]
    total = sum((directory / n).stat().st_size for n in names if (directory / n).is_file())
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc=f"verify {directory.name}",
        disable=not progress,
    ) as bar:
        for name in names:
            _check_sha256(directory / name, manifest["files"][name], bar)
    logger.info("verified the sha256 of %d files of %s (%d bytes)", len(names), directory, total)
    return manifest


def _load_array(directory: Path, name: str, entry: Mapping[str, Any], verify: bool) -> np.ndarray:
    path = directory / name
    if not path.is_file():
        raise DatasetFormatError(f"{path}: missing (listed in {MANIFEST})")
    if verify:
        _check_sha256(path, entry)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # numpy's header parser raises ValueError, SyntaxError, TokenError...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatasetFormatError(
            f"{path}: unreadable or truncated .npy file, expected the header and data "
            f"{MANIFEST} describes ({first})"
        ) from None
    if list(arr.shape) != list(entry["shape"]):
        raise DatasetFormatError(
            f"{path}: shape {list(arr.shape)} does not match {MANIFEST} ({entry['shape']})"
        )
    if arr.dtype.name != entry["dtype"]:
        raise DatasetFormatError(
            f"{path}: dtype {arr.dtype} does not match {MANIFEST} ({entry['dtype']})"
        )
    return arr


def _check_token_range(
    directory: Path, arrays: Mapping[str, np.ndarray], vocab_size: int, block: int = 1 << 16
) -> None:
    """Raise DatasetFormatError naming the file and row of the first id outside [0, vocab_size).

    Reads each array once, ``block`` rows at a time (memory stays flat): a token id the embedding
    table does not have would otherwise crash training with an IndexError.
    """
    for name, arr in arrays.items():
        for a in range(0, len(arr), block):
            part = np.asarray(arr[a : a + block]).reshape(min(block, len(arr) - a), -1)
            if not part.size:
                continue
            bad = np.flatnonzero((part.max(1) >= vocab_size) | (part.min(1) < 0))
            if len(bad):
                row = part[bad[0]]
                value = int(row.max() if row.max() >= vocab_size else row.min())
                raise DatasetFormatError(
                    f"{directory / name}: row {a + int(bad[0])} holds token id {value}, outside "
                    f"the vocabulary [0, vocab_size={vocab_size}) of {MANIFEST}"
                )


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 [*]: a stable, well-mixed hash of each value."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def document_split(doc_ids: np.ndarray, valid_fraction: float, seed: int = 0) -> np.ndarray:
    """Deterministically assign documents to validation by hashing their ids.

    The decision for a document depends only on (its id, ``seed``), not on the order or the other
    documents, so it is stable as a dataset grows.

    Args:
        doc_ids: int [D] document ids.
        valid_fraction: expected fraction of documents in the validation split, in [0, 1].
        seed: changes which documents are chosen.

    Returns:
        bool [D], True where the document belongs to the validation split.
    """
    if not 0.0 <= valid_fraction <= 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1], got {valid_fraction}")
    ids = np.asarray(doc_ids, dtype=np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        salted = ids ^ _splitmix64(np.array([seed], dtype=np.int64).view(np.uint64))
    u = (_splitmix64(salted) >> np.uint64(11)).astype(np.float64) / float(1 << 53)  # [0, 1)
    return u < valid_fraction


class RetroDataset(Dataset):
    """Training sequences read from a dataset directory (DESIGN.md 2.2), memory-mapped.

    A sequence is up to l = ``seq_chunks`` consecutive chunks of ONE document; sequences tile each
    document without overlap (a document of c chunks gives ceil(c / l) sequences) and never cross
    documents. Each item is a dict of torch tensors:

    - ``tokens`` long [n] (n = l * m): the sequence, padded with ``pad_id`` at the end.
    - ``targets`` long [n]: the next token of the document at each position (for the last position
      the first token of the following chunk when the document continues), ``pad_id`` where none.
    - ``loss_mask`` bool [n]: True on real tokens that have a real next token.
    - ``neighbours`` long [l, k, r]: the neighbours of each chunk (``pad_id`` for padding chunks).
    - ``neighbour_lengths`` long [l, k]: real tokens per neighbour row (0 for padding chunks).

    Args:
        directory: the dataset directory.
        seq_chunks: l, chunks per sequence.
        verify: check the sha256 of every file and every value rule (reads all data once).
        num_neighbours: use only the first k' <= k neighbours of each chunk (None = all k).
        split: ``"all"``, or ``"train"`` / ``"valid"``: only documents that
            :func:`document_split` puts in that split.
        valid_fraction: fraction of documents in the validation split (used with ``split``).
        split_seed: seed of :func:`document_split`.

    Raises:
        DatasetFormatError: a missing/corrupt manifest or file, or arrays inconsistent with the
            manifest or each other (the message names the file and field).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        seq_chunks: int,
        verify: bool = False,
        *,
        num_neighbours: int | None = None,
        split: Literal["all", "train", "valid"] = "all",
        valid_fraction: float = 0.0,
        split_seed: int = 0,
    ) -> None:
        self.directory = Path(directory)
        if isinstance(seq_chunks, bool) or not isinstance(seq_chunks, int) or seq_chunks < 1:
            raise ValueError(f"seq_chunks (l) must be a positive int, got {seq_chunks!r}")
        if split not in ("all", "train", "valid"):
            raise ValueError(f"split must be 'all', 'train' or 'valid', got {split!r}")
        self.manifest = _read_manifest(self.directory)
        mpath = self.directory / MANIFEST
        files = self.manifest["files"]
        arrays = {
            name: _load_array(self.directory, name, files[name], verify)
            for name in _FILES
            if name in files
        }
        self._tokens = arrays["tokens.npy"]
        self._lengths = arrays["lengths.npy"]
        self._doc_ids = arrays["doc_ids.npy"]
        self._neighbours = arrays["neighbours.npy"]
        self._neighbour_lengths = arrays["neighbour_lengths.npy"]
        self._neighbour_ids = arrays["neighbour_ids.npy"]
        self._neighbour_distances = arrays.get("neighbour_distances.npy")

        n_chunks, m = self._tokens.shape
        k, r = self._neighbours.shape[1:]
        for field, actual in (
            ("chunk_size", m),
            ("num_neighbours", k),
            ("neighbour_len", r),
            ("counts.chunks", n_chunks),
        ):
            expected = (
                self.manifest["counts"]["chunks"]
                if field == "counts.chunks"
                else self.manifest[field]
            )
            if actual != expected:
                raise DatasetFormatError(
                    f"{mpath}: field {field!r} is {expected} but the arrays have {actual}"
                )
        shapes = {
            "lengths.npy": (n_chunks,),
            "doc_ids.npy": (n_chunks,),
            "neighbours.npy": (n_chunks, k, r),
            "neighbour_lengths.npy": (n_chunks, k),
            "neighbour_ids.npy": (n_chunks, k),
            "neighbour_distances.npy": (n_chunks, k),
        }
        for name, arr in arrays.items():
            if name in shapes and tuple(arr.shape) != shapes[name]:
                raise DatasetFormatError(
                    f"{self.directory / name}: shape {list(arr.shape)} is inconsistent with "
                    f"tokens.npy [N={n_chunks}, m={m}] / neighbours.npy [N, k={k}, r={r}]: "
                    f"expected {list(shapes[name])}"
                )
        if not verify:  # verify checks these and every other value rule
            _check_token_range(
                self.directory,
                {"tokens.npy": self._tokens, "neighbours.npy": self._neighbours},
                self.vocab_size,
            )
        if verify:
            n_docs = _validate_contents(
                str(self.directory),
                tokens=self._tokens,
                lengths=self._lengths,
                doc_ids=self._doc_ids,
                neighbours=self._neighbours,
                neighbour_lengths=self._neighbour_lengths,
                neighbour_ids=self._neighbour_ids,
                neighbour_distances=self._neighbour_distances,
                vocab_size=self.vocab_size,
                pad_id=self.pad_id,
            )
            if n_docs != self.manifest["counts"]["documents"]:
                raise DatasetFormatError(
                    f"{mpath}: field 'counts.documents' is {self.manifest['counts']['documents']} "
                    f"but doc_ids.npy has {n_docs} documents"
                )

        if num_neighbours is None:
            num_neighbours = k
        if not 0 <= num_neighbours <= k:
            raise ValueError(
                f"num_neighbours must be in [0, k={k}] for {self.directory}, got {num_neighbours}"
            )
        self.num_neighbours_used = int(num_neighbours)
        self.seq_chunks = seq_chunks
        self.split = split

        # The sequence index: start chunk and chunk count of each sequence, document by document.
        starts, ends = _document_runs(self._doc_ids)
        if split != "all":
            is_valid = document_split(np.asarray(self._doc_ids)[starts], valid_fraction, split_seed)
            keep = is_valid if split == "valid" else ~is_valid
            starts, ends = starts[keep], ends[keep]
        n_seq = (ends - starts + seq_chunks - 1) // seq_chunks  # ceil(c / l) per document
        first = np.repeat(starts, n_seq)
        offset = np.arange(int(n_seq.sum()), dtype=np.int64) - np.repeat(
            np.cumsum(n_seq) - n_seq, n_seq
        )
        self._seq_start = first + offset * seq_chunks
        doc_end = np.repeat(ends, n_seq)
        self._seq_chunks = np.minimum(seq_chunks, doc_end - self._seq_start).astype(np.int64)
        self._seq_continues = self._seq_start + self._seq_chunks < doc_end
        self.num_documents_in_split = int(starts.shape[0])
        logger.debug(
            "opened %s: %d chunks, %d sequences of l=%d (split=%s)",
            self.directory,
            n_chunks,
            len(self),
            seq_chunks,
            split,
        )

    # metadata -----------------------------------------------------------------------------------
    @property
    def chunk_size(self) -> int:
        """m, tokens per chunk."""
        return int(self.manifest["chunk_size"])

    @property
    def k(self) -> int:
        """k, neighbours per chunk stored in the dataset."""
        return int(self.manifest["num_neighbours"])

    @property
    def r(self) -> int:
        """r, tokens per neighbour row (chunk + continuation, 2m)."""
        return int(self.manifest["neighbour_len"])

    @property
    def tokenizer_id(self) -> str:
        """Identity of the LM tokenizer the chunks were tokenised with."""
        return str(self.manifest["tokenizer_id"])

    @property
    def vocab_size(self) -> int:
        """V; every token id lies in [0, V)."""
        return int(self.manifest["vocab_size"])

    @property
    def pad_id(self) -> int:
        """The padding token id."""
        return int(self.manifest["pad_id"])

    @property
    def source_db(self) -> dict[str, Any] | None:
        """``{"id", "manifest_sha256"}`` of the database the neighbours came from, or None."""
        return self.manifest["source_db"]

    @property
    def num_chunks(self) -> int:
        """N, chunks in the whole dataset (all splits)."""
        return int(self._tokens.shape[0])

    @property
    def num_documents(self) -> int:
        """D, documents in the whole dataset (all splits)."""
        return int(self.manifest["counts"]["documents"])

    @property
    def seq_len(self) -> int:
        """n = l * m, tokens per sequence."""
        return self.seq_chunks * self.chunk_size

    def sequence_chunks(self, index: int) -> tuple[int, int]:
        """(first chunk id, number of real chunks) of sequence ``index``."""
        return int(self._seq_start[index]), int(self._seq_chunks[index])

    # torch Dataset ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._seq_start.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sequence {index} out of range for {len(self)} sequences")
        index = int(index) % len(self)
        start, c = int(self._seq_start[index]), int(self._seq_chunks[index])
        ell, m, k, r, pad = (
            self.seq_chunks,
            self.chunk_size,
            self.num_neighbours_used,
            self.r,
            self.pad_id,
        )
        n = ell * m

        tokens = np.full((ell, m), pad, dtype=np.int64)  # [l, m]
        tokens[:c] = self._tokens[start : start + c]
        lengths = np.zeros(ell, dtype=np.int64)
        lengths[:c] = self._lengths[start : start + c]
        real = (np.arange(m) < lengths[:, None]).reshape(n)  # [n]
        flat = tokens.reshape(n)

        targets = np.full(n, pad, dtype=np.int64)
        targets[:-1] = flat[1:]
        next_real = np.zeros(n, dtype=bool)
        next_real[:-1] = real[1:]
        if self._seq_continues[index] and real[-1]:
            # the document goes on in the next sequence: the last position predicts its first token
            targets[-1] = int(self._tokens[start + c, 0])
            next_real[-1] = True
        loss_mask = real & next_real
        targets[~loss_mask] = pad

        neighbours = np.full((ell, k, r), pad, dtype=np.int64)  # [l, k, r]
        neighbours[:c] = self._neighbours[start : start + c, :k]
        neighbour_lengths = np.zeros((ell, k), dtype=np.int64)  # [l, k]
        neighbour_lengths[:c] = self._neighbour_lengths[start : start + c, :k]
        return {
            "tokens": torch.from_numpy(flat),
            "targets": torch.from_numpy(targets),
            "loss_mask": torch.from_numpy(loss_mask),
            "neighbours": torch.from_numpy(neighbours),
            "neighbour_lengths": torch.from_numpy(neighbour_lengths),
        }

    def __repr__(self) -> str:
        return (
            f"RetroDataset({str(self.directory)!r}, seq_chunks={self.seq_chunks}, split={self.split!r}: "
            f"{len(self)} sequences, m={self.chunk_size}, k={self.num_neighbours_used}/{self.k}, "
            f"r={self.r})"
        )
