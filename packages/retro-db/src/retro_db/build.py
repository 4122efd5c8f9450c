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

The shard machinery (document iteration, fingerprints, the resumable shard writer, adding keys) is
shards.py, shared with the Ray engine (distributed.py), which is handed the per-shard work and
never calls back into this module.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .chunks import token_dtype
from .database import Database
from .distributed import check_engine, ray_shard_stage
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
from .ingest import Document
from .manifest import (
    MANIFEST_NAME,
    DatabaseError,
    atomic_write_json,
    check_files,
    file_entry,
    json_checksum,
    read_json,
    remove_stale_temp_files,
    writer_lock,
)
from .shards import ShardWriter, add_shard_keys, iter_documents, shard_keys, text_fingerprint
from .tokenizer import LMTokenizer, load_tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "SCHEMA_VERSION",
    "BuildStats",
    "add_documents",
    "build_database",
]

SCHEMA_VERSION = 1


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
) -> Database:
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
    check_engine(engine, address, num_cpus, "build")
    db_dir = Path(out_dir)
    if (db_dir / MANIFEST_NAME).exists():
        raise DatabaseError(
            f"{db_dir / MANIFEST_NAME}: a database already exists here; use add_documents to grow it"
        )
    with contextlib.ExitStack() as stack:
        stage = None
        if engine == "ray":  # connect first: a bad address leaves nothing on disk
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
        writer = ShardWriter(db_dir, tok, emb, chunk_size, shard_chunks, batch_size, progress, dim)
        shards = writer.run(docs, 0, 0)
        embedder_entry = {"id": emb.id, "dim": dim, "spec": spec, "options": embedder_options(emb)}
        add_keys: Callable[..., Any] = add_shard_keys
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
    for keys in shard_keys(db_dir, shards):
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
) -> Database:
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
) -> Database:
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
    writer = ShardWriter(
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
    index = add_shard_keys(index, db_dir, new, progress=False)
    version = int(man["version"]) + 1
    index_file = f"index/v{version:05d}.faiss"
    write_index(index, db_dir / index_file)
    base = {k: v for k, v in man.items() if k not in ("files", "shards", "counts", "version")}
    _write_version(db_dir, base, list(man["shards"]) + new, index_file, version)
    logger.info("added %d shards to %s: version %d", len(new), db_dir, version)
    return Database.open(db_dir, tokenizer=old.tokenizer, embedder=emb, threads=threads)
