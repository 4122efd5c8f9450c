"""A real index over a prefix of a database (the database-size sweep, RETRO's figure 1).

:class:`PrefixRetriever` retrieves from the first ``D'`` documents of an opened
:class:`~retro_db.database.Database` only (their chunks: ids ``0 .. n - 1``, the chunk store
numbers whole documents in order): not a filter after searching the whole database, but an
index of those chunks alone, built the way ``retro-db build`` indexes a database of that size:

* dense keys: the stored keys of the first n chunks in the faiss index
  :func:`~retro_db.index.default_factory` picks for n keys (Flat below its threshold; trained on a
  seeded sample where the factory needs training), the database's own embedder for queries;
* BM25 keys: a ``bm25s`` index of those chunks' texts (idf and average length of the prefix,
  as a database of those documents would have).

Prefixes are nested by construction (:func:`prefix_chunks` grows with the fraction), so the
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

__all__ = ["PrefixRetriever", "parse_fraction", "prefix_chunks"]

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


class PrefixRetriever:
    """Retrieval from the first ``num_chunks`` chunks of ``db`` through an index of those chunks
    alone (see the module docstring); the same ``retrieve`` as a Database.

    Args:
        db: an opened ``retro_db.Database``.
        num_chunks: n, a document boundary (:func:`prefix_chunks`), 1 <= n <= N.
        train_seed: seed of the training sample of a factory that needs training.
    """

    def __init__(self, db: Any, num_chunks: int, *, train_seed: int = 0) -> None:
        n = int(num_chunks)
        if not 1 <= n <= db.num_chunks:
            raise ValueError(f"num_chunks: expected 1..{db.num_chunks}, got {n}")
        if n < db.num_chunks and db.doc_ids[n] == db.doc_ids[n - 1]:
            raise ValueError(f"num_chunks {n}: not a document boundary of {db.id}")
        self.db = db
        self.num_chunks = n
        self.factory = "bm25s" if db.keys_kind == "bm25" else default_factory(n, db.dim)[0]
        if db.keys_kind == "bm25":
            self._index: Any = BM25Index.build(self._text_blocks())
        else:
            self._index = self._dense_index(train_seed)
        logger.info("prefix index of %s: %d of %d chunks (%s)", db.id, n, db.num_chunks,
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
        """D', the documents of the prefix."""
        return int(self.db.doc_ids[self.num_chunks - 1]) + 1

    @property
    def manifest(self) -> dict[str, Any]:
        """The identity of this sub-database (result caches key by it): the database's
        manifest, the prefix length and the index kind."""
        return {"prefix_of": self.db.manifest, "chunks": self.num_chunks, "index": self.factory}

    def _text_blocks(self):  # -> Iterator[list[str]]
        for a in range(0, self.num_chunks, BLOCK):
            ids = np.arange(a, min(self.num_chunks, a + BLOCK))
            yield chunk_texts(self.db.tokenizer, *self.db.chunk_tokens(ids))

    def _dense_index(self, seed: int) -> Any:
        n, d = self.num_chunks, self.db.dim
        factory, params = default_factory(n, d)
        index = new_index(factory, d)
        if not index.is_trained:
            rng = np.random.default_rng(seed)
            sample = np.sort(rng.choice(n, size=training_size(factory, n), replace=False))
            index = train_index(factory, self.db.keys(sample))
        for a in range(0, n, BLOCK):
            index.add(self.db.keys(np.arange(a, min(n, a + BLOCK))))
        apply_search_params(index, params)
        return index

    def search(self, keys: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest prefix chunks of query keys (``Database.query_keys``): (distances float32
        [q, k'], chunk ids int64 [q, k']), nearest first."""
        if self.db.keys_kind == "bm25":
            scores, ids = self._index.search(list(keys), int(k))
            return -scores, ids
        return self._index.search(np.ascontiguousarray(keys, dtype=np.float32), int(k))

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
