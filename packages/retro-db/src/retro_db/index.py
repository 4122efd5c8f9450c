"""The faiss index over chunk keys (squared L2, as in the paper).

Default index by database size N (keys of dimension d, all-MiniLM-L6-v2: d = 384):

- N < ``FLAT_THRESHOLD`` (200k): ``"Flat"``, exact search. 200k x 384 float32 is 300 MB and a
  brute-force query costs N*d = 77M multiply-adds (~10 ms on one core); exact results, no training,
  and adding keys later changes nothing about its quality.
- N < ``HNSW_THRESHOLD`` (2M): ``"HNSW32,Flat"``. No training; recall@10 above 0.95 at efSearch=128
  on sentence embeddings; queries in well under 1 ms. Costs the full float32 vectors plus ~256 bytes
  of graph per key (2M x 1.8 KB = 3.6 GB), which is the limit that moves us to compression.
- larger: ``"IVF{nlist},PQ{d/2}x4fs,Refine(SQ8)"``, nlist ~ 4 sqrt(N) (a power of two), 4-bit
  fast-scan PQ: one byte per 4 dims (96 bytes a key at d = 384, 16x smaller than float32) so
  billions of chunks fit in RAM or mmap, with the k_factor_rf = 10 x k best candidates re-ranked
  on 8-bit scalar-quantised keys (d bytes a key, ~520 bytes a key in all). Without the re-rank
  the fast-scan codes alone never reached recall@10 0.9 on real MiniLM keys (0.75 at any nprobe,
  benchmarks/bench_search.py at 100k keys); with it, 0.91 at nprobe 24 of 1024 lists, the fastest
  setting measured (1.1x ScaNN). Fast-scan rather than 8-bit ``PQ{d/4}`` of the same size: on this project's
  machines training 8-bit PQ (256 centroids per sub-quantizer) took minutes where 4-bit took
  seconds, and its SIMD scan answered ~2-5x more queries/s at similar recall (benchmarks/
  bench_search.py). nprobe = nlist/32 trades recall for speed and is kept in the manifest. Trained
  on a seeded sample of 64 x nlist keys (at least 65536; faiss wants >= 39 x nlist for k-means).

Search parameters (``nprobe``, ``efSearch``) are stored in the database manifest and applied with
``faiss.ParameterSpace``. Indexes are read with ``IO_FLAG_MMAP | IO_FLAG_READ_ONLY`` (faiss maps the
codes of Flat/IVF lists from the file instead of copying them).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .manifest import TMP_PREFIX, DatabaseError, atomic_file

logger = logging.getLogger(__name__)

__all__ = [
    "FLAT_THRESHOLD",
    "HNSW_THRESHOLD",
    "MEMORY_SHARE",
    "IndexChoice",
    "appendable_index",
    "apply_search_params",
    "available_memory",
    "build_ondisk_ivf",
    "choose_index",
    "combine_indexes",
    "default_factory",
    "drop_mapped_pages",
    "exact_search",
    "exact_search_blocks",
    "index_bytes_per_key",
    "new_index",
    "ondisk_capable",
    "ondisk_factory",
    "ondisk_lists_file",
    "read_index",
    "recall_at_k",
    "set_threads",
    "train_index",
    "training_size",
    "write_index",
]

FLAT_THRESHOLD = 200_000
HNSW_THRESHOLD = 2_000_000


def set_threads(threads: int | None) -> None:
    """Set faiss's OpenMP threads explicitly (None: leave faiss's default)."""
    import faiss

    if threads is not None:
        faiss.omp_set_num_threads(int(threads))


def default_factory(n: int, d: int) -> tuple[str, dict[str, int]]:
    """Default ``index_factory`` string and search parameters for N = ``n`` keys of dimension ``d``.

    See the module docstring for the reasons behind each threshold.
    """
    if n < FLAT_THRESHOLD:
        return "Flat", {}
    if n < HNSW_THRESHOLD:
        return "HNSW32,Flat", {"efSearch": 128}
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    m = d // 2 if d % 2 == 0 else d
    return f"IVF{nlist},PQ{m}x4fs,Refine(SQ8)", {"nprobe": max(1, nlist // 32), "k_factor_rf": 10}


def training_size(factory: str, n: int) -> int:
    """How many keys to train ``factory`` on: all of them, capped at 64 x nlist (or 65536)."""
    nlist = 0
    for part in factory.split(","):
        if part.startswith("IVF"):
            digits = "".join(ch for ch in part[3:] if ch.isdigit())
            nlist = int(digits) if digits else 0
    return min(n, max(64 * nlist, 65536))


def new_index(factory: str, d: int, metric: str = "l2"):  # -> faiss.Index
    """An empty index from ``factory`` for keys of dimension ``d`` (untrained)."""
    import faiss

    return faiss.index_factory(
        d, factory, faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    )


def appendable_index(factory: str, d: int) -> bool:
    """True when ``factory`` needs no training (Flat, HNSW over Flat): an ``add`` can then store
    its new keys as a separate part (:func:`combine_indexes`) instead of a copy of the whole index.
    A trained index (IVF, PQ) is grown in a copy, so that the new keys share its training."""
    return bool(new_index(factory, d).is_trained)


def combine_indexes(parts: list):  # -> faiss.Index
    """One index searching ``parts`` (each numbered from 0) as if their keys were added in order.

    ``faiss.IndexShards`` with successive ids: part i's ids are offset by the sizes of the parts
    before it, and the k best of all parts are returned (ties keep the earlier part first).
    """
    import faiss

    if len(parts) == 1:
        return parts[0]
    combined = faiss.IndexShards(parts[0].d, False, True)
    for p in parts:
        combined.add_shard(p)  # the Python wrapper keeps a reference to each part
    return combined


def apply_search_params(index, params: dict[str, int | float]) -> None:
    """Set search parameters such as ``nprobe`` or ``efSearch`` on ``index``."""
    import faiss

    if params:
        text = ",".join(f"{k}={v}" for k, v in sorted(params.items()))
        faiss.ParameterSpace().set_index_parameters(index, text)


def train_index(factory: str, train_keys: np.ndarray, *, metric: str = "l2"):  # -> faiss.Index
    """Create an index from ``factory`` for keys of dimension d and train it on ``train_keys`` [s, d]."""
    import faiss

    keys = np.ascontiguousarray(train_keys, dtype=np.float32)
    d = keys.shape[1]
    index = faiss.index_factory(
        d, factory, faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    )
    if not index.is_trained:
        index.train(keys)
    return index


def write_index(index, path: str | os.PathLike[str]) -> None:
    """Write ``index`` to ``path`` atomically (``manifest.atomic_file``: temporary name, fsync,
    rename)."""
    import faiss

    with atomic_file(path) as tmp:
        try:
            faiss.write_index(index, str(tmp))
        except RuntimeError as e:  # faiss reports a failed write (disk full) as RuntimeError
            lines = [x for x in str(e).splitlines() if x.strip()] or ["faiss write failed"]
            raise OSError(lines[-1].strip()) from None


@contextlib.contextmanager
def quiet_stdout():
    """Send the C library's stdout to /dev/null for the duration (faiss prints, unasked, a line on
    every on-disk index it reads or resizes, which would corrupt a CLI's ``--json`` output)."""
    import ctypes
    import sys

    try:
        fd = sys.__stdout__.fileno() if sys.__stdout__ is not None else 1
    except (OSError, ValueError):  # no real stdout (e.g. captured): nothing to protect
        yield
        return
    libc = ctypes.CDLL(None)
    if sys.stdout is not None:
        sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(fd)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), fd)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, fd)
        os.close(saved)


def read_index(
    path: str | os.PathLike[str],
    *,
    mmap: bool = True,
    dim: int | None = None,
    on_disk: bool = False,
):
    """Read an index (memory-mapped read-only unless ``mmap=False``); check its dimension.

    ``on_disk``: the index's lists are in an ``.ivfdata`` file beside it (:func:`build_ondisk_ivf`);
    they are memory-mapped read-only by faiss's ``OnDiskInvertedLists`` (the index file itself is
    then read, not mapped: faiss 1.15 crashes searching an on-disk index read with IO_FLAG_MMAP).
    """
    import faiss

    path = Path(path)
    if not path.is_file():
        raise DatabaseError(f"{path}: index file missing")
    # on-disk lists (issue 18) are opened beside the index file, wherever the database now is
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR
    if on_disk:
        flags |= faiss.IO_FLAG_READ_ONLY
    elif mmap:
        flags |= faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
    try:
        with quiet_stdout():
            index = faiss.read_index(str(path), flags)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
        raise DatabaseError(f"{path}: not a readable faiss index ({first})") from None
    if dim is not None and index.d != dim:
        raise DatabaseError(f"{path}: index dimension {index.d}, expected {dim}")
    return index


def exact_search(keys: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force squared-L2 k-NN: distances float32 [q, k], ids int64 [q, k]."""
    import faiss

    flat = faiss.IndexFlatL2(keys.shape[1])
    flat.add(np.ascontiguousarray(keys, dtype=np.float32))
    return flat.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def exact_search_blocks(blocks, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force squared-L2 k-NN over keys given as consecutive blocks [n_b, d] (memory flat).

    Ids number the rows of all blocks in order. Returns distances float32 [q, k], ids int64 [q, k]
    (-1 / inf where fewer than k keys exist); ties are broken by the smaller id.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    q = len(queries)
    best_d = np.full((q, k), np.inf, dtype=np.float32)
    best_i = np.full((q, k), -1, dtype=np.int64)
    start = 0
    for block in blocks:
        block = np.asarray(block, dtype=np.float32)
        if not len(block):
            continue
        d, i = exact_search(block, queries, min(k, len(block)))
        i = np.where(i >= 0, i + start, -1)
        cat_d = np.concatenate([best_d, d], axis=1)
        cat_i = np.concatenate([best_i, i], axis=1)
        order = np.lexsort((np.where(cat_i < 0, np.iinfo(np.int64).max, cat_i), cat_d), axis=1)[
            :, :k
        ]
        best_d = np.take_along_axis(cat_d, order, 1)
        best_i = np.take_along_axis(cat_i, order, 1)
        start += len(block)
    return best_d, best_i


def recall_at_k(index, keys: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Fraction of the exact k nearest neighbours (over ``keys``) that ``index`` also returns.

    ``index`` must hold ``keys`` with ids 0..N-1 in order.
    """
    _, truth = exact_search(keys, queries, k)
    _, got = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    hits = sum(len(set(t[t >= 0]) & set(g[g >= 0])) for t, g in zip(truth, got, strict=True))
    return hits / max(1, int((truth >= 0).sum()))


# ---- databases larger than memory (issue 18): choosing, building and reading on-disk IVF ------

#: the share of the available memory an in-memory index may take before a build goes on disk
MEMORY_SHARE = 0.5
#: rows of keys converted to float32 and added at a time (bounds the add's working memory)
ADD_ROWS = 1 << 15


def available_memory() -> int:
    """Bytes this process may still allocate: the least of the machine's ``MemAvailable``, the
    cgroup's ``memory.max`` less its usage, and ``RLIMIT_DATA`` / ``RLIMIT_AS`` less this
    process's data segment / address space (``/proc/self/status``)."""
    import resource

    limits: list[int] = []
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    for cap, cur in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            text = Path(cap).read_text().strip()
            if text != "max" and int(text) < 1 << 60:
                limits.append(int(text) - int(Path(cur).read_text().strip()))
        except (OSError, ValueError):
            pass
    status: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmData", "VmSize"):
                status[key] = int(value.split()[0]) * 1024
    for rlim, key in ((resource.RLIMIT_DATA, "VmData"), (resource.RLIMIT_AS, "VmSize")):
        soft = resource.getrlimit(rlim)[0]
        if soft != resource.RLIM_INFINITY:
            limits.append(soft - status.get(key, 0))
    return max(0, min(limits)) if limits else 1 << 62


def index_bytes_per_key(factory: str, d: int) -> int:
    """Bytes an in-memory index of ``factory`` holds per key (codes, ids, graph, re-rank codes)."""
    import faiss

    refine = 0
    if "Refine(" in factory:
        inner = factory[factory.index("Refine(") + 7 : factory.rindex(")")]
        refine = index_bytes_per_key(inner, d)
        factory = factory[: factory.index("Refine(")].rstrip(",")
    probe = new_index(factory, d)
    ivf = faiss.try_extract_index_ivf(probe)
    if ivf is not None:
        return int(ivf.code_size) + 8 + refine
    if factory.startswith("HNSW"):
        digits = "".join(ch for ch in factory[4:].split(",")[0] if ch.isdigit())
        return 4 * d + 10 * int(digits or 32) + refine  # vectors + ~1.2 x 2M neighbour links
    try:
        return int(probe.sa_code_size()) + refine
    except RuntimeError:
        return 4 * d + refine


@dataclass(frozen=True)
class IndexChoice:
    """What :func:`choose_index` decided, and why.

    Attributes:
        factory: the faiss ``index_factory`` string.
        search_params: its search parameters.
        on_disk: build it shard by shard into on-disk inverted lists (:func:`build_ondisk_ivf`).
        train_size: keys to train it on (bounded by memory when on disk).
        projected_bytes: what the in-memory index of the first choice would hold.
        available_bytes: :func:`available_memory` at the time.
        reason: one line, logged by the build.
    """

    factory: str
    search_params: dict[str, int]
    on_disk: bool
    train_size: int
    projected_bytes: int
    available_bytes: int
    reason: str


def ondisk_capable(factory: str, d: int) -> bool:
    """True for an IVF index whose lists faiss can keep on disk (IVF-Flat, -SQ, -PQ; not fast-scan,
    not a ``Refine`` wrapper, whose re-rank codes would stay in memory)."""
    import faiss

    if "Refine(" in factory or "fs" in factory.split(",")[-1]:
        return False
    ivf = faiss.try_extract_index_ivf(new_index(factory, d))
    return ivf is not None and type(ivf.invlists).__name__ != "BlockInvertedLists"


def ondisk_factory(n: int, d: int, available: int) -> tuple[str, dict[str, int], int]:
    """The on-disk default for ``n`` keys of dimension ``d``: ``IVF{nlist},SQfp16`` (2d bytes a
    key: the stored float16 keys themselves, so distances are exact and need no range training;
    ``SQ8`` trained on a sample lost dimensions the sample never used: recall@10 0.19 on sparse
    hashing keys), nlist ~ 4 sqrt(n) but small enough that its training sample (>= 39
    keys a list, float32) fits in ``MEMORY_SHARE / 8`` of ``available`` (at least 4 MB); nprobe =
    nlist / 8 (>= 8; the build then tunes it on a sample, build.py).

    Returns:
        (factory, search params, training sample size).
    """
    nlist = 2 ** max(0, round(math.log2(max(1.0, 4 * math.sqrt(n)))))
    # training copies its sample a few times (residuals, scalar-quantizer ranges): an eighth
    budget = max(4 << 20, int(available * MEMORY_SHARE / 8))
    while nlist > 1 and (39 * nlist > n or 39 * nlist * 4 * d > budget):
        nlist //= 2
    train = min(n, max(39 * nlist, min(64 * nlist, 65536, budget // (4 * d))))
    return f"IVF{nlist},SQfp16", {"nprobe": min(nlist, max(8, nlist // 8))}, train


def choose_index(
    n: int,
    d: int,
    factory: str | None = None,
    search_params: dict[str, int] | None = None,
    available: int | None = None,
    max_memory: int | None = None,
) -> IndexChoice:
    """Pick the index of a build of ``n`` keys: the size default (:func:`default_factory`) or the
    ``factory`` asked for, in memory while its projected bytes (``n x`` :func:`index_bytes_per_key`
    plus the training sample) stay under ``MEMORY_SHARE`` of the available memory; else on disk:
    the asked factory if faiss can keep its lists on disk, otherwise :func:`ondisk_factory`'s.
    A non-IVF factory asked for explicitly stays in memory (with a warning when it will not fit).
    ``available`` replaces :func:`available_memory`; ``max_memory`` caps it.
    """
    avail = available_memory() if available is None else int(available)
    if max_memory is not None:  # the user's own limit (retro-db build --max-memory-mb)
        avail = min(avail, int(max_memory))
    asked = factory is not None
    if factory is None:
        factory, params = default_factory(n, d)
    else:
        params = {}
    params = dict(params if search_params is None else search_params)
    train = training_size(factory, n) if not new_index(factory, d).is_trained else 0
    projected = n * index_bytes_per_key(factory, d) + train * 4 * d
    fits = projected <= MEMORY_SHARE * avail
    mb = 1 << 20
    where = f"{projected / mb:,.0f} MB projected, {avail / mb:,.0f} MB available"
    if fits:
        return IndexChoice(
            factory,
            params,
            False,
            train,
            projected,
            avail,
            f"index {factory} in memory ({where}, limit {MEMORY_SHARE:.0%})",
        )
    if asked and ondisk_capable(factory, d):
        _, _, train = ondisk_factory(n, d, avail)
        train = max(train, min(n, training_size(factory, n) if train else 0))
        return IndexChoice(
            factory,
            params,
            True,
            min(n, train),
            projected,
            avail,
            f"index {factory} on disk: in memory it would not fit ({where})",
        )
    if asked:
        logger.warning(
            "index %s was asked for and is kept in memory although it may not fit (%s); an IVF "
            "factory (e.g. IVF4096,SQfp16) is built on disk",
            factory,
            where,
        )
        return IndexChoice(
            factory, params, False, train, projected, avail, f"index {factory} as asked ({where})"
        )
    disk, disk_params, train = ondisk_factory(n, d, avail)
    if search_params is not None:
        disk_params = dict(search_params)
    return IndexChoice(
        disk,
        disk_params,
        True,
        train,
        projected,
        avail,
        f"index {disk} on disk instead of {factory} in memory ({where})",
    )


def _add_in_rows(index, keys: np.ndarray, start: int) -> None:
    for a in range(0, len(keys), ADD_ROWS):
        block = np.asarray(keys[a : a + ADD_ROWS], dtype=np.float32)
        index.add_with_ids(block, np.arange(start + a, start + a + len(block), dtype=np.int64))


def drop_mapped_pages(ondisk) -> None:
    """madvise(MADV_DONTNEED) over the lists file's mapping: its pages leave this process's RSS
    (shared file pages: the data stays in the page cache and the file)."""
    import ctypes

    import faiss

    size = int(ondisk.totsize)
    if size <= 0:
        return
    addr = faiss.rev_swig_ptr(ondisk.ptr, size).ctypes.data
    ctypes.CDLL(None).madvise(ctypes.c_void_p(addr), ctypes.c_size_t(size), 4)  # MADV_DONTNEED


def _stream_ondisk(template, key_blocks, tmp_data: Path, progress: bool, total_bytes):
    """Two passes over the keys into an ``OnDiskInvertedLists`` at ``tmp_data``: count each list's
    entries (coarse assignment only), allocate every list at its final size, then encode each block
    and write its entries in place, list by list (ids ascending within a list, as faiss's ``add``
    leaves them), dropping the written pages from RSS after each block."""
    import faiss
    from tqdm.auto import tqdm

    ivf = faiss.extract_index_ivf(template)
    nlist, cs = int(ivf.nlist), int(ivf.code_size)

    rows = max(64, min(ADD_ROWS, (4 << 20) // (4 * int(ivf.d))))  # ~4 MB of float32 a step

    def assigned(keys):
        for a in range(0, len(keys), rows):
            x = np.ascontiguousarray(keys[a : a + rows], dtype=np.float32)
            yield a, x, ivf.quantizer.assign(x, 1).reshape(-1)

    sizes = np.zeros(nlist, dtype=np.int64)
    for _, keys in key_blocks():
        for _, _, lists in assigned(keys):
            sizes += np.bincount(lists, minlength=nlist)
    with quiet_stdout():
        ondisk = faiss.OnDiskInvertedLists(nlist, cs, str(tmp_data))
        # every list at its exact size, contiguous (as merge_from_multiple lays them out): the
        # file first (update_totsize maps it), then the layout
        ondisk.update_totsize(int(sizes.sum()) * (cs + 8))
        ondisk.set_all_lists_sizes(faiss.swig_ptr(np.ascontiguousarray(sizes, dtype=np.uint64)))
    cursor = np.zeros(nlist, dtype=np.int64)
    with tqdm(
        total=total_bytes,
        desc="index add (on disk)",
        unit="B",
        unit_scale=True,
        disable=not progress,
    ) as bar:
        for start, keys in key_blocks():
            for a, x, lists in assigned(keys):
                codes = np.empty((len(x), cs), dtype=np.uint8)
                ivf.encode_vectors(
                    len(x), faiss.swig_ptr(x), faiss.swig_ptr(lists), faiss.swig_ptr(codes)
                )
                order = np.argsort(lists, kind="stable")
                ids = np.ascontiguousarray(start + a + order, dtype=np.int64)
                codes = np.ascontiguousarray(codes[order])
                sl = lists[order]
                bounds = np.flatnonzero(np.diff(sl)) + 1
                for b0, b1 in zip(np.r_[0, bounds], np.r_[bounds, len(sl)], strict=True):
                    lst = int(sl[b0])
                    ondisk.update_entries(
                        lst,
                        int(cursor[lst]),
                        int(b1 - b0),
                        faiss.swig_ptr(ids[b0:b1]),
                        faiss.swig_ptr(codes[b0:b1]),
                    )
                    cursor[lst] += b1 - b0
            drop_mapped_pages(ondisk)
            bar.update(keys.nbytes)
    if not np.array_equal(cursor, sizes):
        raise RuntimeError("on-disk lists: the keys changed between the two passes")
    return ondisk, int(sizes.sum())


def _finish_ondisk(template, ondisk, ntotal, tmp_data, data_path, directory, stem):
    """Give ``ondisk`` its final file name, hang it on a copy of ``template``, write both."""
    import faiss

    ondisk.filename = data_path.name  # read back with IO_FLAG_ONDISK_SAME_DIR
    out = faiss.clone_index(template)
    out_ivf = faiss.extract_index_ivf(out)
    out_ivf.replace_invlists(ondisk, True)
    ondisk.this.disown()
    out.ntotal = out_ivf.ntotal = ntotal
    with open(tmp_data, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp_data, data_path)
    index_path = directory / f"{stem}.faiss"
    write_index(out, index_path)
    del out
    return index_path, data_path


def _merge_block_lists(template_ivf, base, blocks: list[Path], tmp_data: Path) -> tuple[Any, int]:
    """Merge the lists of ``base`` (if any) and of the block index files (memory-mapped) into
    one ``OnDiskInvertedLists`` at ``tmp_data``; return it and the number of entries."""
    import faiss

    readers = []  # keep the mmapped block indexes alive while their lists are merged
    lists = faiss.InvertedListsPtrVector()
    if base is not None:
        lists.push_back(faiss.extract_index_ivf(base).invlists)
    for path in blocks:
        block = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        readers.append(block)
        lists.push_back(faiss.extract_index_ivf(block).invlists)
    with quiet_stdout():
        ondisk = faiss.OnDiskInvertedLists(
            template_ivf.nlist, template_ivf.code_size, str(tmp_data)
        )
        ntotal = ondisk.merge_from_multiple(lists.data(), lists.size(), False, False)
    del readers, lists
    return ondisk, ntotal


def build_ondisk_ivf(
    template,
    key_blocks: Iterable[tuple[int, np.ndarray]] | Callable[[], Iterable[tuple[int, np.ndarray]]],
    directory: str | os.PathLike[str],
    stem: str,
    base=None,
    progress: bool = False,
    total_bytes: int | None = None,
) -> tuple[Path, Path]:
    """Write an IVF index whose inverted lists live on disk, holding one block of keys at a time.

    The faiss recipe for indexes larger than memory: each block of keys is added to an in-memory
    copy of the trained empty ``template`` (ids = the block's chunk ids) and written to a
    temporary file; the lists of all blocks (memory-mapped) are merged into one
    ``OnDiskInvertedLists`` file, written through the page cache, never held in memory.

    Args:
        template: a trained, empty IVF index (its lists are replaced; not modified otherwise).
        key_blocks: (first chunk id, keys [n_b, d]) of each block, in order (e.g. shard memmaps).
        directory: where the files go (``index/`` of the database).
        stem: names ``{stem}.faiss`` (the index) and ``{stem}.ivfdata`` (its lists).
        base: an index whose lists (on disk or not) come first in the merge (``add``: the current
            version's; its files are only read).
        progress: tqdm bar over the bytes of keys added.
        total_bytes: the keys' bytes, for the bar's ETA.

    Returns:
        The paths of the index file and of the lists file (both written atomically, names final).
    """
    import faiss
    from tqdm.auto import tqdm

    directory = Path(directory)
    blocks: list[Path] = []
    template_ivf = faiss.extract_index_ivf(template)
    if template.ntotal != 0 or not template.is_trained:
        raise ValueError("build_ondisk_ivf: template must be a trained, empty IVF index")
    if base is None and callable(key_blocks):  # a build: straight into the lists file
        data_path = directory / f"{stem}.ivfdata"
        tmp_data = directory / f"{TMP_PREFIX}{stem}.ivfdata"
        ondisk, ntotal = _stream_ondisk(template, key_blocks, tmp_data, progress, total_bytes)
        return _finish_ondisk(template, ondisk, ntotal, tmp_data, data_path, directory, stem)
    if callable(key_blocks):
        key_blocks = key_blocks()
    try:
        with tqdm(
            total=total_bytes,
            desc="index add (on disk)",
            unit="B",
            unit_scale=True,
            disable=not progress,
        ) as bar:
            for i, (start, keys) in enumerate(key_blocks):
                block = faiss.clone_index(template)
                _add_in_rows(block, keys, start)
                path = directory / f"{TMP_PREFIX}{stem}-block{i:05d}.faiss"
                faiss.write_index(block, str(path))
                blocks.append(path)
                del block
                bar.update(keys.nbytes)
        data_path = directory / f"{stem}.ivfdata"
        tmp_data = directory / f"{TMP_PREFIX}{stem}.ivfdata"
        ondisk, ntotal = _merge_block_lists(template_ivf, base, blocks, tmp_data)
        return _finish_ondisk(template, ondisk, ntotal, tmp_data, data_path, directory, stem)
    finally:
        for path in blocks:
            with contextlib.suppress(OSError):
                path.unlink()


def ondisk_lists_file(index) -> str | None:
    """The lists file of an IVF index whose lists are on disk (None for any other index)."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    return str(lists.filename) if isinstance(lists, faiss.OnDiskInvertedLists) else None
