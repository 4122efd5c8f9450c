"""Precomputing neighbours for training: writes the training dataset format (API.md, DESIGN.md 2.2).

The corpus is either the database itself (``corpus=None``: its chunks, with the keys already stored,
so nothing is re-embedded) or a stream of Documents (tokenised with the database's tokenizer and
embedded with its embedder). A database with BM25 keys (``retro-db build --keys bm25``) is queried
with each chunk's text instead (``Database.query_keys``): the output has the same format. A neighbour never comes from the chunk's own document: in the first
case the chunk's database document, in the second the database document with the same ``doc_id``
string (if the database holds one). ``doc_ids`` are database document indices where the corpus
document is in the database (matched by ``doc_id``), else D + a running count (D = database
documents), so they never collide with a database document the chunk is not.

Resumable: work is done in shards written to ``out_dir/parts/pNNNNN/`` (a ``done.json`` last); a
restart skips complete parts. ``parts/params.json`` records the run's parameters (k, shard_chunks,
the corpus kind, the database manifest's sha256): a restart with other ones is refused. The run
holds the writer lock on ``out_dir/.lock`` (a second run on the same output fails at once), and the
database is verified (sha256 of every file, read once) before anything is computed from it. The
final arrays are assembled from the parts (``manifest.atomic_file``: temporary name, fsync,
rename), ``manifest.json`` is written last, then the parts are removed. The Ray engine
(distributed.py) is handed :func:`run_part`, the work of one part.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .chunks import chunk_document
from .database import Database
from .distributed import check_engine, ray_part_runner
from .manifest import (
    MANIFEST_NAME,
    DatabaseError,
    atomic_file,
    atomic_save_npy,
    atomic_write_json,
    file_entry,
    json_checksum,
    read_json,
    remove_stale_temp_files,
    writer_lock,
)
from .shards import iter_documents, update_source_fingerprint

logger = logging.getLogger(__name__)

__all__ = ["DATASET_FILES", "write_neighbours"]

DATASET_FILES = (
    "tokens.npy",
    "lengths.npy",
    "doc_ids.npy",
    "neighbours.npy",
    "neighbour_lengths.npy",
    "neighbour_ids.npy",
    "neighbour_distances.npy",
)


def _write_part(
    d: Path,
    db: Database,
    tokens: np.ndarray,
    lengths: np.ndarray,
    doc_ids: np.ndarray,
    keys: np.ndarray,
    exclude: np.ndarray,
    k: int,
    info: dict[str, Any],
) -> None:
    nb = db.neighbours_of_keys(keys, k, exclude)
    d.mkdir(parents=True, exist_ok=True)
    arrays = {
        "tokens.npy": tokens.astype(db.store.dtype),
        "lengths.npy": lengths.astype(np.int32),
        "doc_ids.npy": doc_ids.astype(np.int64),
        "neighbours.npy": nb.tokens.astype(db.store.dtype),
        "neighbour_lengths.npy": nb.lengths.astype(np.int32),
        "neighbour_ids.npy": nb.chunk_ids.astype(np.int64),
        "neighbour_distances.npy": nb.distances.astype(np.float32),
    }
    for name, a in arrays.items():
        atomic_save_npy(d / name, a)
    atomic_write_json(d / "done.json", dict(info, chunks=len(tokens)))


def _self_jobs(db: Database, parts: Path, shard_chunks: int, progress: bool) -> Iterator[tuple]:
    n = db.num_chunks
    with tqdm(total=n, desc="neighbours", unit="chunk", disable=not progress) as bar:
        for p, start in enumerate(range(0, n, shard_chunks)):
            d = parts / f"p{p:05d}"
            stop = int(min(n, start + shard_chunks))
            done = (d / "done.json").is_file()
            yield d, None if done else {"start": int(start), "stop": stop}
            bar.update(stop - start)  # the part is computed (or queued) once the runner asks again


def _array_jobs(
    db: Database, chunks: dict, parts: Path, shard_chunks: int, progress: bool
) -> Iterator[tuple]:
    tokens = np.asarray(chunks["tokens"])
    n = len(tokens)
    lengths = np.asarray(chunks.get("lengths", np.full(n, tokens.shape[1])), dtype=np.int32)
    doc_ids = np.asarray(chunks["doc_ids"], dtype=np.int64)
    if tokens.ndim != 2 or tokens.shape[1] != db.chunk_size:
        raise ValueError(f"chunks['tokens']: expected [N, m={db.chunk_size}], got {tokens.shape}")
    if lengths.shape != (n,) or doc_ids.shape != (n,):
        raise ValueError(f"chunks['lengths'] and chunks['doc_ids']: expected [{n}]")
    with tqdm(total=n, desc="neighbours", unit="chunk", disable=not progress) as bar:
        for p, start in enumerate(range(0, n, shard_chunks)):
            d = parts / f"p{p:05d}"
            sl = slice(start, min(n, start + shard_chunks))
            if (d / "done.json").is_file():
                yield d, None
            else:
                job = {
                    "tokens": tokens[sl],
                    "lengths": lengths[sl],
                    "doc_ids": doc_ids[sl],
                    "exclude": doc_ids[sl],
                    "info": {"start": start},
                }
                yield d, job
            bar.update(sl.stop - start)


def _corpus_jobs(
    db: Database, docs: Iterator, parts: Path, shard_chunks: int, progress: bool
) -> Iterator[tuple]:
    m = db.chunk_size
    p = 0
    # A corpus document takes the id of the database document with the same doc_id string (so
    # "own document" means the same thing as in the database), else D + a running count.
    used: set[int] = set()
    fresh = 0
    while (parts / f"p{p:05d}" / "done.json").is_file():
        info = read_json(parts / f"p{p:05d}" / "done.json")
        h = hashlib.sha256()
        for _ in range(info["docs_consumed"]):
            doc = next(docs, None)
            if doc is None:
                raise DatabaseError(f"{parts / f'p{p:05d}'}: the corpus now holds fewer documents")
            update_source_fingerprint(h, doc)
        if h.hexdigest() != info["source_sha256"]:
            raise DatabaseError(
                f"{parts / f'p{p:05d}' / 'done.json'}: left by a run over another corpus; "
                "delete the output folder or pass the same corpus"
            )
        yield parts / f"p{p:05d}", None
        done_ids = np.unique(np.load(parts / f"p{p:05d}" / "doc_ids.npy", allow_pickle=False))
        used.update(int(x) for x in done_ids[done_ids < db.num_documents])
        fresh += int((done_ids >= db.num_documents).sum())
        p += 1
    # a stream of documents of unknown length: the bar counts their text (bytes, and a rate)
    bar = tqdm(desc="neighbours (text)", unit="B", unit_scale=True, disable=not progress)
    exhausted = False
    while not exhausted:
        toks, lens, dids, excl = [], [], [], []
        n_chunks = consumed = documents = 0
        h = hashlib.sha256()
        while n_chunks < shard_chunks:
            doc = next(docs, None)
            if doc is None:
                exhausted = True
                break
            consumed += 1
            bar.update(len(doc.text.encode("utf-8")))
            update_source_fingerprint(h, doc)
            ids = db.tokenizer.encode_arrays([doc.text])[0]  # long texts in windows
            if not len(ids):
                continue
            t, n = chunk_document(ids, m, db.pad_id, db.store.dtype)
            toks.append(t)
            lens.append(n)
            in_db = db.document_index(doc.doc_id)
            if in_db >= 0 and in_db not in used:
                used.add(in_db)
                doc_index = in_db
            else:
                doc_index = db.num_documents + fresh
                fresh += 1
            dids.append(np.full(len(t), doc_index, np.int64))
            excl.append(np.full(len(t), in_db, np.int64))
            documents += 1
            n_chunks += len(t)
        if not consumed:
            break
        if toks:
            tokens, lengths = np.concatenate(toks), np.concatenate(lens)
            doc_ids, exclude = np.concatenate(dids), np.concatenate(excl)
        else:
            tokens = np.empty((0, m), db.store.dtype)
            lengths = np.empty(0, np.int32)
            doc_ids = exclude = np.empty(0, np.int64)
        info = {"docs_consumed": consumed, "documents": documents, "source_sha256": h.hexdigest()}
        job = {"tokens": tokens, "lengths": lengths, "doc_ids": doc_ids, "exclude": exclude}
        yield parts / f"p{p:05d}", dict(job, info=info)
        p += 1
    bar.close()


def part_jobs(
    db: Database, corpus: Any, parts: Path, shard_chunks: int, progress: bool
) -> Iterator[tuple[Path, dict[str, Any] | None]]:
    """The parts of a neighbours run in order: (part directory, job), job None if already done.

    A job is ``{"start", "stop"}`` (the database's own chunks, stored keys) or ``{"tokens" [n, m],
    "lengths" [n], "doc_ids" [n], "exclude" [n], "info"}`` (chunks to embed); :func:`run_part`
    computes one, on any process that has the database open.
    """
    if corpus is None:
        return _self_jobs(db, parts, shard_chunks, progress)
    if isinstance(corpus, dict):
        return _array_jobs(db, corpus, parts, shard_chunks, progress)
    return _corpus_jobs(db, iter_documents(corpus), parts, shard_chunks, progress)


def run_part(db: Database, d: Path, job: dict[str, Any], k: int, batch_size: int) -> None:
    """Compute one part of :func:`part_jobs` (keys, k neighbours) and write it to ``d``."""
    if "tokens" not in job:
        ids = np.arange(job["start"], job["stop"], dtype=np.int64)
        tokens, lengths = db.chunk_tokens(ids)
        docs = db.store.doc_ids_of(ids)
        _write_part(d, db, tokens, lengths, docs, db.keys(ids), docs, k, {"start": job["start"]})
    else:
        tokens, lengths = job["tokens"], job["lengths"]
        if len(tokens):  # embedded (dense keys) or detokenised (BM25 keys)
            keys = db.query_keys(tokens, lengths, batch_size=batch_size)
        else:
            keys = db.keys(np.empty(0, np.int64))
        _write_part(d, db, tokens, lengths, job["doc_ids"], keys, job["exclude"], k, job["info"])
    db.drop_index_pages()  # on-disk lists: memory flat from part to part


def _concat(parts: list[Path], name: str, out: Path) -> None:
    arrays = [np.load(p / name, mmap_mode="r", allow_pickle=False) for p in parts]
    shape = (sum(len(a) for a in arrays), *arrays[0].shape[1:])
    with atomic_file(out) as tmp:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=arrays[0].dtype, shape=shape)
        i = 0
        for a in arrays:
            mm[i : i + len(a)] = a
            i += len(a)
        mm.flush()
        del mm


def write_neighbours(
    db: Database | str | os.PathLike[str],
    corpus: Any = None,
    out_dir: str | os.PathLike[str] = "neighbours",
    k: int = 2,
    *,
    shard_chunks: int = 16384,
    batch_size: int = 64,
    progress: bool = True,
    engine: str = "local",
    address: str | None = None,
    num_cpus: int | None = None,
    threads: int | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Write the training dataset (chunks of ``corpus`` and their k neighbours) to ``out_dir``.

    Args:
        db: an open Database or its path.
        corpus: None (the database's own chunks, with their stored keys); Documents / paths /
            iterables of them; or already chunked tokens ``{"tokens": [N, m], "lengths": [N],
            "doc_ids": [N]}`` whose doc_ids are database document indices (the exclusion) or
            ids no database document has.
        out_dir: output directory (resumes if it holds an interrupted run's parts).
        k: neighbours per chunk.
        shard_chunks: chunks per part (the unit of resumption).
        engine: ``"local"`` (parts one after the other here) or ``"ray"`` (parts computed by
            the workers of a Ray cluster, distributed.py, extra [ray]); the output is the same.
        address, num_cpus: the Ray cluster and its CPUs to use (Ray engine only).
        threads: faiss/embedder threads (when ``db`` is a path); Ray: CPUs per worker (default 1).
        verify: check the sha256 of every database file first (False: only the cheap checks of
            every open), so that a corrupted database never becomes a training dataset.

    Raises:
        DatabaseError: a corrupted database, another run holding ``out_dir``, a finished
            dataset there, or an interrupted run there with other parameters.

    Returns:
        The manifest written (tokens [N, m], neighbours [N, k, r=2m], ...; see API.md).
    """
    check_engine(engine, address, num_cpus, "neighbours")
    runner = _run_parts
    if engine == "ray":
        runner = ray_part_runner(Path(out_dir), progress, address, num_cpus, threads, run_part)
    if not isinstance(db, Database):
        db = Database.open(db, threads=threads if engine == "local" else None)
    if verify:
        db.verify()
    out = Path(out_dir)
    if (out / MANIFEST_NAME).is_file():
        raise DatabaseError(f"{out / MANIFEST_NAME}: a dataset already exists here")
    with writer_lock(out, what="neighbours run", remove_when_done=True):
        if (out / MANIFEST_NAME).is_file():
            raise DatabaseError(f"{out / MANIFEST_NAME}: a dataset already exists here")
        remove_stale_temp_files(out)
        parts_dir = out / "parts"
        _check_params(db, corpus, parts_dir, k, shard_chunks)
        # The Ray runner shows its own progress (over finished parts).
        jobs = part_jobs(db, corpus, parts_dir, shard_chunks, progress and engine == "local")
        parts = runner(db, jobs, k, batch_size)
        return finish_dataset(db, out, parts, k)


def _check_params(db: Database, corpus: Any, parts_dir: Path, k: int, shard_chunks: int) -> None:
    """Record the run's parameters in ``parts/params.json``; refuse a resume with other ones."""
    kind = "database" if corpus is None else "chunks" if isinstance(corpus, dict) else "documents"
    params = {
        "k": int(k),
        "shard_chunks": int(shard_chunks),
        "corpus": kind,
        "database": db.id,
        "database_manifest_sha256": db.manifest_sha256,
    }
    path = parts_dir / "params.json"
    if path.is_file():
        old = read_json(path)
        diff = sorted(key for key in params if old.get(key) != params[key])
        if diff:
            shown = ", ".join(f"{key} {old.get(key)!r} -> {params[key]!r}" for key in diff)
            raise DatabaseError(
                f"{path}: an interrupted run here used other parameters ({shown}); resume with "
                "the same ones or delete the output folder"
            )
        return
    if parts_dir.is_dir() and any(parts_dir.iterdir()):
        raise DatabaseError(
            f"{parts_dir}: parts of an interrupted run without params.json (an older version); "
            "delete the output folder"
        )
    parts_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, params)


def _run_parts(db: Database, jobs: Iterator, k: int, batch_size: int) -> list[Path]:
    parts = []
    for d, job in jobs:
        if job is not None:
            run_part(db, d, job, k, batch_size)
        parts.append(d)
    return parts


def finish_dataset(db: Database, out: Path, parts: list[Path], k: int) -> dict[str, Any]:
    """Concatenate the complete ``parts`` into the dataset arrays, write ``manifest.json`` last."""
    if not parts:
        raise DatabaseError(f"{out}: the corpus held no documents")
    for name in DATASET_FILES:
        _concat(parts, name, out / name)
    doc_ids = np.load(out / "doc_ids.npy", mmap_mode="r", allow_pickle=False)
    n_docs = 0  # document boundaries, counted block by block (memory flat in N)
    for a in range(0, len(doc_ids), 1 << 20):
        block = np.asarray(doc_ids[max(0, a - 1) : a + (1 << 20)])
        n_docs += int(np.count_nonzero(np.diff(block)))
    n_docs += 1 if len(doc_ids) else 0
    tok = db.manifest["tokenizer"]
    manifest = {
        "format": "retro-dataset",
        "version": 1,
        "chunk_size": db.chunk_size,
        "num_neighbours": int(k),
        "neighbour_len": 2 * db.chunk_size,
        "tokenizer_id": tok["id"],
        "vocab_size": int(tok["vocab_size"]),
        "pad_id": db.pad_id,
        "source_db": {"id": db.id, "manifest_sha256": db.manifest_sha256},
        "counts": {"chunks": int(len(doc_ids)), "documents": n_docs},
        "files": {name: file_entry(out / name) for name in DATASET_FILES},
    }
    manifest["checksum"] = json_checksum(manifest)  # retro_core.data checks it at every open
    atomic_write_json(out / MANIFEST_NAME, manifest)
    shutil.rmtree(out / "parts", ignore_errors=True)
    logger.info("wrote %d chunks with k=%d neighbours to %s", len(doc_ids), k, out)
    return manifest
