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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

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
    "build_ondisk_ivf_from_codes",
    "choose_index",
    "code_rows",
    "combine_indexes",
    "default_factory",
    "drop_mapped_pages",
    "exact_search",
    "exact_search_blocks",
    "index_bytes_per_key",
    "ivf_code_blocks",
    "new_index",
    "ondisk_capable",
    "ondisk_factory",
    "ondisk_lists_file",
    "read_index",
    "recall_at_k",
    "search_lists_bounded",
    "set_threads",
    "train_index",
    "training_size",
    "write_index",
    "write_ivf_codes",
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


#: bytes of mapped lists one step of :func:`search_lists_bounded` may bring in (a list larger
#: than this is searched alone)
LIST_GROUP_BYTES = 4 << 20


def search_lists_bounded(
    index, queries: np.ndarray, k: int, budget: int = LIST_GROUP_BYTES
) -> tuple[np.ndarray, np.ndarray]:
    """``index.search(queries, k)`` of an IVF index whose lists are on disk, one query at a time
    and its probed lists a group at a time (``search_preassigned`` over the query's nearest
    lists, consecutive groups of at most ``budget`` bytes of entries), the lists' mapped pages
    dropped after each group: the pages this process holds stay under ``budget`` plus one list,
    whatever the size of the database (a plain search of one query maps all ``nprobe`` lists it
    probes: nprobe / nlist of the file). The k best of the groups are the k best of the probed
    lists: the same neighbours and distances as ``index.search`` (ties at equal distance keep the
    smaller id first). An index that is not a bare IVF over on-disk lists is searched with
    ``index.search`` one query at a time.

    Returns:
        distances float32 [q, k], ids int64 [q, k] (-1 / inf where fewer than k are found).
    """
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    q = len(queries)
    best_d = np.full((q, k), np.inf, dtype=np.float32)
    best_i = np.full((q, k), -1, dtype=np.int64)
    ivf = faiss.downcast_index(index)
    is_ivf = isinstance(ivf, faiss.IndexIVF)
    lists = faiss.downcast_InvertedLists(ivf.invlists) if is_ivf else None
    if not isinstance(lists, faiss.OnDiskInvertedLists):
        for j in range(q):
            best_d[j], best_i[j] = (r[0] for r in index.search(queries[j : j + 1], k))
        return best_d, best_i
    entry = int(ivf.code_size) + 8
    sizes = np.array([lists.list_size(i) for i in range(int(ivf.nlist))], dtype=np.int64) * entry
    asked = int(ivf.nprobe)
    nprobe = min(asked, int(ivf.nlist))
    for j in range(q):
        x = queries[j : j + 1]
        dq, iq = ivf.quantizer.search(x, nprobe)
        cand_d, cand_i = [best_d[j : j + 1]], [best_i[j : j + 1]]
        a = 0
        while a < nprobe:
            b, held = a + 1, sizes[max(0, int(iq[0, a]))]
            while b < nprobe and held + sizes[max(0, int(iq[0, b]))] <= budget:
                held += sizes[max(0, int(iq[0, b]))]
                b += 1
            ivf.nprobe = b - a  # faiss reads nprobe lists of the preassigned ones
            try:
                d, i = ivf.search_preassigned(x, k, iq[:, a:b], dq[:, a:b])
            finally:
                ivf.nprobe = asked
            drop_mapped_pages(lists)
            cand_d.append(d)
            cand_i.append(i)
            a = b
        cd, ci = np.concatenate(cand_d, axis=1)[0], np.concatenate(cand_i, axis=1)[0]
        order = np.lexsort((np.where(ci < 0, np.iinfo(np.int64).max, ci), cd))[:k]
        best_d[j], best_i[j] = cd[order], ci[order]
    return best_d, best_i


def code_rows(d: int) -> int:
    """Rows of keys assigned and encoded at a time (~4 MB of float32): the one blocking every
    encoder of on-disk lists uses (local or on a Ray worker), so that their coarse assignments,
    computed by the same BLAS calls, are the same bit for bit."""
    return max(64, min(ADD_ROWS, (4 << 20) // (4 * int(d))))


def ivf_code_blocks(template, keys: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first row, list numbers int64 [b], codes uint8 [b, code_size]) of each block of
    :func:`code_rows` rows of ``keys``, as faiss's ``add`` of the trained IVF ``template``
    would store them."""
    import faiss

    ivf = faiss.extract_index_ivf(template)
    cs, rows = int(ivf.code_size), code_rows(ivf.d)
    for a in range(0, len(keys), rows):
        x = np.ascontiguousarray(keys[a : a + rows], dtype=np.float32)
        lists = ivf.quantizer.assign(x, 1).reshape(-1).astype(np.int64)
        codes = np.empty((len(x), cs), dtype=np.uint8)
        ivf.encode_vectors(len(x), faiss.swig_ptr(x), faiss.swig_ptr(lists), faiss.swig_ptr(codes))
        yield a, lists, codes


def write_ivf_codes(template, keys: np.ndarray, lists_path: Path, codes_path: Path) -> np.ndarray:
    """Encode ``keys`` for the trained IVF ``template`` into two ``.npy`` files (written
    atomically, one block of rows in memory at a time): the list number of every row (int64 [n])
    and its code (uint8 [n, code_size]). Returns the entries of each list (int64 [nlist]).

    A Ray worker's share of an on-disk build (distributed.py): the driver then fills the lists
    from these files (:func:`build_ondisk_ivf_from_codes`) without encoding anything."""
    import faiss

    ivf = faiss.extract_index_ivf(template)
    n, cs, nlist = len(keys), int(ivf.code_size), int(ivf.nlist)
    sizes = np.zeros(nlist, dtype=np.int64)
    with (
        atomic_file(lists_path, size=n * 8) as tmp_l,
        atomic_file(codes_path, size=n * cs) as tmp_c,
    ):
        out_l = np.lib.format.open_memmap(tmp_l, mode="w+", dtype=np.int64, shape=(n,))
        out_c = np.lib.format.open_memmap(tmp_c, mode="w+", dtype=np.uint8, shape=(n, cs))
        for a, lists, codes in ivf_code_blocks(template, keys):
            out_l[a : a + len(lists)] = lists
            out_c[a : a + len(lists)] = codes
            sizes += np.bincount(lists, minlength=nlist)
        out_l.flush()
        out_c.flush()
        del out_l, out_c
    return sizes


def _new_ondisk(nlist: int, cs: int, tmp_data: Path, sizes: np.ndarray):
    """An ``OnDiskInvertedLists`` at ``tmp_data`` with every list allocated at ``sizes``,
    contiguous in list order (as ``merge_from_multiple`` lays them out): the file first
    (``update_totsize`` maps it), then the layout."""
    import faiss

    with quiet_stdout():
        ondisk = faiss.OnDiskInvertedLists(nlist, cs, str(tmp_data))
        ondisk.update_totsize(int(sizes.sum()) * (cs + 8))
        ondisk.set_all_lists_sizes(faiss.swig_ptr(np.ascontiguousarray(sizes, dtype=np.uint64)))
    return ondisk


def _fill_block(ondisk, cursor: np.ndarray, first: int, lists: np.ndarray, codes: np.ndarray):
    """Write rows ``first``.. (list numbers, codes) into their lists at ``cursor`` (ids ascending
    within a list, as faiss's ``add`` leaves them); advance ``cursor``."""
    import faiss

    lists = np.asarray(lists, dtype=np.int64)
    order = np.argsort(lists, kind="stable")
    ids = np.ascontiguousarray(first + order, dtype=np.int64)
    codes = np.ascontiguousarray(np.asarray(codes)[order])
    sl = lists[order]
    bounds = np.flatnonzero(np.diff(sl)) + 1
    for b0, b1 in zip(np.r_[0, bounds], np.r_[bounds, len(sl)], strict=True):
        if b1 <= b0:
            continue
        lst = int(sl[b0])
        ondisk.update_entries(
            lst,
            int(cursor[lst]),
            int(b1 - b0),
            faiss.swig_ptr(ids[b0:b1]),
            faiss.swig_ptr(codes[b0:b1]),
        )
        cursor[lst] += b1 - b0


def _copy_base_lists(base, ondisk) -> np.ndarray:
    """Copy every list of ``base``'s IVF (on disk or not; only read) to the start of the same
    list of ``ondisk``, one list at a time; return the entries copied per list."""
    import faiss

    src = faiss.extract_index_ivf(base).invlists
    cs = int(src.code_size)
    mapped = faiss.downcast_InvertedLists(src)
    done = np.zeros(int(src.nlist), dtype=np.int64)
    for lst in range(int(src.nlist)):
        m = int(src.list_size(lst))
        if m:
            ids = np.array(faiss.rev_swig_ptr(src.get_ids(lst), m), dtype=np.int64)
            codes = np.array(faiss.rev_swig_ptr(src.get_codes(lst), m * cs), dtype=np.uint8)
            ondisk.update_entries(lst, 0, m, faiss.swig_ptr(ids), faiss.swig_ptr(codes))
            done[lst] = m
        if lst % 256 == 255 or lst == int(src.nlist) - 1:
            drop_mapped_pages(ondisk)
            if isinstance(mapped, faiss.OnDiskInvertedLists):
                drop_mapped_pages(mapped)
    return done


def _fill_ondisk(template, base, sizes, coded, tmp_data: Path, progress: bool, total_bytes, desc):
    """The lists of ``base`` (if any), then the coded blocks ``coded()`` yields, written into a new
    ``OnDiskInvertedLists`` at ``tmp_data`` whose lists are allocated at their final sizes
    (``sizes``, the new entries per list); pages dropped from RSS after each block."""
    import faiss
    from tqdm.auto import tqdm

    ivf = faiss.extract_index_ivf(template)
    nlist, cs = int(ivf.nlist), int(ivf.code_size)
    old = np.zeros(nlist, dtype=np.int64)
    if base is not None:
        src = faiss.extract_index_ivf(base).invlists
        old = np.array([int(src.list_size(i)) for i in range(nlist)], dtype=np.int64)
    ondisk = _new_ondisk(nlist, cs, tmp_data, old + sizes)
    cursor = old.copy()
    if base is not None and _copy_base_lists(base, ondisk).sum() != old.sum():
        raise RuntimeError("on-disk lists: the base index changed while it was copied")
    with tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, disable=not progress) as bar:
        for nbytes, blocks in coded():
            for first, lists, codes in blocks:
                _fill_block(ondisk, cursor, first, lists, codes)
            drop_mapped_pages(ondisk)
            bar.update(nbytes)
    if not np.array_equal(cursor, old + sizes):
        raise RuntimeError("on-disk lists: the keys changed between the two passes")
    return ondisk, int(cursor.sum())


def _stream_ondisk(template, base, key_blocks, tmp_data: Path, progress: bool, total_bytes):
    """Two passes over the keys into an ``OnDiskInvertedLists`` at ``tmp_data`` (after the lists
    of ``base``, if any): count each list's entries (coarse assignment only), allocate every list
    at its final size, then encode each block and write its entries in place, list by list."""
    import faiss

    ivf = faiss.extract_index_ivf(template)
    nlist, rows = int(ivf.nlist), code_rows(ivf.d)
    sizes = np.zeros(nlist, dtype=np.int64)
    for _, keys in key_blocks():
        for a in range(0, len(keys), rows):
            x = np.ascontiguousarray(keys[a : a + rows], dtype=np.float32)
            sizes += np.bincount(ivf.quantizer.assign(x, 1).reshape(-1), minlength=nlist)

    def coded():
        for start, keys in key_blocks():
            blocks = ((start + a, lst, c) for a, lst, c in ivf_code_blocks(template, keys))
            yield int(keys.nbytes), blocks

    return _fill_ondisk(
        template, base, sizes, coded, tmp_data, progress, total_bytes, "index add (on disk)"
    )


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

    The faiss recipe for indexes larger than memory, without its temporary per-block index files
    and their merge: a first pass assigns every key to its list (counts only), every list is then
    allocated at its final size in one ``OnDiskInvertedLists`` file (the lists of ``base`` first,
    copied list by list), and a second pass encodes each block and writes its entries in place,
    through the page cache, whose pages are dropped from this process after each block. The lists
    equal those of faiss's ``add`` of all keys in order (ids ascending within each list).

    Args:
        template: a trained, empty IVF index (its lists are replaced; not modified otherwise).
        key_blocks: (first chunk id, keys [n_b, d]) of each block, in order (e.g. shard memmaps),
            or a function returning them afresh (they are read twice).
        directory: where the files go (``index/`` of the database).
        stem: names ``{stem}.faiss`` (the index) and ``{stem}.ivfdata`` (its lists).
        base: an index whose lists (on disk or not) come first (``add``: the current version's;
            its files are only read); the new ids must follow its ids.
        progress: tqdm bar over the bytes of keys added.
        total_bytes: the keys' bytes, for the bar's ETA.

    Returns:
        The paths of the index file and of the lists file (both written atomically, names final).
    """
    directory = Path(directory)
    _check_template(template)
    if not callable(key_blocks):
        listed = list(key_blocks)  # (start, memmap) pairs: small

        def key_blocks():
            return iter(listed)

    data_path = directory / f"{stem}.ivfdata"
    tmp_data = directory / f"{TMP_PREFIX}{stem}.ivfdata"
    ondisk, ntotal = _stream_ondisk(template, base, key_blocks, tmp_data, progress, total_bytes)
    return _finish_ondisk(template, ondisk, ntotal, tmp_data, data_path, directory, stem)


def build_ondisk_ivf_from_codes(
    template,
    coded: list[tuple[int, Path, Path]],
    sizes: np.ndarray,
    directory: str | os.PathLike[str],
    stem: str,
    base=None,
    progress: bool = False,
    total_bytes: int | None = None,
) -> tuple[Path, Path]:
    """:func:`build_ondisk_ivf` from keys already encoded (:func:`write_ivf_codes`, e.g. by Ray
    workers): the lists are allocated at ``sizes`` (int64 [nlist], the sum of the files'), then
    filled file by file, one block of rows at a time (memory-mapped), in the order given.

    Args:
        coded: (first chunk id, list-numbers ``.npy``, codes ``.npy``) of each block of keys.
        sizes: entries per list over all ``coded`` files.
        (the others as in :func:`build_ondisk_ivf`)
    """
    import faiss

    directory = Path(directory)
    _check_template(template)
    ivf = faiss.extract_index_ivf(template)
    rows, cs = code_rows(ivf.d), int(ivf.code_size)

    def blocks(first: int, lists: np.ndarray, codes: np.ndarray):
        for a in range(0, len(lists), rows):
            yield first + a, np.asarray(lists[a : a + rows]), np.asarray(codes[a : a + rows])

    def read():
        for first, lists_path, codes_path in coded:
            lists = np.load(lists_path, mmap_mode="r", allow_pickle=False)
            codes = np.load(codes_path, mmap_mode="r", allow_pickle=False)
            if codes.shape != (len(lists), cs) or lists.ndim != 1:
                raise DatabaseError(
                    f"{codes_path}: shape {codes.shape}, expected [{len(lists)}, {cs}] "
                    f"(beside {lists_path.name})"
                )
            yield int(codes.nbytes), blocks(first, lists, codes)

    data_path = directory / f"{stem}.ivfdata"
    tmp_data = directory / f"{TMP_PREFIX}{stem}.ivfdata"
    sizes = np.asarray(sizes, dtype=np.int64)
    total_bytes = int(sizes.sum()) * cs if total_bytes is None else total_bytes
    ondisk, ntotal = _fill_ondisk(
        template, base, sizes, read, tmp_data, progress, total_bytes, "index fill (on disk)"
    )
    return _finish_ondisk(template, ondisk, ntotal, tmp_data, data_path, directory, stem)


def _check_template(template) -> None:
    if template.ntotal != 0 or not template.is_trained:
        raise ValueError("build_ondisk_ivf: template must be a trained, empty IVF index")


def ondisk_lists_file(index) -> str | None:
    """The lists file of an IVF index whose lists are on disk (None for any other index)."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    return str(lists.filename) if isinstance(lists, faiss.OnDiskInvertedLists) else None
