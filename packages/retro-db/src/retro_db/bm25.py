"""BM25 chunk keys (``bm25s``): RETRO's retrieval with sparse keys instead of frozen-BERT
embeddings (Doostmohammadi et al. 2023), as a database's index or over an opened database.

Two uses, one scoring:

* :class:`BM25Index`: the index of a database built with ``retro-db build --keys bm25`` (build.py):
  built by ``bm25s`` from the text of every chunk (chunk ids = ``bm25s`` document ids), saved in
  the database directory as ``index/vNNNNN.bm25/`` (``bm25s``'s own file names and formats:
  ``.npy`` arrays without pickle and JSON, written atomically through :mod:`retro_db.manifest`),
  every file recorded in the manifest (sha256, size, array shape and dtype) and re-hashed at
  every open (the index is read whole anyway), so a tampered file is refused with a one-line
  error. ``bm25s.BM25.load`` reads the saved folder as it is. :class:`~retro_db.database.Database`
  answers ``retrieve`` from it with the same neighbours format and same-document exclusion as a
  dense database, and ``retro-db neighbours`` writes training neighbours from it.
* :class:`BM25Retriever`: the same index built in memory over any opened database (dense keys
  included), for evaluation (``retro-eval run --methods bm25``).

Scoring: Lucene's BM25 (``bm25s`` method ``"lucene"``: sum over query terms of
idf * tf / (tf + k1 (1 - b + b |d| / avgdl)), idf = ln(1 + (N - df + 0.5) / (df + 0.5)), k1 = 1.5,
b = 0.75; Lucene 8+ drops the classic constant factor k1 + 1, which does not change the
ranking) over ``bm25s.tokenize`` terms (lower-cased words of 2+ characters, English stop words
removed, no stemming) of each chunk's detokenised text; a chunk without terms is a document of
length 0, as ``bm25s`` indexes it. ``distances`` = minus the score.

Requires the ``bm25s`` package (extra ``[bm25]``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .manifest import DatabaseError, atomic_save_npy, atomic_write_bytes, check_files
from .retrieved import RetrievedNeighbours, search_excluding

logger = logging.getLogger(__name__)

__all__ = ["BM25_FILES", "BM25Index", "BM25Retriever", "chunk_texts"]

#: the files of a saved index, ``bm25s``'s own names (``BM25.save``/``BM25.load``)
BM25_ARRAYS = ("data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy")
BM25_FILES = (*BM25_ARRAYS, "vocab.index.json", "params.index.json")
EMPTY_TERM = "\x00empty"  # the vocabulary of a corpus without any term
NO_TERM = "\x00none"  # the one term of a query without terms (scores 0 everywhere)
TOKENIZE = "bm25s.tokenize: lower-cased \\w\\w+ words, English stop words removed, no stemming"


def _terms(texts: list[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


def chunk_texts(tokenizer: Any, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
    """The text of chunks: each row's first ``lengths[i]`` tokens detokenised."""
    return tokenizer.decode_batch([row[: int(n)] for row, n in zip(tokens, lengths, strict=True)])


class BM25Index:
    """A ``bm25s`` index over chunk texts (document i = chunk id i); see the module docstring.

    Build with :meth:`build`, write with :meth:`save`, read back with :meth:`load`.
    """

    def __init__(self, bm25: Any) -> None:
        self._bm25 = bm25
        self._n = int(bm25.scores["num_docs"])

    @property
    def num_chunks(self) -> int:
        """N, the chunks indexed."""
        return self._n

    @property
    def bm25(self) -> Any:
        """The ``bm25s.BM25`` object."""
        return self._bm25

    def spec(self) -> dict[str, Any]:
        """The manifest's description of these keys (``keys`` entry of a BM25 database)."""
        import bm25s

        b = self._bm25
        return {
            "kind": "bm25",
            "library": f"bm25s {bm25s.__version__}",
            "method": b.method,
            "k1": float(b.k1),
            "b": float(b.b),
            "tokenize": TOKENIZE,
        }

    @classmethod
    def build(
        cls,
        text_blocks: Iterable[list[str]],
        *,
        k1: float = 1.5,
        b: float = 0.75,
        progress: bool = False,
        total: int | None = None,
    ) -> BM25Index:
        """Index chunk texts given in blocks (in chunk-id order): terms are mapped to ids block
        by block (only one block's texts are held), then ``bm25s`` builds the index.

        Args:
            text_blocks: lists of chunk texts, in chunk-id order.
            k1, b: BM25's parameters.
            progress: a tqdm bar over the chunks.
            total: the number of chunks (for the bar).
        """
        import bm25s

        vocab: dict[str, int] = {}
        ids: list[list[int]] = []
        with tqdm(total=total, desc="BM25 terms", unit="chunk", disable=not progress) as bar:
            for texts in text_blocks:
                for terms in _terms(texts):
                    ids.append([vocab.setdefault(t, len(vocab)) for t in terms])
                bar.update(len(texts))
        if not ids:
            raise ValueError("BM25 index: expected at least one chunk")
        if not vocab:  # no chunk has a term: one term that none has keeps bm25s's vocabulary valid
            vocab[EMPTY_TERM] = 0
        bm25 = bm25s.BM25(k1=k1, b=b, method="lucene")
        bm25.index((ids, vocab), show_progress=False)
        logger.info("BM25 index of %d chunks, %d terms", len(ids), len(vocab))
        return cls(bm25)

    def save(self, directory: str | os.PathLike[str]) -> list[str]:
        """Write the index to ``directory`` (``bm25s``'s file names and formats, each file
        atomically: arrays as ``.npy`` without pickle, vocabulary and parameters as JSON);
        return the file names (:data:`BM25_FILES`)."""
        import bm25s

        d = Path(directory)
        b = self._bm25
        for name, key in zip(BM25_ARRAYS, ("data", "indices", "indptr"), strict=True):
            atomic_save_npy(d / name, np.asarray(b.scores[key]))
        vocab = json.dumps(b.vocab_dict, ensure_ascii=False, sort_keys=True)
        atomic_write_bytes(d / "vocab.index.json", vocab.encode("utf-8"))
        params = {
            "k1": b.k1,
            "b": b.b,
            "delta": b.delta,
            "method": b.method,
            "idf_method": b.idf_method,
            "dtype": b.dtype,
            "int_dtype": b.int_dtype,
            "num_docs": self._n,
            "version": bm25s.__version__,
            "backend": b.backend,
        }
        text = json.dumps(params, indent=4, sort_keys=True)
        atomic_write_bytes(d / "params.index.json", text.encode("utf-8"))
        return list(BM25_FILES)

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        files: Mapping[str, Mapping[str, Any]],
        where: str | os.PathLike[str],
        num_chunks: int,
    ) -> BM25Index:
        """Read an index saved by :meth:`save`, after checking every file's sha256 and size
        against ``files`` (``{name in directory: manifest entry}``, all of :data:`BM25_FILES`)
        and that it indexes ``num_chunks`` chunks with consistent arrays.

        Raises:
            DatabaseError: a missing, truncated, tampered or inconsistent file (one line).
        """
        import bm25s

        d = Path(directory)
        missing = [f for f in BM25_FILES if f not in files]
        if missing:
            raise DatabaseError(f"{where}: the BM25 index {d.name} lacks files {missing}")
        check_files(d, {f: files[f] for f in BM25_FILES}, verify=True, where=where)
        try:
            bm25 = bm25s.BM25.load(d, mmap=False, allow_pickle=False, show_progress=False)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DatabaseError(f"{d}: not a readable bm25s index ({e})") from None
        index = cls(bm25)
        index._check(d, num_chunks)
        return index

    def _check(self, d: Path, num_chunks: int) -> None:
        """The arrays agree with each other and with ``num_chunks`` (else DatabaseError)."""
        s = self._bm25.scores
        data, indices, indptr = (np.asarray(s[k]) for k in ("data", "indices", "indptr"))
        if self._n != num_chunks:
            raise DatabaseError(
                f"{d / 'params.index.json'}: num_docs {self._n}, expected {num_chunks} (one "
                "BM25 document per chunk)"
            )
        ok = (
            # one column per term; the empty term bm25s adds after indexing may have none
            len(indptr) - 1 in (len(self._bm25.vocab_dict) - 1, len(self._bm25.vocab_dict))
            and len(data) == len(indices) == int(indptr[-1])
            and bool(np.all(np.diff(indptr) >= 0))
            and (not len(indices) or 0 <= int(indices.min()) <= int(indices.max()) < self._n)
        )
        if not ok:
            raise DatabaseError(
                f"{d}: BM25 arrays inconsistent (indptr [{len(indptr)}], vocabulary "
                f"{len(self._bm25.vocab_dict)}, data [{len(data)}], indices [{len(indices)}])"
            )

    def search(self, texts: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best chunks of query texts: (BM25 scores float32 [q, k'], chunk ids int64
        [q, k']), best first, k' = min(k, N)."""
        kk = min(int(k), self._n)
        if not len(texts):
            return np.empty((0, kk), np.float32), np.empty((0, kk), np.int64)
        queries = [t if t else [NO_TERM] for t in _terms(list(texts))]
        ids, scores = self._bm25.retrieve(queries, k=kk, show_progress=False, n_threads=1)
        return np.asarray(scores, dtype=np.float32), np.asarray(ids, dtype=np.int64)


def _db_text_blocks(db: Any, block: int) -> Iterable[list[str]]:
    n = int(db.num_chunks)
    for start in range(0, n, block):
        toks, lens = db.chunk_tokens(np.arange(start, min(n, start + block)))
        yield chunk_texts(db.tokenizer, toks, lens)


class BM25Retriever:
    """BM25 over the chunks of an opened database, indexed in memory (see the module docstring).

    Args:
        db: a ``retro_db.Database`` (its chunk store, tokenizer and pad id are used).
        k1, b: BM25's parameters.
        block: chunks detokenised at a time while indexing.
    """

    def __init__(self, db: Any, *, k1: float = 1.5, b: float = 0.75, block: int = 8192) -> None:
        self.db = db
        self.pad_id = int(db.pad_id)
        self._index = BM25Index.build(_db_text_blocks(db, block), k1=k1, b=b)
        self._n = self._index.num_chunks
        logger.info("BM25 index of %d chunks of %s", self._n, getattr(db, "id", "the database"))

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
        return self._index.search(chunk_texts(self.db.tokenizer, chunks, lengths), k)

    def retrieve(
        self, chunks: np.ndarray, k: int, exclude_doc_ids: np.ndarray | None = None
    ) -> Any:
        """The k best database chunks (+ continuations) of query chunks [q, m], never from
        document ``exclude_doc_ids[i]`` (-1: none): ``RetrievedNeighbours`` with ``distances`` =
        minus the BM25 score (smaller is nearer). Missing neighbours: id -1, distance inf."""
        chunks = np.asarray(chunks)
        q, k = len(chunks), int(k)

        def search(rows: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
            sc, got = self.scores(rows, fetch)
            return -sc, got

        dist, ids = search_excluding(
            search, self.db.store.doc_ids_of, self._n, chunks, k, exclude_doc_ids
        )
        rows, lens = self.db.store.neighbour_rows(ids.reshape(-1))
        return RetrievedNeighbours(
            tokens=rows.reshape(q, k, 2 * self.chunk_size),
            lengths=lens.reshape(q, k),
            chunk_ids=ids,
            distances=dist,
            pad_id=self.pad_id,
        )
