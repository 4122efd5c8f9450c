"""The training dataset as a torch ``Dataset`` (DESIGN.md section 2.2).

The format (a directory of ``.npy`` arrays and a self-checksummed ``manifest.json``), its
validation and its integrity checks live in :mod:`retro_core.dataset_format`; its public names are
importable from here too. :class:`RetroDataset` reads a dataset with ``np.load(mmap_mode="r")``
(checking the manifest, every file's header and every token id on open; with ``verify`` every
file's sha256 and value rule too) and serves training sequences: up to l consecutive chunks of ONE
document (sequences never cross documents and tile each document without overlap), padded at the
end.

Symbols: N chunks, D documents, m chunk size, k neighbours, r = 2m neighbour tokens,
l chunks per sequence, n = l * m tokens per sequence.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from .dataset_format import (
    DATASET_FORMAT,
    DATASET_VERSION,
    FILES,
    MANIFEST,
    DatasetFormatError,
    check_token_range,
    chunk_documents,
    document_runs,
    document_split,
    load_array,
    manifest_checksum,
    read_manifest,
    validate_contents,
    verify_dataset,
)

__all__ = [
    "DATASET_FORMAT",
    "DATASET_VERSION",
    "MANIFEST",
    "DatasetFormatError",
    "RetroDataset",
    "chunk_documents",
    "document_split",
    "manifest_checksum",
    "verify_dataset",
]

logger = logging.getLogger(__name__)


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
        self.manifest = read_manifest(self.directory)
        files = self.manifest["files"]
        arrays = {
            name: load_array(self.directory, name, files[name], verify)
            for name in FILES
            if name in files
        }
        self._tokens = arrays["tokens.npy"]
        self._lengths = arrays["lengths.npy"]
        self._doc_ids = arrays["doc_ids.npy"]
        self._neighbours = arrays["neighbours.npy"]
        self._neighbour_lengths = arrays["neighbour_lengths.npy"]
        self._neighbour_ids = arrays["neighbour_ids.npy"]
        self._neighbour_distances = arrays.get("neighbour_distances.npy")

        self._check_arrays(arrays, verify)
        k = self._neighbours.shape[1]
        if num_neighbours is None:
            num_neighbours = k
        if not 0 <= num_neighbours <= k:
            raise ValueError(
                f"num_neighbours must be in [0, k={k}] for {self.directory}, got {num_neighbours}"
            )
        self.num_neighbours_used = int(num_neighbours)
        self.seq_chunks = seq_chunks
        self.split = split

        self._index_sequences(valid_fraction, split_seed)

    def _check_arrays(self, arrays: dict[str, np.ndarray], verify: bool) -> None:
        """The arrays agree with the manifest and each other; token ids lie in the vocabulary
        (and with ``verify`` every value rule of the format holds)."""
        mpath = self.directory / MANIFEST
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
            check_token_range(
                self.directory,
                {"tokens.npy": self._tokens, "neighbours.npy": self._neighbours},
                self.vocab_size,
            )
        if verify:
            n_docs = validate_contents(
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

    def _index_sequences(self, valid_fraction: float, split_seed: int) -> None:
        """The sequence index: start chunk and chunk count of each sequence, document by document."""
        starts, ends = document_runs(self._doc_ids)
        if self.split != "all":
            is_valid = document_split(np.asarray(self._doc_ids)[starts], valid_fraction, split_seed)
            keep = is_valid if self.split == "valid" else ~is_valid
            starts, ends = starts[keep], ends[keep]
        n_seq = (ends - starts + self.seq_chunks - 1) // self.seq_chunks  # ceil(c / l) per document
        first = np.repeat(starts, n_seq)
        offset = np.arange(int(n_seq.sum()), dtype=np.int64) - np.repeat(
            np.cumsum(n_seq) - n_seq, n_seq
        )
        self._seq_start = first + offset * self.seq_chunks
        doc_end = np.repeat(ends, n_seq)
        self._seq_chunks = np.minimum(self.seq_chunks, doc_end - self._seq_start).astype(np.int64)
        self._seq_continues = self._seq_start + self._seq_chunks < doc_end
        self.num_documents_in_split = int(starts.shape[0])
        logger.debug(
            "opened %s: %d chunks, %d sequences of l=%d (split=%s)",
            self.directory,
            len(self._tokens),
            len(self),
            self.seq_chunks,
            self.split,
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
