"""The reference writer of the training dataset format (retro_core.dataset_format), for tests.

retro_db writes datasets in production; this writer makes small ones from arrays in memory.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from retro_core.atomic import atomic_write, atomic_write_text, fsync_dir, sha256_file
from retro_core.dataset_format import (
    DATASET_FORMAT,
    DATASET_VERSION,
    MANIFEST,
    DatasetFormatError,
    check_no_own_document,
    chunk_documents,
    manifest_checksum,
    token_dtype,
    validate_contents,
)

__all__ = ["chunk_documents", "write_dataset"]

logger = logging.getLogger(__name__)


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
    n_docs = validate_contents(
        where,
        neighbour_distances=dist,
        vocab_size=int(vocab_size),
        pad_id=int(pad_id),
        **arrays,
    )
    if database_doc_ids is not None:
        check_no_own_document(where, arrays["doc_ids"], arrays["neighbour_ids"], database_doc_ids)

    tok_dtype = token_dtype(int(vocab_size))
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
            "sha256": sha256_file(path),
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
