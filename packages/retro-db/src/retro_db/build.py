"""Building and growing a database on disk (DESIGN.md 2.3), resumably.

Layout of a database directory::

    manifest.json             the current version (written last, atomically)
    versions/v00001.json      every version's manifest, immutable (Database.open(version=...))
    shards/s00000/            one shard: a chunk segment (see chunks.py) plus
        keys.npy              float16 [n, d] chunk keys
        documents.jsonl       one line per document: doc_id, index, chunks, tokens, meta
        shard.json            written last: counts, sha256 of the shard's files, source fingerprint
    index/v00001.faiss        the faiss index of that version (keys of all shards, ids = chunk ids)
    index/v00001.bm25/        instead, with ``keys="bm25"``: the bm25s index of every chunk's text
                              (bm25.py; the shards then hold no keys.npy)
    .lock                     flock held by the one writer (build, add or gc) at a time
    gc.json                   versions whose files `retro-db gc` deleted (collect_garbage)

A build streams the sources into shards of about ``shard_chunks`` chunks (whole documents only):
tokenise, chunk, embed, write the shard's files, then its ``shard.json``. A complete shard is never
rewritten. Killed at any moment (SIGKILL included) and restarted with the same arguments, the build
skips the complete shards (reading past their documents without tokenising them), redoes the rest,
then trains the index on a seeded sample, adds every key and writes the manifest: the result is
byte-identical to an uninterrupted build (for Flat and IVF indexes; HNSW construction with several
threads is not deterministic in faiss, use threads=1 for that guarantee).

``add_documents`` appends shards after the current version's and writes version v+1 under new
file names: for an index that needs no training (Flat, HNSW) a new part holding only the new keys
(listed in the manifest's ``index.parts``, searched beside the earlier files), for a trained one
(IVF) a copy of the current index with the new keys added (no retraining, no re-embedding of old
chunks). Old files stay, so a reader holding version v keeps working, until ``collect_garbage``
(``retro-db gc``) deletes the files of versions no reader can still open (its docstring says how
that is decided).

The shard machinery (document iteration, fingerprints, the resumable shard writer, adding keys) is
shards.py, shared with the Ray engine (distributed.py), which is handed the per-shard work and
never calls back into this module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bm25 import BM25Index, chunk_texts
from .chunks import ChunkStore, token_dtype
from .database import Database
from .distributed import check_engine, ray_shard_stage
from .embedders import Embedder, embedder_options, embedder_spec, load_embedder
from .index import (
    appendable_index,
    apply_search_params,
    build_ondisk_ivf,
    build_ondisk_ivf_from_codes,
    choose_index,
    exact_search_blocks,
    new_index,
    read_index,
    search_lists_bounded,
    set_threads,
    train_index,
    training_size,
    write_index,
)
from .ingest import Document
from .manifest import (
    GC_RECORD,
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
from .shards import (
    NO_EMBEDDER,
    ShardWriter,
    add_shard_keys,
    iter_documents,
    shard_keys,
    text_fingerprint,
)
from .tokenizer import LMTokenizer, load_tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "SCHEMA_VERSION",
    "BuildStats",
    "GcResult",
    "add_documents",
    "build_database",
    "collect_garbage",
]

SCHEMA_VERSION = 1
#: the kinds of database keys (``retro-db build --keys``): frozen-BERT embeddings or BM25 terms
KEYS = ("dense", "bm25")
#: chunks detokenised at a time while a BM25 index is built
BM25_BLOCK = 16384
#: the trained, empty IVF index of an on-disk database (``add`` encodes new keys with it)
TRAINED_FILE = "index/trained.faiss"
#: under index/: a Ray build's encoded keys of an on-disk index (removed once the lists are filled)
CODES_DIR = "codes-v00001"


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
        received: documents the sources yielded (before either check).
    """

    already_present: int = 0
    duplicates: int = 0
    received: int = 0


def _unique_documents(
    docs: Iterable[Document], seen: set[str], present: set[str], stats: BuildStats
) -> Iterator[Document]:
    """``docs`` without those whose text is in ``present`` (the database) or was seen earlier."""
    for doc in docs:
        stats.received += 1
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
    db_dir: Path,
    base: dict[str, Any],
    shards: list[str],
    index_files: list[str],
    version: int,
    carried: dict[str, Any] | None = None,
    extra_files: list[str] | None = None,
) -> dict[str, Any]:
    """Write version ``version``'s manifest (versions/ and manifest.json, in that order).

    ``index_files``: the index file, then the parts added to it since (an ``add`` that stored
    only its growth); ``carried``: file entries of an earlier manifest reused as they are (the
    files were verified then and are never rewritten).
    """
    carried = carried or {}
    files: dict[str, Any] = {}
    chunks = documents = 0
    for s in shards:
        info = read_json(db_dir / "shards" / s / "shard.json")
        chunks += info["chunks"]
        documents += info["documents"]
        for name, entry in info["files"].items():
            files[f"shards/{s}/{name}"] = entry
        files[f"shards/{s}/shard.json"] = file_entry(db_dir / "shards" / s / "shard.json")
    for name in [*index_files, *(extra_files or [])]:  # extra: on-disk lists, trained index
        files[name] = carried[name] if name in carried else file_entry(db_dir / name)
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
    manifest["index"] = dict(manifest["index"], file=index_files[0])
    manifest["index"].pop("parts", None)
    if len(index_files) > 1:
        manifest["index"]["parts"] = list(index_files[1:])
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


#: what a database folder without a manifest may hold: an interrupted build's files
_BUILD_ENTRIES = {"shards", "index", "versions", ".lock"}


def _check_build_folder(db_dir: Path) -> None:
    """Refuse to build into an existing folder holding anything but an interrupted build's files."""
    if db_dir.exists() and not db_dir.is_dir():
        raise DatabaseError(
            f"{db_dir}: exists and is not a folder (expected a new database folder)"
        )
    if not db_dir.is_dir():
        return
    foreign = sorted(
        p.name
        for p in db_dir.iterdir()
        if p.name not in _BUILD_ENTRIES and not p.name.startswith(".tmp-")
    )
    if foreign:
        shown = ", ".join(foreign[:5]) + (
            f", ... ({len(foreign)} in all)" if len(foreign) > 5 else ""
        )
        raise DatabaseError(
            f"{db_dir}: not empty and not a database (holds {shown}); build into a new or empty "
            "folder"
        )


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
    max_memory: int | None = None,
    keys: str = "dense",
) -> Database:
    """Build a database from documents; resumable (re-run with the same arguments after a kill).

    A document whose text equals an earlier one's (:func:`text_fingerprint`) is skipped with a
    warning and counted in ``stats.duplicates``: duplicates would retrieve each other, defeating
    the same-document exclusion.

    Args:
        sources: Documents, paths (read with ``read_documents``) or iterables of either.
        out_dir: the database directory: new, empty, or an interrupted build of the same
            arguments (anything else in it is refused).
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
        max_memory: bytes the index may count on (None: ``index.available_memory()``); an index
            projected above half of it is built with its lists on disk (``index.choose_index``).
        keys: ``"dense"`` (the embedder's keys in a faiss index) or ``"bm25"`` (no embedder: the
            chunks' text indexed by ``bm25s``, bm25.py; local engine only, and ``embedder``,
            ``index_factory``, ``search_params`` and ``max_memory`` must be left unset).

    Returns:
        The built :class:`~retro_db.database.Database`, opened.
    """
    _check_keys(keys, embedder, index_factory, search_params, max_memory, engine)
    check_engine(engine, address, num_cpus, "build")
    db_dir = Path(out_dir)
    _check_new_database(db_dir)
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
            max_memory,
            keys,
        )
    return Database.open(db_dir, tokenizer=tok, embedder=emb, threads=threads)


def _check_keys(
    keys: str,
    embedder: Any,
    index_factory: str | None,
    search_params: dict[str, int] | None,
    max_memory: int | None,
    engine: str,
) -> None:
    """Refuse an unknown kind of keys, and options of dense keys given with BM25 keys."""
    if keys not in KEYS:
        raise ValueError(f"keys {keys!r}: expected one of {', '.join(KEYS)}")
    if keys != "bm25":
        return
    import importlib.util

    if importlib.util.find_spec("bm25s") is None:
        raise ImportError("keys 'bm25': needs the bm25s package (pip install 'retro-db[bm25]')")
    given = {
        "embedder": embedder,
        "index_factory": index_factory,
        "search_params (nprobe, ef_search)": search_params,
        "max_memory": max_memory,
    }
    wrong = [name for name, value in given.items() if value is not None]
    if wrong:
        raise ValueError(f"keys 'bm25': {', '.join(wrong)} apply to dense keys only")
    if engine != "local":
        raise ValueError(f"keys 'bm25': engine {engine!r}, expected 'local' (BM25 keys)")


def _check_new_database(db_dir: Path) -> None:
    """Refuse a folder that holds a database (grow it with ``add``) or anything but an
    interrupted build (:func:`_check_build_folder`)."""
    if (db_dir / MANIFEST_NAME).exists():
        raise DatabaseError(
            f"{db_dir / MANIFEST_NAME}: a database already exists here; grow it with "
            "`retro-db add` (Python: add_documents)"
        )
    _check_build_folder(db_dir)


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
    max_memory: int | None = None,
    keys: str = "dense",
) -> tuple[LMTokenizer, Embedder | None]:
    remove_stale_temp_files(db_dir)
    docs = _unique_documents(
        iter_documents(sources), set(), set(), stats if stats is not None else BuildStats()
    )
    set_threads(threads)
    tok = _resolve_tokenizer(tokenizer)
    if keys == "bm25":
        _build_bm25(docs, db_dir, tok, chunk_size, shard_chunks, progress)
        return tok, None
    emb, shards, embedder_entry, add_keys = _write_first_shards(
        docs, db_dir, tok, embedder, chunk_size, shard_chunks, batch_size, threads, progress, stage
    )
    dim = int(embedder_entry["dim"])
    n = sum(read_json(db_dir / "shards" / s / "shard.json")["chunks"] for s in shards)
    if n == 0:
        raise DatabaseError(f"{db_dir}: the sources held no documents with text")
    index_file = "index/v00001.faiss"
    index_entry, extra = _build_first_index(
        db_dir,
        shards,
        index_file,
        n,
        dim,
        index_factory,
        search_params,
        train_seed,
        progress,
        add_keys,
        max_memory,
        stage.encode_ondisk if stage is not None else None,
    )
    base = _base_manifest(tok, chunk_size, shard_chunks)
    base.update(embedder=dict(embedder_entry, key_dtype="float16"), index=index_entry)
    _write_version(db_dir, base, shards, [index_file], 1, extra_files=extra)
    logger.info("built %s: %d chunks, index %s", db_dir, n, index_entry["factory"])
    return tok, emb


def _base_manifest(tok: LMTokenizer, chunk_size: int, shard_chunks: int) -> dict[str, Any]:
    """The manifest fields every kind of keys shares."""
    return {
        "chunk_size": chunk_size,
        "shard_chunks": shard_chunks,
        "pad_id": tok.pad_id,
        "token_dtype": str(token_dtype(tok.vocab_size)),
        "tokenizer": tok.to_manifest(),
    }


def _build_bm25(
    docs: Iterable[Document],
    db_dir: Path,
    tok: LMTokenizer,
    chunk_size: int,
    shard_chunks: int,
    progress: bool,
) -> None:
    """A build with BM25 keys: shards without keys.npy, then the bm25s index, then version 1."""
    writer = ShardWriter(db_dir, tok, None, chunk_size, shard_chunks, 1, progress, 0)
    shards = writer.run(docs, 0, 0)
    n = sum(read_json(db_dir / "shards" / s / "shard.json")["chunks"] for s in shards)
    if n == 0:
        raise DatabaseError(f"{db_dir}: the sources held no documents with text")
    index_files, spec = write_bm25_index(db_dir, shards, tok, chunk_size, 1, progress)
    base = _base_manifest(tok, chunk_size, shard_chunks)
    base.update(
        keys=spec,
        embedder={"id": NO_EMBEDDER, "dim": 0, "spec": None},
        index={"factory": "bm25s", "search_params": {}, "metric": "bm25"},
    )
    _write_version(db_dir, base, shards, index_files[:1], 1, extra_files=index_files[1:])
    logger.info("built %s: %d chunks, BM25 keys", db_dir, n)


def write_bm25_index(
    db_dir: Path,
    shards: list[str],
    tok: LMTokenizer,
    chunk_size: int,
    version: int,
    progress: bool,
) -> tuple[list[str], dict[str, Any]]:
    """Index the text of every chunk of ``shards`` with bm25s into ``index/v{version}.bm25/``;
    return its files (the parameters file first: the manifest's ``index.file``) and the
    manifest's ``keys`` entry."""
    store = ChunkStore([db_dir / "shards" / s for s in shards], chunk_size, tok.pad_id)
    n = store.num_chunks

    def blocks() -> Iterator[list[str]]:
        for a in range(0, n, BM25_BLOCK):
            yield chunk_texts(tok, *store.chunk_tokens(np.arange(a, min(n, a + BM25_BLOCK))))

    index = BM25Index.build(blocks(), progress=progress, total=n)
    folder = f"index/v{version:05d}.bm25"
    names = sorted(index.save(db_dir / folder), key=lambda x: x != "params.index.json")
    return [f"{folder}/{x}" for x in names], index.spec()


def _write_first_shards(
    docs: Any,
    db_dir: Path,
    tok: LMTokenizer,
    embedder: Any,
    chunk_size: int,
    shard_chunks: int,
    batch_size: int,
    threads: int | None,
    progress: bool,
    stage: Any,
) -> tuple[Embedder | None, list[str], dict[str, Any], Callable[..., Any]]:
    """Write a new build's shards here (``stage`` None) or on Ray workers; return the embedder
    (None with Ray), the shard names, the manifest's embedder entry and the key adder."""
    if stage is None:
        emb, spec = _resolve_embedder(embedder, threads)
        dim = int(emb.dim)
        writer = ShardWriter(db_dir, tok, emb, chunk_size, shard_chunks, batch_size, progress, dim)
        shards = writer.run(docs, 0, 0)
        embedder_entry = {"id": emb.id, "dim": dim, "spec": spec, "options": embedder_options(emb)}
        return emb, shards, embedder_entry, add_shard_keys
    # Ray: its workers load the embedder and write the shards; `add_keys` runs on them too
    # (distributed.py). The embedder is not loaded here (Database creates it on first use).
    shards, embedder_entry, add_keys = stage.write_shards(
        docs, db_dir, tok, embedder, chunk_size, shard_chunks, batch_size, progress
    )
    return None, shards, embedder_entry, add_keys


def _build_first_index(
    db_dir: Path,
    shards: list[str],
    index_file: str,
    n: int,
    dim: int,
    index_factory: str | None,
    search_params: dict[str, int] | None,
    train_seed: int,
    progress: bool,
    add_keys: Callable[..., Any],
    max_memory: int | None,
    encode_ondisk: Callable[..., Any] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Choose, train, fill and write a new build's index; return the manifest's index entry and
    the extra files of an on-disk index (the trained template and the lists file).

    ``encode_ondisk`` (Ray): encodes the shards' keys for an on-disk index on the workers
    (distributed.py); without it this process encodes them."""
    # in memory (Flat/HNSW/IVF by size) unless it would not fit: then IVF lists on disk (issue 18)
    choice = choose_index(n, dim, index_factory, search_params, max_memory=max_memory)
    logger.info("%s", choice.reason)
    index_factory, params = choice.factory, choice.search_params
    (db_dir / "index").mkdir(exist_ok=True)
    index_entry: dict[str, Any] = {
        "factory": index_factory,
        "search_params": params,
        "metric": "l2",
    }
    extra: list[str] = []
    if choice.on_disk:
        trained = _train(db_dir, shards, index_factory, n, dim, train_seed, choice.train_size)
        write_index(trained, db_dir / TRAINED_FILE)
        lists = _fill_first_lists(db_dir, shards, trained, progress, encode_ondisk)
        extra = [TRAINED_FILE, f"index/{lists.name}"]
        params = _tune_nprobe(db_dir, shards, index_file, dim, params)
        index_entry.update(
            search_params=params,
            on_disk=True,
            lists=extra[1],
            trained=TRAINED_FILE,
            reason=choice.reason,
        )
    else:
        index = _train(db_dir, shards, index_factory, n, dim, train_seed, choice.train_size)
        index = add_keys(index, db_dir, shards, progress)
        write_index(index, db_dir / index_file)
        del index
    return index_entry, extra


def _fill_first_lists(
    db_dir: Path,
    shards: list[str],
    trained: Any,
    progress: bool,
    encode_ondisk: Callable[..., Any] | None,
) -> Path:
    """Write the on-disk lists of version 1 (``index/v00001.ivfdata``); return its path."""
    if encode_ondisk is None:
        _, lists = build_ondisk_ivf(
            trained,
            lambda: shard_blocks(db_dir, shards, 0),  # two passes: sizes, then codes
            db_dir / "index",
            "v00001",
            progress=progress,
            total_bytes=_keys_bytes(db_dir, shards),
        )
        return lists
    code_dir = db_dir / "index" / CODES_DIR
    shutil.rmtree(code_dir, ignore_errors=True)  # left by a killed build: encoded again
    code_dir.mkdir(parents=True)
    try:
        coded, sizes = encode_ondisk(db_dir / TRAINED_FILE, db_dir, shards, code_dir, progress)
        _, lists = build_ondisk_ivf_from_codes(
            trained, coded, sizes, db_dir / "index", "v00001", progress=progress
        )
    finally:
        shutil.rmtree(code_dir, ignore_errors=True)
    return lists


#: recall@10 against exact search that an on-disk build tunes nprobe for (on its own sample)
TUNE_RECALL = 0.95


def _tune_nprobe(
    db_dir: Path, shards: list[str], index_file: str, dim: int, params: dict[str, int]
) -> dict[str, int]:
    """The smallest nprobe (doubling from ``params``'s) whose recall@10 against exact search, on
    a seeded sample of 200 keys other than ``info``'s, reaches ``TUNE_RECALL`` (or all lists).
    Exact search streams over the key shards (memory flat)."""
    import faiss

    index = read_index(db_dir / index_file, dim=dim, on_disk=True)
    nlist = faiss.extract_index_ivf(index).nlist
    n = index.ntotal
    ids = np.sort(np.random.default_rng(12345).choice(n, size=min(200, n), replace=False))
    queries = np.empty((len(ids), dim), dtype=np.float32)
    start, j = 0, 0
    for keys in shard_keys(db_dir, shards):
        sel = ids[(ids >= start) & (ids < start + len(keys))]
        queries[j : j + len(sel)] = keys[sel - start]
        j += len(sel)
        start += len(keys)
    k = min(10, n)
    _, truth = exact_search_blocks(shard_keys(db_dir, shards), queries, k)
    nprobe = int(params.get("nprobe", 1))
    while True:
        apply_search_params(index, dict(params, nprobe=nprobe))
        # one query at a time, its lists a few MB at a time, their pages dropped after each
        got = search_lists_bounded(index, queries, k)[1]
        hits = sum(len(set(t) & set(g)) for t, g in zip(truth, got, strict=True))
        recall = hits / max(1, truth.size)
        logger.info(
            "on-disk index: nprobe %d of %d lists, recall@%d %.3f", nprobe, nlist, k, recall
        )
        if recall >= TUNE_RECALL or nprobe >= nlist:
            return dict(params, nprobe=nprobe)
        nprobe = min(nlist, 2 * nprobe)


def _keys_bytes(db_dir: Path, shards: list[str]) -> int:
    return sum(int(k.nbytes) for k in shard_keys(db_dir, shards))


def shard_blocks(db_dir: Path, shards: list[str], first: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first chunk id, keys memmap) of each shard in order, numbering from ``first``."""
    start = first
    for keys in shard_keys(db_dir, shards):
        yield start, keys
        start += len(keys)


def _train(
    db_dir: Path,
    shards: list[str],
    factory: str,
    n: int,
    dim: int,
    seed: int,
    size: int | None = None,
):
    import faiss

    probe = faiss.index_factory(dim, factory)
    if probe.is_trained:
        return probe
    s = training_size(factory, n) if not size else min(n, int(size))
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
    # faiss trains in one call, without progress: the log gives its size instead
    logger.info(
        "training %s on %d of %d keys (%.1f MB of float32)", factory, s, n, train.nbytes / 2**20
    )
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
    and counted in ``stats.duplicates``. An index file that is copied (IVF) is verified (sha256).

    The tokenizer and embedder are the database's own (the embedder is re-created from the
    manifest's spec unless one is passed; its id and dimension must match the manifest's). New
    chunks get ids after the existing ones; their keys go into a new index part (an index that
    needs no training: Flat, HNSW) or a copy of the index (IVF; no retraining), and
    ``manifest.json`` moves to version v+1; the files of version v are untouched. Sources with
    no document at all are an error (as for a build); documents all already present are not.

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
    emb = _add_embedder(old, embedder)
    if shard_chunks is None:
        shard_chunks = int(man.get("shard_chunks", 65536))
    writer = ShardWriter(
        db_dir, old.tokenizer, emb, old.chunk_size, shard_chunks, batch_size, progress, old.dim
    )
    present = _present_fingerprints(old, db_dir)
    received = stats.received
    docs = _unique_documents(iter_documents(sources), set(), present, stats)
    new = writer.run(docs, len(man["shards"]), old.num_documents)
    if not new:
        if stats.received == received:
            raise DatabaseError(
                f"{db_dir}: the sources held no documents with text (nothing added)"
            )
        logger.info("retro-db add: nothing new to add")
        return old
    version = int(man["version"]) + 1
    index_files, extra = _grow_index(db_dir, old, new, version, progress)
    base = {k: v for k, v in man.items() if k not in ("files", "shards", "counts", "version")}
    if extra and old.keys_kind == "dense":
        base["index"] = dict(base["index"], lists=extra[1])
    _write_version(
        db_dir,
        base,
        list(man["shards"]) + new,
        index_files,
        version,
        carried=man["files"],
        extra_files=extra,
    )
    logger.info("added %d shards to %s: version %d", len(new), db_dir, version)
    return Database.open(db_dir, tokenizer=old.tokenizer, embedder=emb, threads=threads)


def _add_embedder(old: Database, embedder: Any) -> Embedder | None:
    """The embedder of an ``add``: the database's own (re-created from its spec unless one is
    given, checked against the manifest); None for BM25 keys (where giving one is an error)."""
    if old.keys_kind == "bm25":
        if embedder is not None:
            raise ValueError(f"{old.path}: the database has BM25 keys; an embedder does not apply")
        return None
    if embedder is None or not isinstance(embedder, str):
        emb = old.embedder
    else:
        opts = {} if embedder.startswith("hash:") else old.manifest["embedder"].get("options", {})
        emb = load_embedder(embedder, **opts)
    old.check_embedder(emb)
    return emb


def _present_fingerprints(old: Database, db_dir: Path) -> set[str]:
    """The text fingerprints of the documents already in ``old`` (a warning counts those of an
    older build that carry none)."""
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
    return present


def _grow_index(
    db_dir: Path, old: Database, new: list[str], version: int, progress: bool
) -> tuple[list[str], list[str]]:
    """Write version ``version``'s index with the keys of the ``new`` shards added; return the
    index files it names and the extra files of an on-disk index."""
    man = old.manifest
    if old.keys_kind == "bm25":  # BM25's idf and avgdl change with every chunk: a new index
        shards = list(man["shards"]) + new
        files, _ = write_bm25_index(
            db_dir, shards, old.tokenizer, old.chunk_size, version, progress
        )
        return files[:1], files[1:]
    index_file = f"index/v{version:05d}.faiss"
    factory = man["index"]["factory"]
    extra: list[str] = []
    if man["index"].get("on_disk"):
        # on-disk lists (issue 18): a new lists file, the current lists (read-only, memory-mapped)
        # copied in list by list, then the new keys' codes after them (index.build_ondisk_ivf);
        # nothing of the old version is modified
        trained_name = man["index"]["trained"]
        check_files(db_dir, {trained_name: man["files"][trained_name]}, verify=True)
        template = read_index(db_dir / trained_name, mmap=False, dim=old.dim)
        _, lists = build_ondisk_ivf(
            template,
            shard_blocks(db_dir, new, old.num_chunks),
            db_dir / "index",
            f"v{version:05d}",
            base=old.index,
            progress=progress,
            total_bytes=_keys_bytes(db_dir, new),
        )
        index_files = [index_file]
        extra = [trained_name, f"index/{lists.name}"]
    elif appendable_index(factory, old.dim):
        # the growth alone: a fresh index of the same factory holding only the new keys, searched
        # beside the earlier files (Database.open); nothing of the old index is copied
        index = add_shard_keys(new_index(factory, old.dim), db_dir, new, progress=False)
        write_index(index, db_dir / index_file)
        index_files = [man["index"]["file"], *man["index"].get("parts", []), index_file]
    else:  # trained indexes (IVF): the new keys go into a verified copy of the whole index
        index_name = man["index"]["file"]
        check_files(db_dir, {index_name: man["files"][index_name]}, verify=True)
        index = read_index(db_dir / index_name, mmap=False, dim=old.dim)
        apply_search_params(index, man["index"]["search_params"])
        index = add_shard_keys(index, db_dir, new, progress=False)
        write_index(index, db_dir / index_file)
        index_files = [index_file]
    return index_files, extra


@dataclass
class GcResult:
    """What :func:`collect_garbage` deleted (or would delete with ``dry_run``).

    Attributes:
        removed: the deleted files, relative to the database directory.
        bytes_freed: their total size.
        versions_removed: versions whose files are now gone (no longer openable).
        versions_kept: versions still openable.
    """

    removed: list[str]
    bytes_freed: int
    versions_removed: list[int]
    versions_kept: list[int]


def collect_garbage(
    db_dir: str | os.PathLike[str],
    *,
    grace: float = 3600.0,
    keep: int = 1,
    dry_run: bool = False,
    now: float | None = None,
) -> GcResult:
    """Delete the files of old versions that no reader can still open (``retro-db gc``).

    Which versions stay openable:

    * the current version (``manifest.json``) and the ``keep - 1`` versions before it;
    * every version superseded less than ``grace`` seconds ago. A version v is superseded when
      version v+1 is written; the time is the modification time of ``versions/v{v+1}.json``.
      Readers take no lock: a process that read ``manifest.json`` just before an ``add`` opens
      that version's files a moment later, and ``grace`` covers that window (and any reader
      that opens an older version by number within it).

    A process that has already opened a version keeps working after its files are deleted (the
    index and the arrays are memory-mapped or read at open; on POSIX an unlinked file stays
    readable while mapped). Files shared with a kept version (all shards: versions only append
    shards) are never deleted, so in practice gc deletes old versions' index files, plus index
    files no version names (left by an ``add`` killed before its manifest). Version manifests
    (``versions/v*.json``, small) stay, so the chain of version checksums still verifies; the
    removed versions are recorded in ``gc.json`` and ``Database.open(version=v)`` refuses them
    with a one-line error. gc holds the writer lock: it never runs beside a build or add.

    Args:
        db_dir: the database directory.
        grace: seconds a superseded version stays openable.
        keep: newest versions kept whatever their age (>= 1: the current one).
        dry_run: only report what would be deleted.
        now: the current time (seconds since the epoch; default ``time.time()``).
    """
    import time

    if keep < 1:
        raise ValueError(f"keep = {keep}: expected >= 1 (the current version is always kept)")
    if not grace >= 0:
        raise ValueError(f"grace = {grace}: expected seconds >= 0")
    db_dir = Path(db_dir)
    now = time.time() if now is None else now
    read_json(db_dir / MANIFEST_NAME)  # a one-line error before any lock file is made
    with writer_lock(db_dir, "build, add or gc") if not dry_run else contextlib.nullcontext():
        current = Database.open(db_dir, check_values=False)
        record_path = db_dir / GC_RECORD
        record = read_json(record_path) if record_path.is_file() else {"removed_versions": {}}
        drop, kept, removed = _gc_plan(db_dir, current, record, keep, grace, now)
        freed = sum((db_dir / n).stat().st_size for n in removed)
        if not dry_run:
            if drop:  # recorded first: a reader asking for a removed version gets a clear error
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
                removed_versions = dict(record.get("removed_versions", {}))
                for v in drop:
                    removed_versions[str(v)] = {"at": stamp}
                atomic_write_json(record_path, {"removed_versions": removed_versions})
            for n in removed:
                (db_dir / n).unlink()
                logger.info("gc: deleted %s", db_dir / n)
            for folder in {(db_dir / n).parent for n in removed} - {db_dir / "index"}:
                if folder.is_dir() and not any(folder.iterdir()):  # an emptied BM25 folder
                    folder.rmdir()
    return GcResult(removed, freed, drop, sorted(kept))


def _gc_plan(
    db_dir: Path,
    current: Database,
    record: dict[str, Any],
    keep: int,
    grace: float,
    now: float,
) -> tuple[list[int], set[int], list[str]]:
    """What gc removes (:func:`collect_garbage`): the versions dropped, the versions kept and
    the files to delete (relative to ``db_dir``)."""
    version = current.version
    gone = {int(v) for v in record.get("removed_versions", {})}
    manifests: dict[int, dict[str, Any]] = {version: current.manifest}
    for v in range(1, version):
        p = db_dir / "versions" / f"v{v:05d}.json"
        if v not in gone and p.is_file():
            manifests[v] = read_json(p)
    kept = set(range(max(1, version - keep + 1), version + 1))
    for v in manifests:
        nxt = db_dir / "versions" / f"v{v + 1:05d}.json"
        superseded = nxt.stat().st_mtime if nxt.is_file() else now
        if now - superseded < grace:
            kept.add(v)
    kept &= set(manifests)
    drop = sorted(set(manifests) - kept)
    keep_files = {name for v in kept for name in manifests[v]["files"]}
    named = {name for m in manifests.values() for name in m["files"]}
    candidates = {name for v in drop for name in manifests[v]["files"]} - keep_files
    index_dir = db_dir / "index"
    if index_dir.is_dir():  # index files of no version (an add killed before its manifest)
        # (a BM25 index is a folder, index/vNNNNN.bm25/, of several files)
        candidates |= {
            rel
            for p in index_dir.rglob("*")
            if p.is_file()
            and (rel := p.relative_to(db_dir).as_posix()) not in named
            and not any(part.startswith(".") for part in p.relative_to(index_dir).parts)
        }
    removed = sorted(n for n in candidates if (db_dir / n).is_file())
    # a dropped version whose every file a kept version still names stays openable
    drop = [v for v in drop if set(manifests[v]["files"]) - keep_files]
    kept = set(manifests) - set(drop)
    return drop, kept, removed
