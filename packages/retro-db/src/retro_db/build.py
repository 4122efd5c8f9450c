"""Building and growing a database on disk (DESIGN.md 2.3), resumably.

Layout of a database directory::

    manifest.json             the current version (written last, atomically)
    versions/v00001.json      every version's manifest, immutable (Database.open(version=...))
    shards/s00000/            one shard: a chunk segment (see chunks.py) plus
        keys.npy              float16 [n, d] chunk keys
        documents.jsonl       one line per document: doc_id, index, chunks, tokens, meta
        shard.json            written last: counts, sha256 of the shard's files, source fingerprint
    index/v00001.faiss        the faiss index of that version (keys of all shards, ids = chunk ids)
    .lock                     flock held by the one writer (build or add) at a time

A build streams the sources into shards of about ``shard_chunks`` chunks (whole documents only):
tokenise, chunk, embed, write the shard's files, then its ``shard.json``. A complete shard is never
rewritten. Killed at any moment (SIGKILL included) and restarted with the same arguments, the build
skips the complete shards (reading past their documents without tokenising them), redoes the rest,
then trains the index on a seeded sample, adds every key and writes the manifest: the result is
byte-identical to an uninterrupted build (for Flat and IVF indexes; HNSW construction with several
threads is not deterministic in faiss, use threads=1 for that guarantee).

``add_documents`` appends shards after the current version's, adds their keys to a copy of the
current index (no retraining, no re-embedding of old chunks), and writes version v+1 under new file
names. Old files stay, so a reader holding version v keeps working.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .chunks import CHUNK_FILES, chunk_document, token_dtype, write_chunk_segment
from .embedders import Embedder, embedder_options, embedder_spec, load_embedder
from .index import (
    apply_search_params,
    default_factory,
    read_index,
    set_threads,
    train_index,
    training_size,
    write_index,
)
from .ingest import Document, read_documents
from .manifest import (
    MANIFEST_NAME,
    DatabaseError,
    atomic_save_npy,
    atomic_write_bytes,
    atomic_write_json,
    file_entry,
    json_checksum,
    read_json,
    remove_stale_temp_files,
)
from .tokenizer import LMTokenizer, load_tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "SCHEMA_VERSION",
    "BuildStats",
    "add_documents",
    "build_database",
    "iter_documents",
    "text_fingerprint",
]

SCHEMA_VERSION = 1
SHARD_FILES = (*CHUNK_FILES, "keys.npy", "documents.jsonl")
READ_AHEAD = 256  # documents tokenised per encode_batch call


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


def _resolve_tokenizer(tokenizer: LMTokenizer | str | os.PathLike[str] | None) -> LMTokenizer:
    if isinstance(tokenizer, LMTokenizer):
        return tokenizer
    return load_tokenizer(tokenizer)


def _resolve_embedder(embedder: Any, threads: int | None) -> tuple[Embedder, str | None]:
    if embedder is None or isinstance(embedder, str):
        kwargs = (
            {} if threads is None or (embedder or "").startswith("hash:") else {"threads": threads}
        )
        return load_embedder(embedder, **kwargs), embedder
    return embedder, embedder_spec(embedder)


@dataclass
class BuildStats:
    """What a build or add skipped as duplicates (pass one in to read the counts).

    Attributes:
        already_present: documents whose text the database already held (``add`` re-runs).
        duplicates: documents whose text appeared earlier in the same run.
    """

    already_present: int = 0
    duplicates: int = 0


def text_fingerprint(text: str) -> str:
    """A document's fingerprint: hex sha256 of its text (UTF-8). Equal texts are one document."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _unique_documents(
    docs: Iterable[Document], seen: set[str], present: set[str], stats: BuildStats
) -> Iterator[Document]:
    """``docs`` without those whose text is in ``present`` (the database) or was seen earlier."""
    for doc in docs:
        fp = text_fingerprint(doc.text)
        if fp in present:
            stats.already_present += 1
            logger.warning("skipping document %r: its text is already in the database", doc.doc_id)
            continue
        if fp in seen:
            stats.duplicates += 1
            logger.warning("skipping document %r: duplicates an earlier document", doc.doc_id)
            continue
        seen.add(fp)
        yield doc


def _doc_fingerprint(h: Any, doc: Document) -> None:
    h.update(doc.doc_id.encode("utf-8", "surrogatepass"))
    h.update(b"\0")
    h.update(hashlib.sha256(doc.text.encode("utf-8", "surrogatepass")).digest())


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
    """Keys float32 [n, d] of chunks: detokenise each chunk's real tokens, embed the text."""
    texts = tokenizer.decode_batch([t[:n] for t, n in zip(tokens, lengths, strict=True)])
    keys = np.asarray(embedder.embed_texts(texts, batch_size=batch_size, progress=progress))
    dim = expected_dim if expected_dim is not None else embedder.dim
    if keys.ndim != 2 or keys.shape != (len(texts), dim):
        raise DatabaseError(
            f"{where}: embedding shape {tuple(keys.shape)}, expected [{len(texts)}, d={dim}]"
        )
    return keys.astype(np.float32, copy=False)


def tokenized(
    tokenizer: LMTokenizer, docs: Iterator[Document]
) -> Iterator[tuple[Document, list[int]]]:
    """(document, token ids) pairs; ``encode_batch`` over READ_AHEAD documents at a time."""
    while batch := list(itertools.islice(docs, READ_AHEAD)):
        yield from zip(batch, tokenizer.encode_batch([d.text for d in batch]), strict=True)


class _ShardWriter:
    """Turns a document stream into complete shard directories (the resumable part of a build)."""

    def __init__(
        self,
        db_dir: Path,
        tokenizer: LMTokenizer,
        embedder: Embedder,
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
            "embedder": embedder.id,
        }

    def shard_dir(self, i: int) -> Path:
        return self.db_dir / "shards" / f"s{i:05d}"

    def run(self, docs: Iterable[Document], first_shard: int, first_doc: int) -> list[str]:
        """Write shards first_shard.. from ``docs``; return the names of the shards of this run."""
        it = iter(docs)
        names, shard, doc_index = self.resume(it, first_shard, first_doc)
        with tqdm(desc="documents", unit="doc", disable=not self.progress) as bar:
            for docs_, ids, sha in self.plan(tokenized(self.tokenizer, it), bar):
                names.append(self._write_shard(shard, docs_, ids, doc_index, sha))
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
                _doc_fingerprint(h, doc)
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
            _doc_fingerprint(h, doc)
            docs.append(doc)
            ids.append(doc_ids)
            n_chunks += -(-len(doc_ids) // self.m)
            bar.update(1)
            if n_chunks >= self.shard_chunks:
                yield docs, ids, h.hexdigest()
                docs, ids, n_chunks, h = [], [], 0, hashlib.sha256()
        if docs:
            yield docs, ids, h.hexdigest()

    def _write_shard(
        self,
        shard: int,
        docs: list[Document],
        ids: list[list[int]],
        first_doc: int,
        source_sha: str,
    ) -> str:
        d = self.shard_dir(shard)
        d.mkdir(parents=True, exist_ok=True)
        toks, lens, dids, offs, lines = [], [], [], [], []
        doc_index = first_doc
        for doc, doc_tokens in zip(docs, ids, strict=True):
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
                        "sha256": text_fingerprint(doc.text),
                        "meta": doc.meta,
                    },
                    ensure_ascii=False,
                    sort_keys=True,
                    default=str,
                )
            )
            doc_index += 1
        tokens = np.concatenate(toks) if toks else np.empty((0, self.m), self.dtype)
        lengths = np.concatenate(lens) if lens else np.empty(0, np.int32)
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
        write_chunk_segment(
            d,
            tokens,
            lengths,
            np.concatenate(dids) if dids else np.empty(0, np.int64),
            np.concatenate(offs) if offs else np.empty(0, np.int64),
        )
        atomic_save_npy(d / "keys.npy", keys.astype(np.float16))
        atomic_write_bytes(d / "documents.jsonl", "".join(x + "\n" for x in lines).encode("utf-8"))
        info = {
            "chunks": len(tokens),
            "documents": len(lines),
            "docs_consumed": len(docs),
            "source_sha256": source_sha,
            "config": self.config,
            "files": {name: file_entry(d / name) for name in SHARD_FILES},
        }
        atomic_write_json(d / "shard.json", info)
        logger.info("wrote shard %s: %d documents, %d chunks", d.name, len(lines), len(tokens))
        return d.name


@contextlib.contextmanager
def writer_lock(
    db_dir: Path, what: str = "build or add", remove_when_done: bool = False
) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``db_dir/.lock`` while writing (one writer at a time).

    The kernel drops the lock when the process dies, SIGKILL included, so a restart after a kill
    acquires it again. Readers take no lock: they only read files a manifest names.

    Args:
        db_dir: the directory written (created if needed).
        what: names the writer in the error of a second one.
        remove_when_done: delete the lock file when the body finishes without an error (for
            outputs that are complete then, such as a neighbours dataset).
    """
    import fcntl

    db_dir.mkdir(parents=True, exist_ok=True)
    with open(db_dir / ".lock", "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatabaseError(
                f"{db_dir / '.lock'}: another {what} is writing here (one writer at a time)"
            ) from None
        try:
            yield
            if remove_when_done:
                (db_dir / ".lock").unlink(missing_ok=True)
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _shard_keys(db_dir: Path, shards: list[str]) -> Iterator[np.ndarray]:
    for s in shards:
        yield np.load(db_dir / "shards" / s / "keys.npy", mmap_mode="r", allow_pickle=False)


def _write_version(
    db_dir: Path, base: dict[str, Any], shards: list[str], index_file: str, version: int
) -> dict[str, Any]:
    files: dict[str, Any] = {}
    chunks = documents = 0
    for s in shards:
        info = read_json(db_dir / "shards" / s / "shard.json")
        chunks += info["chunks"]
        documents += info["documents"]
        for name, entry in info["files"].items():
            files[f"shards/{s}/{name}"] = entry
        files[f"shards/{s}/shard.json"] = file_entry(db_dir / "shards" / s / "shard.json")
    files[index_file] = file_entry(db_dir / index_file)
    manifest = dict(base)
    manifest.update(
        {
            "format": "retro-db",
            "schema_version": SCHEMA_VERSION,
            "version": version,
            "counts": {"chunks": chunks, "documents": documents, "shards": len(shards)},
            "shards": shards,
            "files": files,
        }
    )
    manifest["index"] = dict(manifest["index"], file=index_file)
    manifest["version_files"] = {
        f"versions/v{v:05d}.json": file_entry(db_dir / "versions" / f"v{v:05d}.json")["sha256"]
        for v in range(1, version)
        if (db_dir / "versions" / f"v{v:05d}.json").is_file()
    }
    manifest.pop("checksum", None)
    manifest["checksum"] = json_checksum(manifest)
    atomic_write_json(db_dir / "versions" / f"v{version:05d}.json", manifest)
    atomic_write_json(db_dir / MANIFEST_NAME, manifest)
    return manifest


def build_database(
    sources: Any,
    out_dir: str | os.PathLike[str],
    *,
    tokenizer: LMTokenizer | str | None = None,
    embedder: Any = None,
    chunk_size: int = 64,
    index_factory: str | None = None,
    search_params: dict[str, int] | None = None,
    batch_size: int = 64,
    shard_chunks: int = 65536,
    threads: int | None = None,
    train_seed: int = 0,
    progress: bool = True,
    engine: str = "local",
    address: str | None = None,
    num_cpus: int | None = None,
    stats: BuildStats | None = None,
):  # -> Database
    """Build a database from documents; resumable (re-run with the same arguments after a kill).

    A document whose text equals an earlier one's (:func:`text_fingerprint`) is skipped with a
    warning and counted in ``stats.duplicates``: duplicates would retrieve each other, defeating
    the same-document exclusion.

    Args:
        sources: Documents, paths (read with ``read_documents``) or iterables of either.
        out_dir: the database directory (created; must not hold a finished database).
        tokenizer: an LMTokenizer, a tokenizer directory, or None for GPT-2 BPE.
        embedder: an embedder object, a spec (``"hash:64"``, an encoder directory) or None for
            all-MiniLM-L6-v2 (needs the [embed] extra).
        chunk_size: m.
        index_factory: a faiss ``index_factory`` string; None picks one by size (index.py).
        search_params: e.g. ``{"nprobe": 16}``; None takes the default of the factory chosen.
        batch_size: embedding batch size.
        shard_chunks: chunks per shard (the unit of resumption).
        threads: faiss (and embedder) threads; None leaves the libraries' defaults. Ray engine:
            CPUs and threads per worker (default 1).
        train_seed: seed of the index training sample.
        progress: show tqdm progress bars.
        engine: ``"local"`` (this process) or ``"ray"``: shards written by workers of a Ray
            cluster (distributed.py, extra [ray]); the database is the same.
        address: Ray cluster address (None: start a local cluster); Ray engine only.
        num_cpus: CPUs of the local Ray cluster, or the most to use of a cluster; Ray only.
        stats: duplicates skipped are counted here.

    Returns:
        The built :class:`~retro_db.database.Database`, opened.
    """
    from .database import Database
    from .distributed import check_engine

    check_engine(engine, address, num_cpus, "build")
    db_dir = Path(out_dir)
    if (db_dir / MANIFEST_NAME).exists():
        raise DatabaseError(
            f"{db_dir / MANIFEST_NAME}: a database already exists here; use add_documents to grow it"
        )
    with contextlib.ExitStack() as stack:
        stage = None
        if engine == "ray":  # connect first: a bad address leaves nothing on disk
            from .distributed import ray_shard_stage

            stage = stack.enter_context(ray_shard_stage(address, num_cpus, threads))
        stack.enter_context(writer_lock(db_dir))
        tok, emb = _build(
            sources,
            db_dir,
            tokenizer,
            embedder,
            chunk_size,
            index_factory,
            search_params,
            batch_size,
            shard_chunks,
            threads,
            train_seed,
            progress,
            stage,
            stats if stats is not None else BuildStats(),
        )
    return Database.open(db_dir, tokenizer=tok, embedder=emb, threads=threads)


def _add_keys_local(index, db_dir: Path, shards: list[str], progress: bool):  # -> faiss.Index
    for keys in tqdm(
        _shard_keys(db_dir, shards), desc="index add", total=len(shards), disable=not progress
    ):
        index.add(np.asarray(keys, dtype=np.float32))
    return index


def _build(
    sources: Any,
    db_dir: Path,
    tokenizer: Any,
    embedder: Any,
    chunk_size: int,
    index_factory: str | None,
    search_params: dict[str, int] | None,
    batch_size: int,
    shard_chunks: int,
    threads: int | None,
    train_seed: int,
    progress: bool,
    stage: Any = None,
    stats: BuildStats | None = None,
) -> tuple[LMTokenizer, Embedder | None]:
    remove_stale_temp_files(db_dir)
    docs = _unique_documents(
        iter_documents(sources), set(), set(), stats if stats is not None else BuildStats()
    )
    set_threads(threads)
    tok = _resolve_tokenizer(tokenizer)
    if stage is None:
        emb, spec = _resolve_embedder(embedder, threads)
        dim = int(emb.dim)
        writer = _ShardWriter(db_dir, tok, emb, chunk_size, shard_chunks, batch_size, progress, dim)
        shards = writer.run(docs, 0, 0)
        embedder_entry = {"id": emb.id, "dim": dim, "spec": spec, "options": embedder_options(emb)}
        add_keys: Callable[..., Any] = _add_keys_local
    else:
        # Ray: its workers load the embedder and write the shards; `add_keys` runs on them too
        # (distributed.py). The embedder is not loaded here (Database creates it on first use).
        emb = None
        shards, embedder_entry, add_keys = stage.write_shards(
            docs, db_dir, tok, embedder, chunk_size, shard_chunks, batch_size, progress
        )
        dim = int(embedder_entry["dim"])

    n = sum(read_json(db_dir / "shards" / s / "shard.json")["chunks"] for s in shards)
    if n == 0:
        raise DatabaseError(f"{db_dir}: the sources held no documents with text")
    if index_factory is None:
        index_factory, params = default_factory(n, dim)
    else:
        params = {}
    params = dict(params if search_params is None else search_params)
    index = _train(db_dir, shards, index_factory, n, dim, train_seed)
    index = add_keys(index, db_dir, shards, progress)
    index_file = "index/v00001.faiss"
    (db_dir / "index").mkdir(exist_ok=True)
    write_index(index, db_dir / index_file)
    base = {
        "chunk_size": chunk_size,
        "shard_chunks": shard_chunks,
        "pad_id": tok.pad_id,
        "token_dtype": str(token_dtype(tok.vocab_size)),
        "tokenizer": tok.to_manifest(),
        "embedder": dict(embedder_entry, key_dtype="float16"),
        "index": {"factory": index_factory, "search_params": params, "metric": "l2"},
    }
    _write_version(db_dir, base, shards, index_file, 1)
    logger.info("built %s: %d chunks, index %s", db_dir, n, index_factory)
    return tok, emb


def _train(db_dir: Path, shards: list[str], factory: str, n: int, dim: int, seed: int):
    import faiss

    probe = faiss.index_factory(dim, factory)
    if probe.is_trained:
        return probe
    s = training_size(factory, n)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=s, replace=False))
    train = np.empty((s, dim), dtype=np.float32)
    start, j = 0, 0
    for keys in _shard_keys(db_dir, shards):
        end = start + len(keys)
        sel = sample[(sample >= start) & (sample < end)]
        train[j : j + len(sel)] = keys[sel - start]
        j += len(sel)
        start = end
    logger.info("training %s on %d of %d keys", factory, s, n)
    return train_index(factory, train)


def add_documents(
    db_dir: str | os.PathLike[str],
    sources: Any,
    *,
    embedder: Any = None,
    batch_size: int = 64,
    shard_chunks: int | None = None,
    threads: int | None = None,
    progress: bool = True,
    stats: BuildStats | None = None,
):  # -> Database
    """Append documents to a database as a new version (no rebuild; resumable like a build).

    Idempotent: a document whose text the database already holds (:func:`text_fingerprint`) is
    skipped and counted in ``stats.already_present``, so re-running an ``add`` (the recovery after
    a kill) adds nothing twice; a document repeating an earlier one of the same run is skipped
    and counted in ``stats.duplicates``. The index file that is copied is verified (sha256).

    The tokenizer and embedder are the database's own (the embedder is re-created from the
    manifest's spec unless one is passed; its id and dimension must match the manifest's). New
    chunks get ids after the existing ones, new keys are added to a copy of the index (no
    retraining), and ``manifest.json`` moves to version v+1; the files of version v are untouched.

    Returns:
        The new version, opened.
    """
    db_dir = Path(db_dir)
    read_json(db_dir / MANIFEST_NAME)  # fails with a one-line error before any lock file is made
    with writer_lock(db_dir):
        return _add(
            db_dir,
            sources,
            embedder,
            batch_size,
            shard_chunks,
            threads,
            progress,
            stats if stats is not None else BuildStats(),
        )


def _add(
    db_dir: Path,
    sources: Any,
    embedder: Any,
    batch_size: int,
    shard_chunks: int | None,
    threads: int | None,
    progress: bool,
    stats: BuildStats,
):  # -> Database
    from .database import Database
    from .manifest import check_files

    old = Database.open(
        db_dir, embedder=embedder if not isinstance(embedder, str) else None, threads=threads
    )
    db_dir = Path(db_dir)
    remove_stale_temp_files(db_dir)
    set_threads(threads)
    man = old.manifest
    emb = (
        old.embedder
        if embedder is None or not isinstance(embedder, str)
        else load_embedder(
            embedder,
            **({} if embedder.startswith("hash:") else man["embedder"].get("options", {})),
        )
    )
    old.check_embedder(emb)
    if shard_chunks is None:
        shard_chunks = int(man.get("shard_chunks", 65536))
    writer = _ShardWriter(
        db_dir, old.tokenizer, emb, old.chunk_size, shard_chunks, batch_size, progress, old.dim
    )
    present: set[str] = set()
    unknown = 0
    for rec in old.document_records():
        if isinstance(rec.get("sha256"), str):
            present.add(rec["sha256"])
        else:
            unknown += 1
    if unknown:
        logger.warning(
            "%s: %d documents carry no text fingerprint (an older build): re-adding them is not "
            "detected",
            db_dir,
            unknown,
        )
    docs = _unique_documents(iter_documents(sources), set(), present, stats)
    new = writer.run(docs, len(man["shards"]), old.num_documents)
    if not new:
        logger.info("add_documents: nothing to add")
        return old
    index_name = man["index"]["file"]
    check_files(db_dir, {index_name: man["files"][index_name]}, verify=True)
    index = read_index(db_dir / index_name, mmap=False, dim=old.dim)
    apply_search_params(index, man["index"]["search_params"])
    for keys in _shard_keys(db_dir, new):
        index.add(np.asarray(keys, dtype=np.float32))
    version = int(man["version"]) + 1
    index_file = f"index/v{version:05d}.faiss"
    write_index(index, db_dir / index_file)
    base = {k: v for k, v in man.items() if k not in ("files", "shards", "counts", "version")}
    _write_version(db_dir, base, list(man["shards"]) + new, index_file, version)
    logger.info("added %d shards to %s: version %d", len(new), db_dir, version)
    return Database.open(db_dir, tokenizer=old.tokenizer, embedder=emb, threads=threads)
