"""MinHash over token n-grams: train/evaluation dedup and chunk-overlap lookup.

RETRO (Borgeaud et al. 2021, section 2.6 / appendix A.2) removes training documents whose 13-gram
Jaccard similarity with any validation or test document is >= 0.8, found with MinHash. This module
does that on token ids, with `datasketch <https://github.com/ekzhu/datasketch>`_ for the sketches
and the LSH index:

* :func:`shingle_hashes` turns a token sequence into its shingles: every ``ngram``-gram of token
  ids, encoded as the little-endian uint32 bytes of the ids (``np.asarray(ngram, "<u4").tobytes()``).
  A document shorter than ``ngram`` tokens (but not empty) has exactly one shingle, the bytes of the
  whole document, so that short documents still compare (two short documents match only when they
  are equal). An empty document has no shingles (its signature is datasketch's empty signature, all
  maximal values) and never matches anything.
* :func:`minhash_signatures` computes, for many documents at once, signatures bit-identical to
  ``datasketch.MinHash(num_perm, seed, scheme=scheme).update_batch(shingle_hashes(doc))``: the same
  hash function (SHA-1, first 4 bytes little-endian, as ``datasketch.hashfunc.sha1_hash32``; first 8
  for ``affine64``), the permutations of a ``datasketch.MinHash`` with that seed, and the same
  arithmetic (MurmurHash3 finaliser then ``a * h + b`` mod 2^32 for the default ``affine32``;
  ``(a * h + b) mod (2^61 - 1)`` truncated to 32 bits for ``legacy``). Two backends: ``numba``
  (the ``[fast]`` extra; default when installed, affine32 only) runs SHA-1, the finaliser and the
  permutations in one compiled loop, 16 shingles per SIMD lane group (``_minhash_numba.py``);
  ``numpy`` hashes every shingle of a batch through C-level ``map`` calls into ``hashlib`` and
  applies the permutations and per-document minimum with numpy over the whole batch.
  The first numba call compiles the kernel (a few seconds; cached on disk afterwards).
* :func:`dedup_documents` removes training documents near-duplicate to evaluation documents.
* :class:`ChunkOverlapIndex` finds, for an evaluation chunk, the training chunk of highest n-gram
  Jaccard similarity (a leakage measure for retro-eval).

Signature dtype: the scheme's own storage dtype (``uint32`` for the default ``affine32``, ``uint64``
for ``affine64`` and ``legacy``), exactly ``MinHash.hashvalues``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "ChunkOverlapIndex",
    "DedupReport",
    "RemovedDocument",
    "dedup_documents",
    "exact_jaccard",
    "minhash_signatures",
    "murmur3_fmix",
    "shingle_hashes",
    "to_minhash",
]

SCHEMES = ("affine32", "affine64", "legacy")
_SCHEME_DTYPE = {"affine32": np.uint32, "affine64": np.uint64, "legacy": np.uint64}
_MERSENNE_PRIME = np.uint64((1 << 61) - 1)
_MAX_HASH32 = np.uint64((1 << 32) - 1)

# MurmurHash3's finaliser ("fmix32" / "fmix64", Appleby's public-domain smhasher), the constants
# datasketch's affine schemes pre-mix with: (shift, multiplier, shift, multiplier, shift).
_FMIX = {
    32: (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35), np.uint32(16)),
    64: (
        np.uint64(33),
        np.uint64(0xFF51AFD7ED558CCD),
        np.uint64(33),
        np.uint64(0xC4CEB9FE1A85EC53),
        np.uint64(33),
    ),
}


def murmur3_fmix(hv: np.ndarray, width: int) -> np.ndarray:
    """MurmurHash3's finaliser on a uint{width} array [S] (width 32 or 64), element-wise.

    A bijection on [0, 2^width) that avalanches every input bit; datasketch's ``affine32`` and
    ``affine64`` schemes apply it to each shingle hash before the permutations ``a * h + b``.
    Multiplication wraps modulo 2^width, as intended. Bit-identical to datasketch's own copy
    (tested in test_minhash.py).
    """
    s1, m1, s2, m2, s3 = _FMIX[width]
    hv = hv ^ (hv >> s1)
    hv = hv * m1
    hv = hv ^ (hv >> s2)
    hv = hv * m2
    return hv ^ (hv >> s3)


# --------------------------------------------------------------------------------------------
# Shingles
# --------------------------------------------------------------------------------------------

_SLICES: dict[int, list[slice]] = {}
_SHA1 = hashlib.sha1
_DIGEST = type(hashlib.sha1()).digest


def _token_array(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    """One document's token ids as a 1-D uint32 array (checked: integers in [0, 2**32))."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"a document must be a 1-D sequence of token ids, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.uint32)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "i" or arr.dtype.itemsize > 4:
        if int(arr.min()) < 0 or int(arr.max()) >= 1 << 32:
            raise ValueError("token ids must lie in [0, 2**32)")
    return arr.astype(np.uint32, copy=False)


def _token_bytes(tokens: Sequence[int] | np.ndarray) -> bytes:
    return _token_array(tokens).astype("<u4", copy=False).tobytes()


def _slices(ngram: int, count: int) -> list[slice]:
    """Byte slices of the first `count` shingles of an `ngram`-gram (cached, grown on demand)."""
    cached = _SLICES.setdefault(ngram, [])
    if len(cached) < count:
        width = 4 * ngram
        cached.extend(slice(4 * i, 4 * i + width) for i in range(len(cached), max(count, 1024)))
    return cached if len(cached) == count else cached[:count]


def _shingles_of_bytes(buf: bytes, ngram: int) -> list[bytes]:
    ntok = len(buf) // 4
    if ntok == 0:
        return []
    if ntok < ngram:
        return [buf]
    return list(map(buf.__getitem__, _slices(ngram, ntok - ngram + 1)))


def _check_ngram(ngram: int) -> None:
    if not isinstance(ngram, int | np.integer) or ngram < 1:
        raise ValueError(f"ngram must be a positive integer, got {ngram!r}")


def shingle_hashes(tokens: Sequence[int] | np.ndarray, ngram: int = 13) -> list[bytes]:
    """The shingles of one document, as the byte strings fed to ``datasketch.MinHash.update``.

    Args:
        tokens: token ids of one document, length n_doc, each in [0, 2**32).
        ngram: shingle width in tokens (RETRO: 13).

    Returns:
        ``max(n_doc - ngram + 1, 1)`` byte strings (0 for an empty document): each ``ngram``-gram of
        ids as little-endian uint32 bytes (``4 * ngram`` bytes), in order, duplicates kept. A
        document shorter than ``ngram`` gives one shingle, the bytes of the whole document.
    """
    _check_ngram(ngram)
    return _shingles_of_bytes(_token_bytes(tokens), ngram)


def shingle_set(tokens: Sequence[int] | np.ndarray, ngram: int = 13) -> set[bytes]:
    """The set of :func:`shingle_hashes` of one document (what Jaccard similarity is taken over)."""
    return set(shingle_hashes(tokens, ngram))


def exact_jaccard(a: set[bytes], b: set[bytes]) -> float:
    """Exact Jaccard similarity |a & b| / |a | b| of two shingle sets (0.0 when both are empty)."""
    if not a and not b:
        return 0.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


# --------------------------------------------------------------------------------------------
# Signatures
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=32)
def _permutations(num_perm: int, seed: int, scheme: str) -> np.ndarray:
    """datasketch's own permutation parameters ``[2, num_perm]`` (a, b) for this seed and scheme."""
    perms = MinHash(num_perm=num_perm, seed=seed, scheme=scheme).permutations
    perms = np.asarray(perms, dtype=_SCHEME_DTYPE[scheme])
    perms.setflags(write=False)
    return perms


def _empty_value(scheme: str) -> int:
    return int(MinHash(num_perm=1, seed=1, scheme=scheme).hashvalues[0])


def _hash_shingles(shingles: list[bytes], scheme: str) -> np.ndarray:
    """SHA-1 of each shingle, first 4 (or 8 for affine64) digest bytes little-endian.

    Equal to ``[datasketch.hashfunc.sha1_hash32(s) for s in shingles]`` (``sha1_hash64`` for
    affine64) but with no Python-level call per shingle.
    """
    digests = b"".join(map(_DIGEST, map(_SHA1, shingles)))
    if scheme == "affine64":
        raw = np.frombuffer(digests, dtype=np.uint8).reshape(-1, 20)[:, :8]
        return np.ascontiguousarray(raw).view("<u8").reshape(-1).astype(np.uint64)
    return np.frombuffer(digests, dtype="<u4")[::5].astype(np.uint32)


def _permute_t(hv: np.ndarray, perms: np.ndarray, scheme: str, out: np.ndarray) -> np.ndarray:
    """Permuted hash values, transposed ``[num_perm, S]``, exactly as ``MinHash.update_batch``.

    Written into ``out[:, :S]`` (a reused buffer: fresh multi-MiB arrays cost more in page faults
    than the arithmetic); the transposed layout keeps the per-document min-reduction contiguous.
    """
    a, b = perms
    s = hv.shape[0]
    if scheme == "legacy":
        phv = (a[:, None] * hv.astype(np.uint64)[None, :] + b[:, None]) % _MERSENNE_PRIME
        return np.bitwise_and(phv, _MAX_HASH32, out=out[:, :s])
    width = 32 if scheme == "affine32" else 64
    mixed = murmur3_fmix(hv, width)
    phv = np.multiply(a[:, None], mixed[None, :], out=out[:, :s])
    phv += b[:, None]
    return phv


def _batches(
    docs: Iterable[Sequence[int] | np.ndarray], ngram: int, max_shingles: int
) -> Iterator[tuple[list[bytes], list[int]]]:
    """Group documents into batches of about `max_shingles` shingles: (shingles, counts per doc)."""
    shingles: list[bytes] = []
    counts: list[int] = []
    for doc in docs:
        sh = _shingles_of_bytes(_token_bytes(doc), ngram)
        shingles.extend(sh)
        counts.append(len(sh))
        if len(shingles) >= max_shingles:
            yield shingles, counts
            shingles, counts = [], []
    if counts:
        yield shingles, counts


def _signatures_of_batch(
    shingles: list[bytes],
    counts: list[int],
    perms: np.ndarray,
    scheme: str,
    rows_per_pass: int,
) -> np.ndarray:
    """Signatures ``[len(counts), num_perm]`` of one batch of documents."""
    dtype = _SCHEME_DTYPE[scheme]
    sig = np.full((len(counts), perms.shape[1]), _empty_value(scheme), dtype=dtype)
    if not shingles:
        return sig
    hv = _hash_shingles(shingles, scheme)  # [S]
    counts_arr = np.asarray(counts, dtype=np.int64)
    doc_of = np.repeat(
        np.arange(len(counts), dtype=np.int64), counts_arr
    )  # [S] doc of each shingle
    buf = np.empty((perms.shape[1], min(rows_per_pass, hv.shape[0])), dtype=dtype)
    for lo in range(0, hv.shape[0], rows_per_pass):
        hi = min(lo + rows_per_pass, hv.shape[0])
        phv_t = _permute_t(hv[lo:hi], perms, scheme, buf)  # [num_perm, rows]
        d = doc_of[lo:hi]
        starts = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])  # first row of each doc's run
        seg_min = np.minimum.reduceat(phv_t, starts, axis=1).T  # [docs in pass, num_perm]
        rows = d[starts]  # distinct within one pass (a doc's shingles are contiguous)
        sig[rows] = np.minimum(sig[rows], seg_min)
    return sig


BACKENDS = ("auto", "numba", "numpy")


@lru_cache(maxsize=1)
def _numba_kernel():
    """The compiled affine32 kernel, or None when numba is not installed (extra ``[fast]``)."""
    try:
        from retro_db._minhash_numba import signatures_affine32
    except ImportError:
        return None
    return signatures_affine32


def _resolve_backend(backend: str, scheme: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "numpy":
        return "numpy"
    usable = scheme == "affine32" and _numba_kernel() is not None
    if backend == "numba" and not usable:
        raise ValueError(
            "backend='numba' needs the numba package (pip install 'retro-db[fast]') and "
            f"scheme='affine32', got scheme={scheme!r}"
        )
    return "numba" if usable else "numpy"


def _token_batches(
    docs: Iterable[Sequence[int] | np.ndarray], max_tokens: int
) -> Iterator[list[np.ndarray]]:
    arrays: list[np.ndarray] = []
    total = 0
    for doc in docs:
        arr = _token_array(doc)
        arrays.append(arr)
        total += arr.size
        if total >= max_tokens:
            yield arrays
            arrays, total = [], 0
    if arrays:
        yield arrays


def minhash_signatures(
    docs: Iterable[Sequence[int] | np.ndarray],
    num_perm: int = 128,
    seed: int = 1,
    ngram: int = 13,
    *,
    scheme: str = "affine32",
    backend: str = "auto",
    batch_shingles: int = 1 << 16,
    progress: bool = False,
) -> np.ndarray:
    """MinHash signatures of many documents at once, bit-identical to datasketch.

    Row i equals ``datasketch.MinHash(num_perm, seed, scheme=scheme)`` after
    ``update_batch(shingle_hashes(docs[i], ngram))`` (its ``hashvalues``).

    Args:
        docs: D documents, each a sequence of token ids (streamed; memory grows with D * num_perm
            only, plus one batch of about ``batch_shingles`` shingles).
        num_perm: signature length (datasketch ``num_perm``).
        seed: permutation seed (datasketch ``seed``).
        ngram: shingle width in tokens (13 in RETRO).
        scheme: datasketch permutation scheme: ``affine32`` (datasketch 2.x default), ``affine64``
            or ``legacy`` (datasketch < 2.0).
        backend: ``"numba"`` (a compiled SHA-1 + permutation kernel, affine32 only, needs the
            ``[fast]`` extra; ~5-10x datasketch), ``"numpy"`` (hashlib through C-level ``map`` and
            numpy permutations; ~1.5x datasketch) or ``"auto"`` (numba when usable).
        batch_shingles: shingles (tokens, for numba) per batch; bounds the working memory.
        progress: show a tqdm bar over documents.

    Returns:
        ``np.ndarray [D, num_perm]`` of the scheme's dtype (uint32 for affine32, uint64 otherwise).
    """
    _check_ngram(ngram)
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if num_perm < 1:
        raise ValueError(f"num_perm must be positive, got {num_perm}")
    perms = _permutations(int(num_perm), int(seed), scheme)
    out: list[np.ndarray] = []
    bar = tqdm(desc="minhash", unit="doc", disable=not progress)
    if _resolve_backend(backend, scheme) == "numba":
        kernel = _numba_kernel()
        for arrays in _token_batches(docs, max(1, batch_shingles)):
            tok = np.concatenate(arrays) if arrays else np.zeros(0, np.uint32)
            offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
            np.cumsum([a.size for a in arrays], out=offsets[1:])
            sig = np.empty((len(arrays), num_perm), dtype=np.uint32)
            kernel(tok, offsets, int(ngram), perms[0], perms[1], sig)
            out.append(sig)
            bar.update(len(arrays))
    else:
        # Rows of the [num_perm, rows] permuted block per numpy pass: a buffer of ~4 MiB.
        rows_per_pass = max(256, (1 << 20) // num_perm)
        for shingles, counts in _batches(docs, ngram, max(1, batch_shingles)):
            out.append(_signatures_of_batch(shingles, counts, perms, scheme, rows_per_pass))
            bar.update(len(counts))
    bar.close()
    if not out:
        return np.zeros((0, num_perm), dtype=_SCHEME_DTYPE[scheme])
    return np.concatenate(out, axis=0)


def to_minhash(
    sig_row: np.ndarray, seed: int = 1, scheme: str = "affine32", *, lean: bool = True
) -> LeanMinHash | MinHash:
    """A datasketch sketch holding one signature row ``[num_perm]`` (LeanMinHash unless lean=False)."""
    row = np.asarray(sig_row, dtype=_SCHEME_DTYPE[scheme])
    if row.ndim != 1:
        raise ValueError(f"a signature row must be 1-D, got shape {row.shape}")
    if lean:
        return LeanMinHash(seed=seed, hashvalues=row, scheme=scheme)
    perms = _permutations(int(row.shape[0]), int(seed), scheme)
    return MinHash(seed=seed, hashvalues=row, permutations=perms, scheme=scheme)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """MinHash estimate of Jaccard: share of equal signature entries (as ``MinHash.jaccard``)."""
    return float(np.count_nonzero(sig_a == sig_b)) / float(sig_a.shape[-1])


# --------------------------------------------------------------------------------------------
# Train / evaluation dedup
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemovedDocument:
    """One removed training document and the evaluation document it duplicates."""

    train_index: int  # position in the training document stream
    eval_index: int  # position in the evaluation documents (the best exact match)
    estimated_jaccard: float  # MinHash estimate
    exact_jaccard: float  # on the shingle sets


@dataclass
class DedupReport:
    """What :func:`dedup_documents` kept and removed, and why."""

    kept: np.ndarray  # int64 [D_kept] training document indices kept, ascending
    removed: list[RemovedDocument]
    num_train: int
    num_eval: int
    threshold: float
    lsh_threshold: float
    criterion: str  # "exact" or "estimate": which Jaccard is compared to the threshold
    ngram: int
    num_perm: int
    seed: int
    candidates_checked: int = 0  # LSH candidate pairs whose Jaccard was computed
    params: dict = field(default_factory=dict)

    def to_dict(self, include_kept: bool = False) -> dict:
        """JSON-safe dict (``kept`` only on request: it has one entry per kept document)."""
        d = {
            "num_train": self.num_train,
            "num_eval": self.num_eval,
            "num_removed": len(self.removed),
            "num_kept": int(self.kept.shape[0]),
            "threshold": self.threshold,
            "lsh_threshold": self.lsh_threshold,
            "criterion": self.criterion,
            "ngram": self.ngram,
            "num_perm": self.num_perm,
            "seed": self.seed,
            "candidates_checked": self.candidates_checked,
            "removed": [asdict(r) for r in self.removed],
            **self.params,
        }
        if include_kept:
            d["kept"] = [int(i) for i in self.kept]
        return d

    def to_json(self, include_kept: bool = False, indent: int | None = 2) -> str:
        """The report as JSON text (see :meth:`to_dict`)."""
        return json.dumps(self.to_dict(include_kept), indent=indent)


def _default_lsh_threshold(threshold: float) -> float:
    # LSH is only the candidate filter; exact Jaccard decides. A band setting tuned to a lower
    # threshold misses fewer true pairs near the threshold at the cost of more candidates.
    return max(0.05, threshold - 0.15)


def _doc_batches(
    docs: Iterable[Sequence[int] | np.ndarray], batch_docs: int
) -> Iterator[tuple[int, list[np.ndarray]]]:
    """(index of the first, documents) of consecutive batches of ``batch_docs`` documents, read
    lazily (the last batch may be shorter)."""
    batch: list[np.ndarray] = []
    count = 0
    for doc in docs:
        batch.append(np.asarray(doc))
        count += 1
        if len(batch) >= batch_docs:
            yield count - len(batch), batch
            batch = []
    if batch:
        yield count - len(batch), batch


def _dedup_lsh_threshold(threshold: float, criterion: str, lsh_threshold: float | None) -> float:
    """Check :func:`dedup_documents`'s ``threshold`` and ``criterion``; return its LSH threshold
    (checked; default ``_default_lsh_threshold``)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if criterion not in ("exact", "estimate"):
        raise ValueError(f"criterion must be 'exact' or 'estimate', got {criterion!r}")
    lsh_threshold = _default_lsh_threshold(threshold) if lsh_threshold is None else lsh_threshold
    if not 0.0 < lsh_threshold <= 1.0:
        raise ValueError(f"lsh_threshold must be in (0, 1], got {lsh_threshold}")
    return lsh_threshold


def _index_eval_docs(
    eval_docs: Iterable[Sequence[int] | np.ndarray],
    ngram: int,
    num_perm: int,
    seed: int,
    scheme: str,
    lsh_threshold: float,
) -> tuple[list[set[bytes]], np.ndarray, MinHashLSH]:
    """The evaluation documents' shingle sets and signatures, and a ``MinHashLSH`` holding
    those with shingles (keys: their indices)."""
    eval_list = [np.asarray(d) for d in eval_docs]
    eval_sets = [shingle_set(d, ngram) for d in eval_list]
    eval_sigs = minhash_signatures(eval_list, num_perm, seed, ngram, scheme=scheme)
    lsh = MinHashLSH(threshold=lsh_threshold, num_perm=num_perm)
    with lsh.insertion_session() as session:
        for j, sig in enumerate(eval_sigs):
            if eval_sets[j]:
                session.insert(j, to_minhash(sig, seed, scheme), check_duplication=False)
    logger.info(
        "dedup: %d evaluation documents indexed (LSH b=%d r=%d)", len(eval_list), lsh.b, lsh.r
    )
    return eval_sets, eval_sigs, lsh


def _best_match(
    index: int,
    doc: np.ndarray,
    sig: np.ndarray,
    cands: list,
    eval_sigs: np.ndarray,
    eval_sets: list[set[bytes]],
    ngram: int,
    threshold: float,
    criterion: str,
) -> RemovedDocument | None:
    """Of the LSH candidates ``cands`` of training document ``index``, the evaluation document
    with the highest Jaccard (by ``criterion``) at or above ``threshold``; None if none is."""
    best: RemovedDocument | None = None
    best_score = -1.0
    if cands:
        tset = shingle_set(doc, ngram)
        for j in sorted(cands):
            est = estimated_jaccard(sig, eval_sigs[j])
            exact = exact_jaccard(tset, eval_sets[j])
            score = exact if criterion == "exact" else est
            if score >= threshold and score > best_score:
                best, best_score = RemovedDocument(index, int(j), est, exact), score
    return best


def dedup_documents(
    train_docs: Iterable[Sequence[int] | np.ndarray],
    eval_docs: Iterable[Sequence[int] | np.ndarray],
    threshold: float = 0.8,
    num_perm: int = 128,
    ngram: int = 13,
    *,
    seed: int = 1,
    scheme: str = "affine32",
    lsh_threshold: float | None = None,
    criterion: str = "exact",
    batch_docs: int = 1024,
    progress: bool = False,
) -> DedupReport:
    """Remove training documents whose n-gram Jaccard with any evaluation document is >= threshold.

    RETRO: 13-gram Jaccard >= 0.8 against validation/test documents, found with MinHash. The
    evaluation documents' signatures go into a ``datasketch.MinHashLSH`` (tuned to
    ``lsh_threshold``, by default ``threshold - 0.15``, so that pairs near the threshold are
    rarely missed); each training document queries it, and for every candidate both the MinHash
    estimate and the exact Jaccard of the shingle sets are computed. ``criterion="exact"`` (default)
    removes a document when the exact Jaccard is >= threshold; ``"estimate"`` uses the MinHash
    estimate (as a pure-MinHash pipeline would). Empty documents are never removed.

    Args:
        train_docs: training documents (token ids), streamed in batches of ``batch_docs``.
        eval_docs: evaluation documents (token ids), held in memory (signatures and shingle sets).
        threshold: Jaccard at or above which a training document is removed.
        num_perm, ngram, seed, scheme: as :func:`minhash_signatures`.

    Returns:
        :class:`DedupReport`: kept indices, and for each removed document the evaluation document
        with the highest Jaccard (by ``criterion``) and both Jaccard values.
    """
    lsh_threshold = _dedup_lsh_threshold(threshold, criterion, lsh_threshold)
    eval_sets, eval_sigs, lsh = _index_eval_docs(
        eval_docs, ngram, num_perm, seed, scheme, lsh_threshold
    )

    kept: list[int] = []
    removed: list[RemovedDocument] = []
    checked = 0
    num_train = 0
    bar = tqdm(desc="dedup", unit="doc", disable=not progress)
    for first, batch in _doc_batches(train_docs, batch_docs):
        sigs = minhash_signatures(batch, num_perm, seed, ngram, scheme=scheme)
        for off, (doc, sig) in enumerate(zip(batch, sigs, strict=True)):
            index = first + off
            cands = lsh.query(to_minhash(sig, seed, scheme)) if doc.size else []
            best = _best_match(
                index, doc, sig, cands, eval_sigs, eval_sets, ngram, threshold, criterion
            )
            checked += len(cands)
            if best is None:
                kept.append(index)
            else:
                removed.append(best)
        num_train = first + len(batch)
        bar.update(len(batch))
    bar.close()
    logger.info("dedup: removed %d of %d training documents", len(removed), num_train)
    return DedupReport(
        kept=np.asarray(kept, dtype=np.int64),
        removed=removed,
        num_train=num_train,
        num_eval=len(eval_sets),
        threshold=float(threshold),
        lsh_threshold=float(lsh_threshold),
        criterion=criterion,
        ngram=int(ngram),
        num_perm=int(num_perm),
        seed=int(seed),
        candidates_checked=checked,
        params={"scheme": scheme},
    )


# --------------------------------------------------------------------------------------------
# Chunk overlap (leakage) index
# --------------------------------------------------------------------------------------------


class ChunkOverlapIndex:
    """Find the training chunk with the highest n-gram Jaccard similarity to a query chunk.

    The training chunks' signatures go into a ``datasketch.MinHashLSH`` tuned to ``threshold``
    (default 0.3: a deliberately low candidate threshold, since a 64-token chunk has only 52
    13-grams and the interesting overlaps are partial); the exact Jaccard of the shingle sets is then
    computed for every candidate and the best is returned. Chunks whose Jaccard with the query is
    below ``threshold`` may be missed by LSH, so a returned Jaccard below ``threshold`` is a lower
    bound; at or above it, misses are rare (the LSH false-negative rate at that similarity).

    Args:
        chunks: int array ``[N, m]`` of training chunk tokens (a memmap is fine: rows are read back
            only for candidates).
        lengths: int ``[N]`` real tokens per chunk (None: all m).
        ngram: shingle width in tokens (13 as in RETRO's dedup; 64-token chunks then have 52
            shingles; use a smaller value, e.g. 8, to see shorter overlaps).
        threshold: LSH candidate threshold (Jaccard).
        num_perm, seed, scheme: as :func:`minhash_signatures`.
    """

    def __init__(
        self,
        chunks: np.ndarray,
        lengths: np.ndarray | None = None,
        *,
        ngram: int = 13,
        threshold: float = 0.3,
        num_perm: int = 128,
        seed: int = 1,
        scheme: str = "affine32",
        batch_chunks: int = 8192,
        progress: bool = False,
    ) -> None:
        _check_ngram(ngram)
        if chunks.ndim != 2:
            raise ValueError(f"chunks must be a 2-D array [N, m], got shape {chunks.shape}")
        n, m = chunks.shape
        if lengths is None:
            lengths = np.full(n, m, dtype=np.int64)
        lengths = np.asarray(lengths)
        if lengths.shape != (n,):
            raise ValueError(f"lengths must have shape [{n}], got {lengths.shape}")
        if n and (lengths.min() < 0 or lengths.max() > m):
            raise ValueError(f"lengths must lie in [0, {m}]")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.chunks = chunks
        self.lengths = lengths
        self.ngram = int(ngram)
        self.threshold = float(threshold)
        self.num_perm = int(num_perm)
        self.seed = int(seed)
        self.scheme = scheme
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        bar = tqdm(total=n, desc="chunk-lsh", unit="chunk", disable=not progress)
        with self.lsh.insertion_session() as session:
            for lo in range(0, n, batch_chunks):
                hi = min(n, lo + batch_chunks)
                docs = [chunks[i, : lengths[i]] for i in range(lo, hi)]
                sigs = minhash_signatures(docs, num_perm, seed, ngram, scheme=scheme)
                for i, sig in zip(range(lo, hi), sigs, strict=True):
                    if lengths[i] > 0:
                        session.insert(i, to_minhash(sig, seed, scheme), check_duplication=False)
                bar.update(hi - lo)
        bar.close()

    def __len__(self) -> int:
        return int(self.chunks.shape[0])

    def _best(self, query_set: set[bytes], sig: np.ndarray) -> tuple[int, float]:
        if not query_set:
            return -1, 0.0
        best_id, best_j = -1, 0.0
        for i in sorted(self.lsh.query(to_minhash(sig, self.seed, self.scheme))):
            j = exact_jaccard(query_set, shingle_set(self.chunks[i, : self.lengths[i]], self.ngram))
            if j > best_j:
                best_id, best_j = int(i), j
        return best_id, best_j

    def best_match(self, chunk_tokens: Sequence[int] | np.ndarray) -> tuple[int, float]:
        """(chunk id, exact Jaccard) of the best candidate for one query chunk; (-1, 0.0) if none.

        Args:
            chunk_tokens: the query chunk's real tokens (length <= m; no padding).
        """
        sig = minhash_signatures(
            [chunk_tokens], self.num_perm, self.seed, self.ngram, scheme=self.scheme
        )
        return self._best(shingle_set(chunk_tokens, self.ngram), sig[0])

    def best_matches(
        self, chunks: np.ndarray, lengths: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Batched :meth:`best_match` over query chunks ``[q, m]`` (+ lengths ``[q]``).

        Returns:
            (chunk ids int64 [q] with -1 for none, exact Jaccard float64 [q]).
        """
        q, m = chunks.shape
        lengths = np.full(q, m, dtype=np.int64) if lengths is None else np.asarray(lengths)
        docs = [chunks[i, : lengths[i]] for i in range(q)]
        sigs = minhash_signatures(docs, self.num_perm, self.seed, self.ngram, scheme=self.scheme)
        ids = np.full(q, -1, dtype=np.int64)
        jac = np.zeros(q, dtype=np.float64)
        for i, (doc, sig) in enumerate(zip(docs, sigs, strict=True)):
            ids[i], jac[i] = self._best(shingle_set(doc, self.ngram), sig)
        return ids, jac
