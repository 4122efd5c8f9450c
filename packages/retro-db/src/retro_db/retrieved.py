"""What a retrieval returns (:class:`RetrievedNeighbours`) and the same-document exclusion every
kind of key shares (:func:`search_excluding`): dense keys (database.py) and BM25 keys (bm25.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["RetrievedNeighbours", "search_excluding"]


@dataclass(frozen=True)
class RetrievedNeighbours:
    """Neighbours of q query chunks; the same fields as ``retro_core.retrieval.Neighbours``.

    Attributes:
        tokens: [q, k, r] neighbour chunk followed by its continuation (r = 2m), pad_id-padded.
        lengths: int32 [q, k] real tokens of each row (a prefix); 0 = no neighbour.
        chunk_ids: int64 [q, k] database chunk ids, -1 = none.
        distances: float32 [q, k] squared L2 distances (dense keys) or minus the BM25 score
            (BM25 keys): smaller is nearer; inf = none.
        pad_id: the padding id.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    chunk_ids: np.ndarray
    distances: np.ndarray
    pad_id: int


def search_excluding(
    search: Callable[[Any, int], tuple[np.ndarray, np.ndarray]],
    doc_ids_of: Callable[[np.ndarray], np.ndarray],
    n: int,
    queries: Any,
    k: int,
    exclude_doc_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest of ``n`` chunks for each query, never from document ``exclude_doc_ids[i]``.

    ``search(queries[rows], fetch)`` answers (distances [r, <= fetch], chunk ids [r, <= fetch]),
    nearest first, id -1 = none. Fetches k + a margin, drops the excluded document's chunks,
    keeps the first k; rows left with fewer than k are searched again with twice as many until
    k remain or all n are fetched. Returns (distances float32 [q, k], chunk ids int64 [q, k]);
    missing results are id -1, distance inf.
    """
    q, k = len(queries), int(k)
    dist = np.full((q, k), np.inf, dtype=np.float32)
    ids = np.full((q, k), -1, dtype=np.int64)
    if q == 0 or n == 0:
        return dist, ids
    if exclude_doc_ids is None:
        d, i = search(queries, min(k, n))
        dist[:, : d.shape[1]], ids[:, : i.shape[1]] = d, i
        dist[ids < 0] = np.inf
        return dist, ids
    excl = np.asarray(exclude_doc_ids, dtype=np.int64).reshape(-1)
    if len(excl) != q:
        raise ValueError(f"exclude_doc_ids: expected [{q}], got {excl.shape}")
    todo = np.arange(q)
    fetch = min(n, 2 * k + 8)
    while len(todo):
        d, i = search(queries[todo], fetch)
        docs = np.full(i.shape, -2, dtype=np.int64)
        valid = i >= 0
        docs[valid] = doc_ids_of(i[valid])
        keep = valid & (docs != excl[todo, None])
        short = []
        for row, qi in enumerate(todo):
            sel = np.flatnonzero(keep[row])[:k]
            ids[qi, : len(sel)] = i[row, sel]
            dist[qi, : len(sel)] = d[row, sel]
            if len(sel) < k and fetch < n:
                short.append(qi)
        todo = np.asarray(short, dtype=np.int64)
        fetch = min(n, fetch * 2)
    return dist, ids
