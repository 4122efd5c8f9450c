"""The shard machinery both engines use: documents in, complete shard directories out.

A shard (``shards/sNNNNN/`` of a database, see build.py) holds whole documents, about
``shard_chunks`` chunks of m tokens, their keys, and a ``shard.json`` written last: the unit of
resumption. This module owns what the local engine (build.py) and the Ray engine (distributed.py)
share, so that neither calls back into the other:

* documents: :func:`iter_documents` flattens sources; :func:`tokenized` reads ahead
  ``READ_AHEAD`` documents per ``encode_batch`` call;
* fingerprints: :func:`text_fingerprint` (one document's text: equal texts are one document) and
  :func:`update_source_fingerprint` (a run's documents, recorded in ``shard.json`` so that a
  resume over other sources is refused);
* :class:`ShardWriter`: skip the complete shards of an interrupted run (:meth:`~ShardWriter.resume`),
  group documents into shards (:meth:`~ShardWriter.plan`), write one shard
  (:meth:`~ShardWriter.write_shard`: chunk, embed, write its files atomically, ``shard.json`` last);
* keys: :func:`shard_keys` reads the stored keys, :func:`add_shard_keys` adds them to an index.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .chunks import CHUNK_FILES, chunk_document, read_npy, token_dtype, write_chunk_segment
from .embedders import Embedder
from .ingest import Document, read_documents
from .manifest import (
    DatabaseError,
    atomic_save_npy,
    atomic_write_bytes,
    atomic_write_json,
    file_entry,
    read_json,
)
from .tokenizer import LMTokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "READ_AHEAD",
    "SHARD_FILES",
    "ShardWriter",
    "add_shard_keys",
    "iter_documents",
    "shard_keys",
    "text_fingerprint",
    "tokenized",
    "trim_heap",
    "update_source_fingerprint",
]

SHARD_FILES = (*CHUNK_FILES, "keys.npy", "documents.jsonl")
NO_EMBEDDER = "none (bm25 keys)"  # shard.json's config.embedder of a shard without keys.npy
READ_AHEAD = 256  # documents tokenised per encode_batch call
EMBED_BLOCK = 16384  # chunks detokenised and embedded at a time (bounds a long document's memory)


def iter_documents(sources: Any, **read_kwargs: Any) -> Iterator[Document]:
    """Flatten sources: a Document, a path (read with ``read_documents``), or an iterable of those."""
    if isinstance(sources, Document):
        yield sources
    elif isinstance(sources, (str, os.PathLike)):
        yield from read_documents(sources, **read_kwargs)
    else:
        for item in sources:
            if isinstance(item, Document):
                yield item
            else:
                yield from iter_documents(item, **read_kwargs)


def text_fingerprint(text: str) -> str:
    """A document's fingerprint: hex sha256 of its text (UTF-8). Equal texts are one document."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def update_source_fingerprint(h: Any, doc: Document) -> None:
    """Add ``doc`` to ``h``, a running ``hashlib.sha256`` over a run's documents in order.

    Each document contributes its ``doc_id`` (UTF-8), a NUL byte and the sha256 digest of its text,
    so the fingerprint changes when a document is renamed, edited, added, dropped or moved.
    """
    h.update(doc.doc_id.encode("utf-8", "surrogatepass"))
    h.update(b"\0")
    h.update(hashlib.sha256(doc.text.encode("utf-8", "surrogatepass")).digest())


def tokenized(
    tokenizer: LMTokenizer, docs: Iterator[Document]
) -> Iterator[tuple[Document, list[int]]]:
    """(document, token ids int32 array) pairs, READ_AHEAD documents tokenised at a time.

    A document longer than ``TOKENIZE_WINDOW`` characters is tokenised in windows
    (:meth:`~retro_db.tokenizer.LMTokenizer.encode_arrays`): memory does not grow with its length.
    """
    while batch := list(itertools.islice(docs, READ_AHEAD)):
        yield from zip(batch, tokenizer.encode_arrays([d.text for d in batch]), strict=True)


def _embed_chunks(
    tokenizer: LMTokenizer,
    embedder: Embedder,
    tokens: np.ndarray,
    lengths: np.ndarray,
    batch_size: int,
    progress: bool,
    expected_dim: int | None = None,
    where: str = "embedder",
) -> np.ndarray:
    """Keys float16 [n, d] of chunks: detokenise each chunk's real tokens, embed the text.

    ``EMBED_BLOCK`` chunks at a time (the decoded texts of one block only are held), written into
    the float16 array that is stored (``keys.npy``).
    """
    dim = expected_dim if expected_dim is not None else embedder.dim
    n = len(tokens)
    out = np.empty((n, dim), dtype=np.float16)
    for a in range(0, max(n, 1), EMBED_BLOCK):
        b = min(n, a + EMBED_BLOCK)
        texts = tokenizer.decode_batch(
            [t[:k] for t, k in zip(tokens[a:b], lengths[a:b], strict=True)]
        )
        keys = np.asarray(embedder.embed_texts(texts, batch_size=batch_size, progress=progress))
        if keys.ndim != 2 or keys.shape != (len(texts), dim):
            raise DatabaseError(
                f"{where}: embedding shape {tuple(keys.shape)}, expected [{len(texts)}, d={dim}]"
            )
        out[a:b] = keys.astype(np.float32, copy=False)  # float32 first, as stored before
        del texts, keys
    return out


class ShardWriter:
    """Turns a document stream into complete shard directories (the resumable part of a build).

    Args:
        db_dir: the database directory (shards go to ``db_dir/shards/sNNNNN``).
        tokenizer: the LM tokenizer (ids of the chunks, and the token dtype).
        embedder: the chunk embedder (keys [n, d]); only its ``id`` is read by :meth:`plan` and
            :meth:`resume`, so a stub will do where the shards are written elsewhere (Ray).
            None: no ``keys.npy`` (a database with BM25 keys indexes the chunks' text instead).
        chunk_size: m, tokens per chunk.
        shard_chunks: a shard closes once it holds at least this many chunks.
        batch_size: embedding batch size.
        progress: show tqdm progress bars.
        dim: d, the key dimension expected from the embedder.
    """

    def __init__(
        self,
        db_dir: Path,
        tokenizer: LMTokenizer,
        embedder: Embedder | None,
        chunk_size: int,
        shard_chunks: int,
        batch_size: int,
        progress: bool,
        dim: int,
    ) -> None:
        self.db_dir = db_dir
        self.tokenizer = tokenizer
        self.embedder = embedder
        self.m = chunk_size
        self.shard_chunks = shard_chunks
        self.batch_size = batch_size
        self.progress = progress
        self.dim = dim
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.config = {
            "chunk_size": chunk_size,
            "shard_chunks": shard_chunks,
            "tokenizer": tokenizer.id,
            "embedder": NO_EMBEDDER if embedder is None else embedder.id,
        }

    def shard_dir(self, i: int) -> Path:
        """The directory of shard ``i``: ``db_dir/shards/s{i:05d}``."""
        return self.db_dir / "shards" / f"s{i:05d}"

    def run(self, docs: Iterable[Document], first_shard: int, first_doc: int) -> list[str]:
        """Write shards first_shard.. from ``docs``; return the names of the shards of this run."""
        it = iter(docs)
        names, shard, doc_index = self.resume(it, first_shard, first_doc)
        # a stream of documents of unknown length: the bar counts their text (bytes, and a rate);
        # each shard's embedding has its own bar, with a total and an ETA
        with tqdm(
            desc="documents (text)", unit="B", unit_scale=True, disable=not self.progress
        ) as bar:
            for docs_, ids, sha in self.plan(tokenized(self.tokenizer, it), bar):
                names.append(self.write_shard(shard, docs_, ids, doc_index, sha))
                doc_index += sum(1 for x in ids if len(x))
                shard += 1
        return names

    def resume(
        self, it: Iterator[Document], first_shard: int, first_doc: int
    ) -> tuple[list[str], int, int]:
        """Skip the complete shards of an interrupted run (consuming their documents from ``it``).

        Returns the names of those shards, the next shard number and the next document index.
        """
        names: list[str] = []
        shard = first_shard
        doc_index = first_doc
        # Resume: complete shards of an interrupted run are reused; their documents are skipped.
        while (self.shard_dir(shard) / "shard.json").is_file():
            info = read_json(self.shard_dir(shard) / "shard.json")
            if info.get("config") != self.config:
                raise DatabaseError(
                    f"{self.shard_dir(shard) / 'shard.json'}: left by an interrupted run with "
                    f"settings {info.get('config')}, expected {self.config}; delete that shard"
                )
            h = hashlib.sha256()
            for _ in range(info["docs_consumed"]):
                doc = next(it, None)
                if doc is None:
                    raise DatabaseError(
                        f"{self.shard_dir(shard)}: an interrupted run consumed more documents than "
                        "the sources now hold; delete it or pass the same sources"
                    )
                update_source_fingerprint(h, doc)
            if h.hexdigest() != info["source_sha256"]:
                raise DatabaseError(
                    f"{self.shard_dir(shard) / 'shard.json'}: left by an interrupted run over other "
                    "sources (fingerprint differs); delete that shard or pass the same sources"
                )
            logger.info("resuming: shard %s already complete", self.shard_dir(shard).name)
            names.append(self.shard_dir(shard).name)
            doc_index += info["documents"]
            shard += 1
        # Anything after the last complete shard is partial: start it over.
        extra = shard
        while self.shard_dir(extra).exists():
            shutil.rmtree(self.shard_dir(extra))
            extra += 1
        return names, shard, doc_index

    def plan(
        self, pairs: Iterable[tuple[Document, Any]], bar: Any
    ) -> Iterator[tuple[list[Document], list[Any], str]]:
        """Group (document, token ids) pairs into shards: whole documents, >= shard_chunks chunks.

        Yields (documents, their token ids, source fingerprint) per shard. Token ids may be any
        object with ``len()`` (the Ray engine passes references to arrays held by its workers).
        """
        docs: list[Document] = []
        ids: list[Any] = []
        n_chunks = 0
        h = hashlib.sha256()
        for doc, doc_ids in pairs:
            update_source_fingerprint(h, doc)
            docs.append(doc)
            ids.append(doc_ids)
            n_chunks += -(-len(doc_ids) // self.m)
            bar.update(len(doc.text.encode("utf-8")))
            if n_chunks >= self.shard_chunks:
                yield docs, ids, h.hexdigest()
                docs, ids, n_chunks, h = [], [], 0, hashlib.sha256()
        if docs:
            yield docs, ids, h.hexdigest()

    def _chunk(
        self, docs: list[Document], ids: list[Any], first_doc: int, text_sha256: list[str]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """Chunks of a shard's documents: tokens [n, m], lengths [n], document indices [n],
        token offsets [n], and one ``documents.jsonl`` line per document with tokens."""
        toks, lens, dids, offs, lines = [], [], [], [], []
        doc_index = first_doc
        for doc, doc_tokens, text_sha in zip(docs, ids, text_sha256, strict=True):
            if not len(doc_tokens):
                logger.warning("skipping document %r: no tokens", doc.doc_id)
                continue
            t, n = chunk_document(doc_tokens, self.m, self.tokenizer.pad_id, self.dtype)
            toks.append(t)
            lens.append(n)
            dids.append(np.full(len(t), doc_index, dtype=np.int64))
            offs.append(np.arange(len(t), dtype=np.int64) * self.m)
            lines.append(
                json.dumps(
                    {
                        "doc_id": doc.doc_id,
                        "index": doc_index,
                        "chunks": len(t),
                        "tokens": len(doc_tokens),
                        "sha256": text_sha,
                        "meta": doc.meta,
                    },
                    ensure_ascii=False,
                    sort_keys=True,
                    default=str,
                )
            )
            doc_index += 1
        return (
            np.concatenate(toks) if toks else np.empty((0, self.m), self.dtype),
            np.concatenate(lens) if lens else np.empty(0, np.int32),
            np.concatenate(dids) if dids else np.empty(0, np.int64),
            np.concatenate(offs) if offs else np.empty(0, np.int64),
            lines,
        )

    def write_shard(
        self,
        shard: int,
        docs: list[Document],
        ids: list[Any],
        first_doc: int,
        source_sha: str,
        text_sha256: list[str] | None = None,
    ) -> str:
        """Chunk, embed and write shard ``shard`` (its files atomically, ``shard.json`` last).

        Args:
            shard: the shard number.
            docs: its documents, in order (only ``doc_id``, ``meta`` and, unless ``text_sha256`` is
                given, ``text`` are read).
            ids: each document's token ids (a document without tokens is skipped with a warning).
            first_doc: the database index of the shard's first document.
            source_sha: the source fingerprint of ``docs`` (from :meth:`plan`).
            text_sha256: each document's :func:`text_fingerprint`, for documents sent without
                their text (the Ray engine); None computes them from ``docs``.

        Returns:
            The shard's directory name.
        """
        d = self.shard_dir(shard)
        d.mkdir(parents=True, exist_ok=True)
        if text_sha256 is None:
            text_sha256 = [text_fingerprint(doc.text) for doc in docs]
        tokens, lengths, doc_ids, offsets, lines = self._chunk(docs, ids, first_doc, text_sha256)
        write_chunk_segment(d, tokens, lengths, doc_ids, offsets)
        if self.embedder is not None:
            keys = _embed_chunks(
                self.tokenizer,
                self.embedder,
                tokens,
                lengths,
                self.batch_size,
                self.progress,
                self.dim,
                where=f"{d / 'keys.npy'}",
            )
            atomic_save_npy(d / "keys.npy", keys)
        atomic_write_bytes(d / "documents.jsonl", "".join(x + "\n" for x in lines).encode("utf-8"))
        info = {
            "chunks": len(tokens),
            "documents": len(lines),
            "docs_consumed": len(docs),
            "source_sha256": source_sha,
            "config": self.config,
            "files": {
                name: file_entry(d / name)
                for name in SHARD_FILES
                if self.embedder is not None or name != "keys.npy"
            },
        }
        atomic_write_json(d / "shard.json", info)
        logger.info("wrote shard %s: %d documents, %d chunks", d.name, len(lines), len(tokens))
        del tokens, lengths, doc_ids, offsets, lines
        trim_heap()
        return d.name


def trim_heap() -> None:
    """Give the C heap's free pages back to the kernel (glibc ``malloc_trim(0)``; nothing
    elsewhere). A shard's arrays and the tokenizer's buffers are freed after each shard, but
    glibc keeps the freed memory (its mmap threshold rises after the first large free), and the
    heap kept growing in steps with the shards written: measured, 101 -> 145 MB of anonymous
    memory over 25 shards without this, ~80 MB after every shard with it (issue 18)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is not None:
        trim(0)


def shard_keys(db_dir: Path, shards: list[str]) -> Iterator[np.ndarray]:
    """The stored keys of each shard in order: float16 memmaps [n_s, d]."""
    for s in shards:
        yield read_npy(db_dir / "shards" / s / "keys.npy")  # a corrupt header names the file


def add_shard_keys(index: Any, db_dir: Path, shards: list[str], progress: bool) -> Any:
    """Add the keys of ``shards`` (in order, as float32) to the faiss ``index``; return it.

    Ids are implicit (faiss numbers added keys from ``index.ntotal`` on), so the keys' ids are the
    chunk ids when ``shards`` follow the shards already in the index.
    """
    total = sum(int(k.nbytes) for k in shard_keys(db_dir, shards))  # headers only are read
    with tqdm(
        total=total, desc="index add", unit="B", unit_scale=True, disable=not progress
    ) as bar:
        for keys in shard_keys(db_dir, shards):
            index.add(np.asarray(keys, dtype=np.float32))
            bar.update(keys.nbytes)
    return index
