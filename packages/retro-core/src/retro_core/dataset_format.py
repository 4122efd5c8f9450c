"""The training dataset format (DESIGN.md section 2.2): the manifest, its validation and integrity.

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

retro_db writes this format without importing retro_core; retro-core's tests hold a reference
writer (``tests/dataset_writer.py``). :class:`~retro_core.data.RetroDataset` reads it.

Integrity (issue 16): every open checks the manifest's self-checksum, each file's header (shape,
dtype) and every token id against the vocabulary; :func:`verify_dataset` (run by ``retro-train``
unless ``--no-verify``) streams every file once and compares its sha256 with the manifest.

Symbols: N chunks, D documents, m chunk size, k neighbours, r = 2m neighbour tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

__all__ = [
    "DATASET_FORMAT",
    "DATASET_VERSION",
    "FILES",
    "MANIFEST",
    "OPTIONAL_FILES",
    "DatasetFormatError",
    "check_no_own_document",
    "check_token_range",
    "chunk_documents",
    "document_runs",
    "document_split",
    "load_array",
    "manifest_checksum",
    "read_manifest",
    "token_dtype",
    "validate_contents",
    "verify_dataset",
]

logger = logging.getLogger(__name__)

DATASET_FORMAT = "retro-dataset"
DATASET_VERSION = 1
MANIFEST = "manifest.json"

# name -> (allowed dtypes, rank); shapes are checked against each other separately.
TOKEN_DTYPES = ("uint16", "int32")
FILES: dict[str, tuple[tuple[str, ...], int]] = {
    "tokens.npy": (TOKEN_DTYPES, 2),
    "lengths.npy": (("int32",), 1),
    "doc_ids.npy": (("int64",), 1),
    "neighbours.npy": (TOKEN_DTYPES, 3),
    "neighbour_lengths.npy": (("int32",), 2),
    "neighbour_ids.npy": (("int64",), 2),
    "neighbour_distances.npy": (("float32",), 2),
}
OPTIONAL_FILES = frozenset({"neighbour_distances.npy"})
_HASH_BLOCK = 1 << 20


class DatasetFormatError(ValueError):
    """A training dataset directory is missing, corrupt or inconsistent (message names the file)."""


# ----------------------------------------------------------------------------------------------
# validation shared by the writer and the verifying reader


def token_dtype(vocab_size: int) -> np.dtype:
    """The dtype token ids are stored in: uint16 when V <= 65536, else int32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def _check_int_array(name: str, a: np.ndarray, ndim: int) -> None:
    if a.ndim != ndim:
        raise DatasetFormatError(f"{name}: expected {ndim} dimensions, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise DatasetFormatError(f"{name}: expected an integer dtype, got {a.dtype}")


def document_runs(doc_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) chunk index of each run of equal doc ids, int64 [D] each."""
    n = int(doc_ids.shape[0])
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    d = np.asarray(doc_ids)
    starts = np.flatnonzero(np.concatenate(([True], d[1:] != d[:-1]))).astype(np.int64)
    ends = np.concatenate((starts[1:], [n])).astype(np.int64)
    return starts, ends


def _check_shapes(
    where: str,
    tokens: np.ndarray,
    lengths: np.ndarray,
    doc_ids: np.ndarray,
    neighbours: np.ndarray,
    neighbour_lengths: np.ndarray,
    neighbour_ids: np.ndarray,
    neighbour_distances: np.ndarray | None,
) -> None:
    """Integer arrays of the ranks and shapes that tokens [N, m] and neighbours [N, k, r] imply."""
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


def _check_neighbour_values(
    where: str,
    neighbours: np.ndarray,
    neighbour_lengths: np.ndarray,
    neighbour_ids: np.ndarray,
    r: int,
    pad_id: int,
) -> None:
    """Neighbour rows are a real prefix then padding; ids are -1 exactly where a row is empty."""
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


def validate_contents(
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
    _check_shapes(
        where,
        tokens,
        lengths,
        doc_ids,
        neighbours,
        neighbour_lengths,
        neighbour_ids,
        neighbour_distances,
    )
    if not 0 <= pad_id < vocab_size:
        raise DatasetFormatError(
            f"{where}: pad_id={pad_id} is outside the vocabulary [0, {vocab_size})"
        )
    if tokens.shape[0] == 0:
        return 0
    (n_chunks, m), r = tokens.shape, neighbours.shape[2]
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

    starts, ends = document_runs(doc_ids)
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

    _check_neighbour_values(where, neighbours, neighbour_lengths, neighbour_ids, r, pad_id)
    return n_docs


def check_no_own_document(
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


def manifest_checksum(manifest: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a dataset manifest without its ``checksum`` field.

    The canonical form is ``json.dumps(sort_keys=True, ensure_ascii=False, separators=(",", ":"))``
    in UTF-8, the same as retro-db's ``manifest.json_checksum``, so both writers agree.
    """
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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


def _check_file_entries(path: Path, files: Mapping[str, Any]) -> None:
    """Each array of the format has an entry {"sha256", "shape", "dtype"} of the right rank/dtype."""
    for name in FILES:
        if name not in files:
            if name in OPTIONAL_FILES:
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
        dtypes, rank = FILES[name]
        if len(shape) != rank:
            raise DatasetFormatError(
                f"{path}: field 'files.{name}.shape' is {shape}, expected {rank} dimensions"
            )
        if entry.get("dtype") not in dtypes:
            raise DatasetFormatError(
                f"{path}: field 'files.{name}.dtype' is {entry.get('dtype')!r}, expected one of "
                f"{list(dtypes)}"
            )


def read_manifest(directory: Path) -> dict[str, Any]:
    """Read and check a dataset's ``manifest.json`` (self-checksum, fields, file entries)."""
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
    _check_file_entries(path, _field(manifest, path, "files", dict))
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
    manifest = read_manifest(directory)
    names = [name for name in FILES if name in manifest["files"]]
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


def load_array(directory: Path, name: str, entry: Mapping[str, Any], verify: bool) -> np.ndarray:
    """Memory-map ``directory/name``; its shape and dtype (and with ``verify`` sha256) as in ``entry``."""
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


def check_token_range(
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
