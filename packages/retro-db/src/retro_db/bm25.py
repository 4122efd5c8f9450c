"""BM25 chunk retrieval over a database's chunk store (``bm25s``): RETRO's retrieval with sparse
keys instead of frozen-BERT embeddings (Doostmohammadi et al. 2023).

:class:`BM25Retriever` indexes the text of every chunk of an opened :class:`~retro_db.database.
Database` (the same chunks, the same chunk ids) and answers ``retrieve(chunks, k,
exclude_doc_ids)`` with the same neighbours format as the database itself (chunk + continuation,
r = 2m, nearest first, ``chunk_ids``, ``distances`` = minus the BM25 score) and the same
same-document exclusion, so RETRO evaluates with either retriever (``retro_core.Retriever``).

Scoring: Lucene's BM25 (``bm25s`` method ``"lucene"``: sum over query terms of
idf * tf / (tf + k1 (1 - b + b |d| / avgdl)), idf = ln(1 + (N - df + 0.5) / (df + 0.5)), k1 = 1.5,
b = 0.75; Lucene 8+ drops the classic constant factor k1 + 1, which does not change the ranking) over ``bm25s.tokenize`` terms (lower-cased words of 2+ characters, English
stop words removed, no stemming) of each chunk's detokenised text. The index lives in memory
(built in seconds for the packs' ~100k chunks); building a BM25 database on disk
(``retro-db build --keys bm25``) is not part of this module.

Requires the ``bm25s`` package (``pip install bm25s``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["BM25Retriever"]


def _terms(texts: list[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


class BM25Retriever:
    """BM25 over the chunks of an opened database (see the module docstring).

    Args:
        db: a ``retro_db.Database`` (its chunk store, tokenizer and pad id are used).
        k1, b: BM25's parameters.
        block: chunks detokenised at a time while indexing.
    """

    def __init__(self, db: Any, *, k1: float = 1.5, b: float = 0.75, block: int = 8192) -> None:
        import bm25s

        self.db = db
        self.pad_id = int(db.pad_id)
        n = int(db.num_chunks)
        texts: list[str] = []
        for start in range(0, n, block):
            toks, lens = db.chunk_tokens(np.arange(start, min(n, start + block)))
            texts.extend(
                db.tokenizer.decode_batch(
                    [row[: int(ln)] for row, ln in zip(toks, lens, strict=True)]
                )
            )
        corpus = _terms(texts)
        # bm25s cannot index an empty document: a chunk without terms gets one that no query has
        corpus = [t if t else ["\x00empty"] for t in corpus]
        self._bm25 = bm25s.BM25(k1=k1, b=b, method="lucene")
        self._bm25.index(corpus, show_progress=False)
        self._n = n
        logger.info("BM25 index of %d chunks of %s", n, getattr(db, "id", "the database"))

    @property
    def chunk_size(self) -> int:
        """m, the database's chunk size."""
        return int(self.db.chunk_size)

    @property
    def tokenizer_id(self) -> str:
        """The database's LM tokenizer id."""
        return str(self.db.tokenizer_id)

    def scores(self, chunks: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best chunks of query chunks [q, m] (trailing pad_id = padding): (BM25 scores
        float32 [q, k'], chunk ids int64 [q, k']), best first, k' = min(k, N)."""
        chunks = np.asarray(chunks)
        real = chunks != self.pad_id
        lengths = np.where(real.any(1), chunks.shape[1] - np.argmax(real[:, ::-1], axis=1), 0)
        texts = self.db.tokenizer.decode_batch(
            [row[: int(n)] for row, n in zip(chunks, lengths, strict=True)]
        )
        queries = [t if t else ["\x00none"] for t in _terms(texts)]
        kk = min(int(k), self._n)
        ids, scores = self._bm25.retrieve(queries, k=kk, show_progress=False, n_threads=1)
        return np.asarray(scores, dtype=np.float32), np.asarray(ids, dtype=np.int64)

    def retrieve(
        self, chunks: np.ndarray, k: int, exclude_doc_ids: np.ndarray | None = None
    ) -> Any:
        """The k best database chunks (+ continuations) of query chunks [q, m], never from
        document ``exclude_doc_ids[i]`` (-1: none): ``RetrievedNeighbours`` with ``distances`` =
        minus the BM25 score (smaller is nearer). Missing neighbours: id -1, distance inf."""
        from .database import RetrievedNeighbours

        chunks = np.asarray(chunks)
        q, k = len(chunks), int(k)
        dist = np.full((q, k), np.inf, dtype=np.float32)
        ids = np.full((q, k), -1, dtype=np.int64)
        excl = (
            np.full(q, -1, np.int64)
            if exclude_doc_ids is None
            else np.asarray(exclude_doc_ids, dtype=np.int64).reshape(-1)
        )
        todo = np.arange(q)
        fetch = min(self._n, k if exclude_doc_ids is None else 2 * k + 8)
        while len(todo):
            sc, got = self.scores(chunks[todo], fetch)
            docs = self.db.store.doc_ids_of(got.reshape(-1)).reshape(got.shape)
            keep = docs != excl[todo, None]
            short = []
            for row, qi in enumerate(todo):
                sel = np.flatnonzero(keep[row])[:k]
                ids[qi, : len(sel)] = got[row, sel]
                dist[qi, : len(sel)] = -sc[row, sel]
                if len(sel) < k and fetch < self._n:
                    short.append(qi)
            todo = np.asarray(short, dtype=np.int64)
            fetch = min(self._n, fetch * 2)
        rows, lens = self.db.store.neighbour_rows(ids.reshape(-1))
        return RetrievedNeighbours(
            tokens=rows.reshape(q, k, 2 * self.chunk_size),
            lengths=lens.reshape(q, k),
            chunk_ids=ids,
            distances=dist,
            pad_id=self.pad_id,
        )
