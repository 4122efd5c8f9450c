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

import logging
import math
import os
from pathlib import Path

import numpy as np

from .manifest import DatabaseError, atomic_file

logger = logging.getLogger(__name__)

__all__ = [
    "FLAT_THRESHOLD",
    "HNSW_THRESHOLD",
    "appendable_index",
    "apply_search_params",
    "combine_indexes",
    "default_factory",
    "exact_search",
    "exact_search_blocks",
    "new_index",
    "read_index",
    "recall_at_k",
    "set_threads",
    "train_index",
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


def read_index(path: str | os.PathLike[str], *, mmap: bool = True, dim: int | None = None):
    """Read an index (memory-mapped read-only unless ``mmap=False``); check its dimension."""
    import faiss

    path = Path(path)
    if not path.is_file():
        raise DatabaseError(f"{path}: index file missing")
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
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
