"""Tiny stand-ins for tests and examples: a byte tokenizer and an in-memory brute-force retriever.

Nothing here loads a file or a model: both are deterministic and need only numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from retro_core.retrieval import Neighbours

__all__ = ["ByteTokenizer", "InMemoryRetriever"]


class ByteTokenizer:
    """UTF-8 bytes as tokens: id = byte + 2; 0 is padding, 1 is end-of-text (vocab 258)."""

    pad_id = 0
    eos_id = 1
    vocab_size = 258
    id = "bytes-v1"
    sha256 = "0" * 64

    def encode(self, text: str) -> list[int]:
        return [b + 2 for b in text.encode("utf-8")]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) - 2 for i in ids if int(i) >= 2).decode("utf-8", errors="replace")

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]


class InMemoryRetriever:
    """Brute-force k-nearest chunks of a small token corpus (satisfies ``retro_core.Retriever``).

    Documents are cut into chunks of m tokens; a neighbour is the chunk followed by the next m
    tokens of its document (r = 2m, padded with ``pad_id``). Keys are token histograms folded onto
    ``dim`` buckets; the distance is squared L2, ties broken by chunk id.

    Args:
        documents: token ids of each database document.
        chunk_size: m.
        tokenizer_id: the identity reported to ``check_retriever``.
        pad_id: padding id.
        dim: key dimension.
    """

    def __init__(
        self,
        documents: Sequence[Sequence[int]],
        *,
        chunk_size: int,
        tokenizer_id: str = ByteTokenizer.id,
        pad_id: int = 0,
        dim: int = 64,
    ) -> None:
        self._m = int(chunk_size)
        self._tokenizer_id = tokenizer_id
        self.pad_id = int(pad_id)
        self.dim = dim
        rows, lens, docs = [], [], []
        m = self._m
        for d, toks in enumerate(documents):
            toks = list(map(int, toks))
            for start in range(0, len(toks), m):
                row = toks[start : start + 2 * m]
                rows.append(row + [pad_id] * (2 * m - len(row)))
                lens.append(len(row))
                docs.append(d)
        self.neighbours = np.asarray(rows, dtype=np.int64).reshape(-1, 2 * m)  # [N, r]
        self.lengths = np.asarray(lens, dtype=np.int64)
        self.doc_ids = np.asarray(docs, dtype=np.int64)
        chunk_len = np.minimum(self.lengths, m)
        self.keys = (
            np.stack([self._key(r[:c]) for r, c in zip(self.neighbours, chunk_len, strict=True)])
            if rows
            else np.zeros((0, dim))
        )
        self.calls = 0

    @property
    def chunk_size(self) -> int:
        return self._m

    @property
    def tokenizer_id(self) -> str:
        return self._tokenizer_id

    def _key(self, toks: np.ndarray) -> np.ndarray:
        key = np.zeros(self.dim, dtype=np.float64)
        np.add.at(key, np.asarray(toks, dtype=np.int64) % self.dim, 1.0)
        return key

    def retrieve(
        self, chunks: np.ndarray, k: int, exclude_doc_ids: np.ndarray | None = None
    ) -> Neighbours:
        """k nearest chunks of each query chunk [q, m] -> Neighbours [q, k, r]."""
        self.calls += 1
        chunks = np.asarray(chunks, dtype=np.int64)
        q = len(chunks)
        r = 2 * self._m
        tokens = np.full((q, k, r), self.pad_id, dtype=np.int64)
        lengths = np.zeros((q, k), dtype=np.int64)
        ids = np.full((q, k), -1, dtype=np.int64)
        dist = np.full((q, k), np.inf, dtype=np.float32)
        for i, ch in enumerate(chunks):
            real = ch[ch != self.pad_id]
            d2 = ((self.keys - self._key(real)) ** 2).sum(axis=1)
            if exclude_doc_ids is not None and exclude_doc_ids[i] >= 0:
                d2 = np.where(self.doc_ids == exclude_doc_ids[i], np.inf, d2)
            order = np.lexsort((np.arange(len(d2)), d2))[:k]
            order = order[np.isfinite(d2[order])]
            tokens[i, : len(order)] = self.neighbours[order]
            lengths[i, : len(order)] = self.lengths[order]
            ids[i, : len(order)] = order
            dist[i, : len(order)] = d2[order]
        return Neighbours(tokens, lengths, ids, dist, self.pad_id)
