"""A real index over part of a database (the database-size sweep, RETRO's figure 1).

:class:`PrefixRetriever` retrieves from ``D'`` whole documents of an opened
:class:`~retro_db.database.Database` only: the first ``D'`` (a prefix, chunk ids ``0 .. n - 1``;
the chunk store numbers whole documents in order) or, with :func:`subset_chunks` and a seed, the
first ``D'`` of a seeded random order of the documents (so that the sweep measures the
database's size, not which documents happen to come first). Not a filter after searching the
whole database, but an index of those chunks alone, built the way ``retro-db build`` indexes a
database of that size:

* dense keys: the stored keys of the first n chunks in the faiss index
  :func:`~retro_db.index.default_factory` picks for n keys (Flat below its threshold; trained on a
  seeded sample where the factory needs training), the database's own embedder for queries;
* BM25 keys: a ``bm25s`` index of those chunks' texts (idf and average length of the prefix,
  as a database of those documents would have).

Both kinds are nested by construction (a larger fraction takes more of the same order), so the
sub-database of a smaller fraction is contained in that of a larger one. Chunk ids are those of
the database, so neighbours, continuations and the same-document exclusion read its chunk store.
"""

from __future__ import annotations

import logging
import math
from fractions import Fraction
from typing import Any

import numpy as np

from .bm25 import BM25Index, chunk_texts
from .index import apply_search_params, default_factory, new_index, train_index, training_size
from .retrieved import RetrievedNeighbours, search_excluding

logger = logging.getLogger(__name__)

__all__ = ["PrefixRetriever", "parse_fraction", "prefix_chunks", "subset_chunks"]

#: chunks read (keys added, texts detokenised) at a time while a prefix index is built
BLOCK = 16384


def parse_fraction(text: str | float) -> Fraction:
    """A database fraction in (0, 1]: ``"1/16"``, ``"0.25"``, ``1``.

    Raises:
        ValueError: not a number or a ratio, or outside (0, 1].
    """
    try:
        value = Fraction(str(text).strip())
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"expected a fraction such as 1/16 or 0.25, got {text!r}") from None
    if not 0 < value <= 1:
        raise ValueError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def prefix_chunks(doc_ids: np.ndarray, num_documents: int, fraction: Fraction | float) -> int:
    """Chunks of the first ``max(1, ceil(fraction x D))`` documents: the prefix ``0 .. n - 1``
    of chunk ids (``doc_ids``: the document of every chunk, non-decreasing)."""
    docs = max(1, math.ceil(Fraction(fraction) * int(num_documents)))
    return int(np.searchsorted(np.asarray(doc_ids), docs, side="left"))


def subset_chunks(
    doc_ids: np.ndarray, num_documents: int, fraction: Fraction | float, *, seed: int | None
) -> np.ndarray:
    """Chunk ids int64 [n'] (sorted) of ``max(1, ceil(fraction x D))`` whole documents: the first
    ones (``seed`` None: the prefix of :func:`prefix_chunks`) or the first ones of a seeded random
    order of the D documents (nested: the same seed gives a smaller fraction a subset of a larger
    one's documents). ``doc_ids``: the document of every chunk [N], non-decreasing."""
    doc_ids = np.asarray(doc_ids)
    if seed is None:
        return np.arange(prefix_chunks(doc_ids, num_documents, fraction), dtype=np.int64)
    take = max(1, math.ceil(Fraction(fraction) * int(num_documents)))
    chosen = np.random.default_rng(seed).permutation(int(num_documents))[:take]
    return np.flatnonzero(np.isin(doc_ids, chosen)).astype(np.int64)


class PrefixRetriever:
    """Retrieval from some whole documents of ``db`` through an index of their chunks alone
    (see the module docstring); the same ``retrieve`` as a Database.

    Args:
        db: an opened ``retro_db.Database``.
        num_chunks: n, a document boundary (:func:`prefix_chunks`, 1 <= n <= N: the chunks
            0 .. n - 1), or the chunk ids int64 [n] of whole documents (:func:`subset_chunks`).
        train_seed: seed of the training sample of a factory that needs training.
    """

    def __init__(self, db: Any, num_chunks: int | np.ndarray, *, train_seed: int = 0) -> None:
        if isinstance(num_chunks, np.ndarray):
            ids = np.unique(num_chunks.astype(np.int64))
            if not len(ids) or ids[0] < 0 or ids[-1] >= db.num_chunks:
                raise ValueError(
                    f"chunk ids: expected a non-empty subset of 0..{db.num_chunks - 1}"
                )
            docs = np.unique(np.asarray(db.doc_ids)[ids])
            if int(np.isin(np.asarray(db.doc_ids), docs).sum()) != len(ids):
                raise ValueError(f"chunk ids: not whole documents of {db.id}")
        else:
            n = int(num_chunks)
            if not 1 <= n <= db.num_chunks:
                raise ValueError(f"num_chunks: expected 1..{db.num_chunks}, got {n}")
            if n < db.num_chunks and db.doc_ids[n] == db.doc_ids[n - 1]:
                raise ValueError(f"num_chunks {n}: not a document boundary of {db.id}")
            ids = np.arange(n, dtype=np.int64)
        self.db = db
        self.chunk_ids = ids  # int64 [n]: index position -> database chunk id
        self.is_prefix = bool(ids[-1] == len(ids) - 1)
        n = self.num_chunks = len(ids)
        self.factory = "bm25s" if db.keys_kind == "bm25" else default_factory(n, db.dim)[0]
        if db.keys_kind == "bm25":
            self._index: Any = BM25Index.build(self._text_blocks())
        else:
            self._index = self._dense_index(train_seed)
        logger.info("sub-database index of %s: %d of %d chunks (%s)", db.id, n, db.num_chunks,
                    self.factory)  # fmt: skip

    @property
    def chunk_size(self) -> int:
        """m, the database's chunk size."""
        return int(self.db.chunk_size)

    @property
    def tokenizer_id(self) -> str:
        """The database's LM tokenizer id."""
        return str(self.db.tokenizer_id)

    @property
    def num_documents(self) -> int:
        """D', the documents of the sub-database."""
        return int(len(np.unique(np.asarray(self.db.doc_ids)[self.chunk_ids])))

    @property
    def manifest(self) -> dict[str, Any]:
        """The identity of this sub-database (result caches key by it): the database's
        manifest, its chunks (a prefix length, or the sha256 of the chunk ids) and the index."""
        import hashlib

        chunks: Any = self.num_chunks
        if not self.is_prefix:
            chunks = {"n": self.num_chunks, "sha256": hashlib.sha256(self.chunk_ids).hexdigest()}
        return {"prefix_of": self.db.manifest, "chunks": chunks, "index": self.factory}

    def _text_blocks(self):  # -> Iterator[list[str]]
        for a in range(0, self.num_chunks, BLOCK):
            ids = self.chunk_ids[a : a + BLOCK]
            yield chunk_texts(self.db.tokenizer, *self.db.chunk_tokens(ids))

    def _dense_index(self, seed: int) -> Any:
        n, d = self.num_chunks, self.db.dim
        factory, params = default_factory(n, d)
        index = new_index(factory, d)
        if not index.is_trained:
            rng = np.random.default_rng(seed)
            sample = np.sort(rng.choice(n, size=training_size(factory, n), replace=False))
            index = train_index(factory, self.db.keys(self.chunk_ids[sample]))
        for a in range(0, n, BLOCK):
            index.add(self.db.keys(self.chunk_ids[a : a + BLOCK]))
        apply_search_params(index, params)
        return index

    def search(self, keys: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest prefix chunks of query keys (``Database.query_keys``): (distances float32
        [q, k'], chunk ids int64 [q, k']), nearest first."""
        if self.db.keys_kind == "bm25":
            scores, pos = self._index.search(list(keys), int(k))
            dist = -scores
        else:
            dist, pos = self._index.search(np.ascontiguousarray(keys, dtype=np.float32), int(k))
        return dist, np.where(pos >= 0, self.chunk_ids[np.maximum(pos, 0)], -1)

    def retrieve(
        self,
        chunks: np.ndarray,
        k: int,
        exclude_doc_ids: np.ndarray | None = None,
        *,
        lengths: np.ndarray | None = None,
        batch_size: int = 64,
    ) -> RetrievedNeighbours:
        """The k nearest prefix chunks (+ continuations) of query chunks [q, m]; the arguments
        and the result are those of ``Database.retrieve``."""
        keys = self.db.query_keys(chunks, lengths, batch_size=batch_size)
        dist, ids = search_excluding(
            self.search, self.db.store.doc_ids_of, self.num_chunks, keys, k, exclude_doc_ids
        )
        q, k = len(ids), int(k)
        rows, lens = self.db.store.neighbour_rows(ids.reshape(-1))
        return RetrievedNeighbours(
            tokens=rows.reshape(q, k, 2 * self.chunk_size),
            lengths=lens.reshape(q, k),
            chunk_ids=ids,
            distances=dist.astype(np.float32),
            pad_id=int(self.db.pad_id),
        )
