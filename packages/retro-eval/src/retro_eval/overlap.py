"""Leakage between evaluation chunks and the retrieval database, and bits-per-byte by leakage bucket.

Two measures of how much of an evaluation chunk C (m tokens) the database already holds:

- **r(C)** (RETRO paper, section 2.6): the longest run of tokens that C shares contiguously with any
  of its k retrieved neighbours (each a chunk plus its continuation, r = 2m tokens), divided by m.
  :func:`chunk_overlap_ratios` computes it exactly with a dynamic programme vectorised over all
  chunks, neighbours and neighbour positions at once (one numpy step per position of C).
- **MinHash**: the exact n-gram Jaccard of C with the most similar database chunk that
  ``datasketch.MinHashLSH`` proposes among *all* database chunks (not only the retrieved ones), via
  ``retro_db.minhash.ChunkOverlapIndex`` (:func:`minhash_overlaps`).

:func:`bucket_bpb` then reports bpb(alpha) = bits / UTF-8 bytes over the chunks with overlap <= alpha,
with chunk counts, and marks an empty bucket instead of dividing by zero.

Beside the paper's cumulative bpb(alpha), disjoint bins of overlap (:data:`BIN_EDGES`: [0, 12.5%],
(12.5%, 50%], (50%, 100%]) separate the chunks the database barely covers from those it holds:
:func:`overlap_bins` assigns each chunk its bin, :func:`bin_totals` sums bits and bytes per bin, and
:func:`bootstrap_bpb_difference` gives the difference in bpb between two models over a set of chunks
with a seeded bootstrap interval (chunks resampled with replacement), so "within noise" is a number.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

__all__ = [
    "ALPHAS",
    "BIN_EDGES",
    "bin_labels",
    "bin_totals",
    "bootstrap_bpb_difference",
    "bucket_bpb",
    "build_minhash_index",
    "chunk_overlap_ratios",
    "longest_common_substring",
    "longest_common_substrings",
    "minhash_overlaps",
    "overlap_bins",
]

logger = logging.getLogger(__name__)

#: the paper's leakage thresholds: 0, 12.5, 25, 50, 75, 100 %.
ALPHAS: tuple[float, ...] = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)

#: edges of the disjoint overlap bins: [0, 12.5%], (12.5%, 50%], (50%, 100%].
BIN_EDGES: tuple[float, ...] = (0.0, 0.125, 0.5, 1.0)

_EPS = 1e-12  # overlap <= alpha is tested with this slack (alphas like 1/8 are exact anyway)


def _as_int_array(x: Any, ndim: int, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D integer array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _lengths(lengths: Any, shape: tuple[int, ...], full: int, name: str) -> np.ndarray:
    if lengths is None:
        return np.full(shape, full, dtype=np.int64)
    out = np.asarray(lengths)
    if out.shape != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(out.shape)}")
    if out.size and (out.min() < 0 or out.max() > full):
        raise ValueError(f"{name} must lie in [0, {full}]")
    return out.astype(np.int64, copy=False)


def longest_common_substring(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> int:
    """Length of the longest contiguous token run shared by two 1-D token sequences (exact)."""
    a = _as_int_array(a, 1, "a")
    b = _as_int_array(b, 1, "b")
    if not a.size or not b.size:
        return 0
    out = longest_common_substrings(a[None, :], None, b[None, None, :], None)
    return int(out[0, 0])


def longest_common_substrings(
    chunks: np.ndarray,
    lengths: np.ndarray | None,
    neighbours: np.ndarray,
    neighbour_lengths: np.ndarray | None,
    *,
    batch_size: int = 256,
    progress: bool = False,
) -> np.ndarray:
    """Longest common contiguous token substring of each chunk with each of its neighbours.

    Dynamic programme ``L[i, j] = L[i-1, j-1] + 1 if C[i] == N[j] else 0`` over the m x r matrix,
    vectorised over chunks, neighbours and j; the answer is ``max L``. Exact, O(C k m r) work.

    Args:
        chunks: int [C, m] evaluation chunk tokens (padding past ``lengths`` is ignored).
        lengths: int [C] real tokens per chunk (None: all m).
        neighbours: int [C, k, r] neighbour tokens (chunk + continuation; padding ignored).
        neighbour_lengths: int [C, k] real tokens per neighbour, 0 = no neighbour (None: all r).
        batch_size: chunks per vectorised step (memory ~ batch_size * k * r * 9 bytes).
        progress: show a tqdm bar over batches.

    Returns:
        int64 [C, k] longest common substring lengths.

    Raises:
        ValueError: wrong ranks, mismatched C, non-integer tokens or lengths out of range.
    """
    chunks = _as_int_array(chunks, 2, "chunks")
    neighbours = _as_int_array(neighbours, 3, "neighbours")
    c, m = chunks.shape
    if neighbours.shape[0] != c:
        raise ValueError(f"neighbours must have shape [C={c}, k, r], got {list(neighbours.shape)}")
    _, k, r = neighbours.shape
    lengths = _lengths(lengths, (c,), m, "lengths")
    neighbour_lengths = _lengths(neighbour_lengths, (c, k), r, "neighbour_lengths")
    out = np.zeros((c, k), dtype=np.int64)
    if c == 0 or k == 0 or m == 0 or r == 0:
        return out
    pos = np.arange(r)
    for lo in tqdm(range(0, c, batch_size), desc="r(C)", unit="batch", disable=not progress):
        hi = min(c, lo + batch_size)
        nb = neighbours[lo:hi]  # (B, k, r)
        nb_valid = pos[None, None, :] < neighbour_lengths[lo:hi, :, None]  # (B, k, r)
        run = np.zeros((hi - lo, k, r + 1), dtype=np.int32)  # L[i-1, j-1] lives at run[..., j]
        best = np.zeros((hi - lo, k), dtype=np.int64)
        for i in range(int(lengths[lo:hi].max(initial=0))):
            tok_valid = (i < lengths[lo:hi])[:, None, None]  # (B, 1, 1)
            eq = (nb == chunks[lo:hi, i, None, None]) & nb_valid & tok_valid  # (B, k, r)
            new = np.where(eq, run[..., :-1] + 1, 0)  # (B, k, r): L[i, j]
            run[..., 1:] = new
            np.maximum(best, new.max(axis=-1), out=best)
        out[lo:hi] = best
    return out


def chunk_overlap_ratios(
    chunks: np.ndarray,
    lengths: np.ndarray | None,
    neighbours: np.ndarray,
    neighbour_lengths: np.ndarray | None,
    *,
    chunk_size: int | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> np.ndarray:
    """r(C): longest common token substring of C with any of its neighbours, divided by m.

    As in the paper (section 2.6, evaluated with the 10 nearest neighbours): a chunk with r(C) <= 12.5%
    shares fewer than 8 contiguous tokens (m = 64) with everything retrieved for it. The denominator is
    the chunk size m also for a document's shorter last chunk.

    Args:
        chunks: int [C, m] evaluation chunks; lengths: int [C] real tokens (None: all m).
        neighbours: int [C, k, r]; neighbour_lengths: int [C, k] (0 = missing neighbour).
        chunk_size: m (default: ``chunks.shape[1]``).

    Returns:
        float64 [C] in [0, 1].
    """
    lcs = longest_common_substrings(
        chunks, lengths, neighbours, neighbour_lengths, batch_size=batch_size
    )
    m = int(chunk_size if chunk_size is not None else np.asarray(chunks).shape[1])
    if m <= 0:
        raise ValueError(f"chunk_size must be positive, got {m}")
    best = lcs.max(axis=1, initial=0).astype(np.float64)
    return np.minimum(best / m, 1.0)


def build_minhash_index(
    database: Any,
    *,
    ngram: int = 13,
    threshold: float = 0.3,
    num_perm: int = 128,
    seed: int = 1,
    batch_chunks: int = 65536,
    progress: bool = False,
) -> Any:
    """A ``retro_db.minhash.ChunkOverlapIndex`` over every chunk of a database (or a chunk array).

    Args:
        database: a ``retro_db`` Database (``num_chunks``, ``chunk_tokens(ids)``), or an int array
            ``[N, m]`` of training chunks, or a ``(chunks [N, m], lengths [N])`` pair.
        ngram, threshold, num_perm, seed: as ``ChunkOverlapIndex``.
    """
    from retro_db.minhash import ChunkOverlapIndex

    if isinstance(database, tuple):
        chunks, lens = database
    elif isinstance(database, np.ndarray):
        chunks, lens = database, None
    elif hasattr(database, "chunk_tokens") and hasattr(database, "num_chunks"):
        n = int(database.num_chunks)
        parts_t, parts_l = [], []
        for lo in range(0, n, batch_chunks):
            t, ln = database.chunk_tokens(np.arange(lo, min(n, lo + batch_chunks), dtype=np.int64))
            parts_t.append(np.asarray(t))
            parts_l.append(np.asarray(ln))
        m = int(getattr(database, "chunk_size", parts_t[0].shape[1] if parts_t else 0))
        chunks = np.concatenate(parts_t) if parts_t else np.zeros((0, m), dtype=np.int64)
        lens = np.concatenate(parts_l) if parts_l else np.zeros(0, dtype=np.int64)
    else:
        raise TypeError(
            "database must be a retro_db Database, a chunk array [N, m] or (chunks, lengths), "
            f"got {type(database).__name__}"
        )
    logger.info("MinHash LSH index over %d database chunks (ngram=%d)", len(chunks), ngram)
    return ChunkOverlapIndex(
        np.asarray(chunks),
        None if lens is None else np.asarray(lens),
        ngram=ngram,
        threshold=threshold,
        num_perm=num_perm,
        seed=seed,
        progress=progress,
    )


def minhash_overlaps(
    chunks: np.ndarray,
    lengths: np.ndarray | None,
    database: Any,
    *,
    ngram: int = 13,
    threshold: float = 0.3,
    num_perm: int = 128,
    seed: int = 1,
    batch_size: int = 4096,
    progress: bool = False,
) -> np.ndarray:
    """MinHash overlap of each evaluation chunk with the whole database.

    For each chunk C: the exact Jaccard of C's ``ngram``-shingle set with the most similar database chunk
    among the ``MinHashLSH`` candidates (``retro_db.minhash.ChunkOverlapIndex.best_matches``). A value
    below ``threshold`` is a lower bound (LSH may miss weaker matches); 0.0 when no candidate.

    Args:
        chunks: int [C, m] evaluation chunks; lengths: int [C] real tokens (None: all m).
        database: a ``ChunkOverlapIndex`` (reused), or anything :func:`build_minhash_index` takes.
        ngram, threshold, num_perm, seed: index parameters when one is built here.

    Returns:
        float64 [C] Jaccard values in [0, 1].
    """
    chunks = _as_int_array(chunks, 2, "chunks")
    c, m = chunks.shape
    lengths = _lengths(lengths, (c,), m, "lengths")
    index = database if hasattr(database, "best_matches") else None
    if index is None:
        index = build_minhash_index(
            database,
            ngram=ngram,
            threshold=threshold,
            num_perm=num_perm,
            seed=seed,
            progress=progress,
        )
    out = np.zeros(c, dtype=np.float64)
    for lo in tqdm(
        range(0, c, batch_size), desc="minhash-overlap", unit="batch", disable=not progress
    ):
        hi = min(c, lo + batch_size)
        _, jac = index.best_matches(chunks[lo:hi], lengths[lo:hi])
        out[lo:hi] = jac
    return out


def bucket_bpb(
    chunk_nll_bits: Sequence[float] | np.ndarray,
    chunk_bytes: Sequence[int] | np.ndarray,
    overlap: Sequence[float] | np.ndarray,
    alphas: Sequence[float] = ALPHAS,
) -> list[dict[str, Any]]:
    """bpb(alpha): bits per UTF-8 byte over the evaluation chunks whose overlap is <= alpha.

    Args:
        chunk_nll_bits: float [C] negative log-likelihood of each chunk's tokens, in bits.
        chunk_bytes: int [C] UTF-8 bytes of each chunk's text.
        overlap: float [C] r(C) or MinHash Jaccard of each chunk, in [0, 1].
        alphas: thresholds (fractions, not percent), reported in the given order.

    Returns:
        One dict per alpha: ``{"alpha", "chunks", "bits", "bytes", "bpb", "empty"}`` where ``bpb`` is
        ``sum(bits) / sum(bytes)`` over the selected chunks, or None with ``"empty": True`` when no
        chunk (or no byte) falls in the bucket.

    Raises:
        ValueError: arrays of different lengths, not 1-D, not finite, negative bits/bytes, or an alpha
        outside [0, 1].
    """
    bits = np.asarray(chunk_nll_bits, dtype=np.float64)
    nbytes = np.asarray(chunk_bytes, dtype=np.float64)
    ov = np.asarray(overlap, dtype=np.float64)
    for name, arr in (("chunk_nll_bits", bits), ("chunk_bytes", nbytes), ("overlap", ov)):
        if arr.ndim != 1:
            raise ValueError(f"{name} must be 1-D [C], got shape {list(arr.shape)}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} must be finite (found NaN or inf)")
    if not (len(bits) == len(nbytes) == len(ov)):
        raise ValueError(
            f"chunk_nll_bits, chunk_bytes and overlap must have one entry per chunk, "
            f"got {len(bits)}, {len(nbytes)}, {len(ov)}"
        )
    if (bits < 0).any() or (nbytes < 0).any():
        raise ValueError("chunk_nll_bits and chunk_bytes must be non-negative")
    rows = []
    for alpha in alphas:
        a = float(alpha)
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"alpha must be a fraction in [0, 1], got {alpha!r} (12.5% is 0.125)")
        sel = ov <= a + _EPS
        total_bits = float(bits[sel].sum())
        total_bytes = int(round(float(nbytes[sel].sum())))
        n = int(sel.sum())
        empty = n == 0 or total_bytes == 0
        rows.append(
            {
                "alpha": a,
                "chunks": n,
                "bits": total_bits,
                "bytes": total_bytes,
                "bpb": None if empty else total_bits / total_bytes,
                "empty": empty,
            }
        )
    return rows


def _per_chunk(**arrays: tuple[Any, Any]) -> list[np.ndarray]:
    """The named per-chunk arrays (value, dtype) as 1-D numpy arrays of one common length C."""
    out = [np.asarray(v, dtype=dt) for v, dt in arrays.values()]
    if any(a.ndim != 1 for a in out) or len({len(a) for a in out}) > 1:
        raise ValueError(
            f"{', '.join(arrays)} must be 1-D with one entry per chunk, got shapes "
            f"{', '.join(str(list(a.shape)) for a in out)}"
        )
    return out


def _check_edges(edges: Sequence[float]) -> np.ndarray:
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or len(e) < 2 or not np.all(np.diff(e) > 0) or e[0] < 0 or e[-1] > 1:
        raise ValueError(
            f"bin edges must be at least 2 increasing fractions in [0, 1], got {list(edges)!r}"
        )
    return e


def bin_labels(edges: Sequence[float] = BIN_EDGES) -> list[str]:
    """Display labels of the bins of :func:`overlap_bins`: ``["[0%, 12.5%]", "(12.5%, 50%]", ...]``."""
    e = _check_edges(edges)
    pct = [f"{100 * float(x):g}%" for x in e]
    return [("[" if b == 0 else "(") + f"{pct[b]}, {pct[b + 1]}]" for b in range(len(e) - 1)]


def overlap_bins(
    overlap: Sequence[float] | np.ndarray, edges: Sequence[float] = BIN_EDGES
) -> np.ndarray:
    """The bin of each chunk's overlap: bin 0 is ``[e_0, e_1]``, bin b > 0 is ``(e_b, e_{b+1}]``.

    Args:
        overlap: float [C] r(C) or MinHash Jaccard of each chunk, in [0, 1].
        edges: B + 1 increasing fractions (default :data:`BIN_EDGES`, B = 3).

    Returns:
        int64 [C] bin index in ``0..B-1``; -1 for an overlap outside ``[e_0, e_B]``.

    Raises:
        ValueError: overlap not 1-D or not finite; edges not increasing fractions.
    """
    e = _check_edges(edges)
    ov = np.asarray(overlap, dtype=np.float64)
    if ov.ndim != 1:
        raise ValueError(f"overlap must be 1-D [C], got shape {list(ov.shape)}")
    if not np.all(np.isfinite(ov)):
        raise ValueError("overlap must be finite (found NaN or inf)")
    # (e_b, e_{b+1}] with the same slack as bucket_bpb's "overlap <= alpha", so bins and buckets agree.
    out = np.searchsorted(e[1:], ov - _EPS, side="left").astype(np.int64)
    out[(ov < e[0] - _EPS) | (ov > e[-1] + _EPS)] = -1
    return out


def bin_totals(
    chunk_nll_bits: Sequence[float] | np.ndarray,
    chunk_bytes: Sequence[int] | np.ndarray,
    bins: Sequence[int] | np.ndarray,
    num_bins: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum bits and bytes of the chunks in each bin.

    Args:
        chunk_nll_bits: float [C] bits of each chunk; chunk_bytes: int [C] UTF-8 bytes of each chunk.
        bins: int [C] bin of each chunk (:func:`overlap_bins`; -1 = in no bin, left out).
        num_bins: B.

    Returns:
        ``(bits, bytes, chunks)``: float64 [B], int64 [B], int64 [B]; bpb of bin b is
        ``bits[b] / bytes[b]`` (undefined when ``bytes[b] == 0``).

    Raises:
        ValueError: arrays of different lengths or not 1-D, or a bin index >= B.
    """
    bits, nbytes, b = _per_chunk(
        chunk_nll_bits=(chunk_nll_bits, np.float64),
        chunk_bytes=(chunk_bytes, np.int64),
        bins=(bins, np.int64),
    )
    if len(b) and b.max() >= num_bins:
        raise ValueError(f"bin index {int(b.max())} out of range for {num_bins} bins")
    sel = b >= 0
    return (
        np.bincount(b[sel], weights=bits[sel], minlength=num_bins).astype(np.float64),
        np.bincount(b[sel], weights=nbytes[sel], minlength=num_bins).round().astype(np.int64),
        np.bincount(b[sel], minlength=num_bins).astype(np.int64),
    )


def bootstrap_bpb_difference(
    bits_a: Sequence[float] | np.ndarray,
    bits_b: Sequence[float] | np.ndarray,
    chunk_bytes: Sequence[int] | np.ndarray,
    *,
    samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    max_draws: int = 4_000_000,
) -> np.ndarray:
    """bpb of model a minus bpb of model b over the same chunks, with a bootstrap interval.

    The estimate is ``sum(bits_a) / sum(bytes) - sum(bits_b) / sum(bytes)``. Each of ``samples``
    resamples draws the C chunks with replacement (the same draw for both models: the difference is
    paired) and recomputes it; the interval is the ``(1 - level) / 2`` and ``(1 + level) / 2``
    percentiles of the resampled differences. Seeded: the same inputs and seed give the same interval.

    Args:
        bits_a, bits_b: float [C] bits of each chunk under models a and b.
        chunk_bytes: int [C] UTF-8 bytes of each chunk.
        samples: bootstrap resamples.
        seed: seeds ``numpy.random.default_rng``.
        level: the interval's coverage.
        max_draws: most chunk indices drawn at once (memory bound; does not change the result).

    Returns:
        float64 [3]: (estimate, low, high); all NaN when the chunks hold no bytes (C = 0).

    Raises:
        ValueError: arrays of different lengths or not 1-D, samples < 1, level outside (0, 1).
    """
    a, b, nb = _per_chunk(
        bits_a=(bits_a, np.float64),
        bits_b=(bits_b, np.float64),
        chunk_bytes=(chunk_bytes, np.float64),
    )
    if int(samples) < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    total = float(nb.sum())
    if total <= 0:
        return np.full(3, np.nan)
    diff = a - b
    estimate = float(diff.sum()) / total
    c = len(diff)
    rng = np.random.default_rng(seed)
    stats = np.empty(int(samples), dtype=np.float64)
    step = max(1, int(max_draws) // c)
    for lo in range(0, int(samples), step):
        hi = min(int(samples), lo + step)
        idx = rng.integers(0, c, size=(hi - lo, c))
        den = nb[idx].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            stats[lo:hi] = np.where(den > 0, diff[idx].sum(axis=1) / den, np.nan)
    q = 100.0 * np.array([(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    low, high = np.nanpercentile(stats, q)
    return np.array([estimate, float(low), float(high)], dtype=np.float64)
