"""kNN-LM (Khandelwal et al. 2020) as a scoring method for a causal LM: the comparison row "kNN-LM".

A datastore holds one entry per token of the retrieval database's text: the key is the hidden
state the LM's read-out multiplies at the position before the token (its context's
representation) and the value is the token. To score a token, the k nearest keys of the current
hidden state (squared L2 distance, as faiss returns it and as the paper's code uses it) vote::

    p_kNN(y) = sum_i softmax(-d_i / T)[i] * [v_i == y]
    p(y)     = lambda * p_kNN(y) + (1 - lambda) * p_LM(y)

with the paper's defaults lambda = 0.25, k = 1024 (capped by the datastore's size) and temperature
T = 1. The LM part is computed exactly as the harness scores the base model (the same strided
windows and batches: :mod:`retro_eval.causal`), so lambda = 0 gives its per-chunk bits bit for bit
and the rows line up with the RETRO rows' chunks.

Leakage: like RETRO's same-document exclusion, the entries of a database document are never
neighbours of the evaluated document that *is* that document (``exclude_doc_ids``: found by its
doc id or by identical token content, :func:`matching_database_documents`).

The datastore is built with the model's own strided windows over each database document (the
first token after the prefix token, as in evaluation). Keys are float32 in a faiss index: exact
``IndexFlatL2`` by default, or any ``index_factory`` string (e.g. ``"IVF256,PQ32"``) for a
compressed one, trained on the keys themselves.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .causal import (
    LN2,
    Item,
    assemble_result,
    causal_geometry,
    first_token_logp,
    score_items,
    window_items,
)
from .perplexity import ScoreResult

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_K",
    "DEFAULT_LAMBDA",
    "Datastore",
    "KnnScores",
    "build_datastore",
    "database_documents",
    "interpolate",
    "knn_logprob",
    "matching_database_documents",
    "score_knnlm",
]

#: the paper's interpolation weight (Wikitext-103, in-domain datastore).
DEFAULT_LAMBDA = 0.25
#: the paper's number of neighbours.
DEFAULT_K = 1024


@dataclass
class Datastore:
    """kNN-LM entries: keys float32 [N, d] in a faiss index, values int64 [N], docs int64 [N].

    Attributes:
        index: the faiss index of the keys (ids = entry numbers).
        values: the next token of each entry.
        docs: the database document index of each entry (the exclusion), -1 when unknown.
        keys: the keys (kept for exact distances and tests), or None.
        build_seconds: time the build took (the LM passes and the index).
    """

    index: Any
    values: np.ndarray
    docs: np.ndarray
    keys: np.ndarray | None = None
    build_seconds: float = 0.0
    _doc_counts: dict[int, int] = field(default_factory=dict)

    @classmethod
    def from_arrays(
        cls,
        keys: np.ndarray,
        values: np.ndarray,
        docs: np.ndarray | None = None,
        *,
        index_factory: str | None = None,
        keep_keys: bool = True,
    ) -> Datastore:
        """A datastore of given keys [N, d], values [N] and documents [N] (default -1)."""
        import faiss

        keys = np.ascontiguousarray(keys, dtype=np.float32)
        if keys.ndim != 2 or len(keys) == 0:
            raise ValueError(f"keys: expected a non-empty [N, d] array, got shape {keys.shape}")
        values = np.asarray(values, dtype=np.int64).reshape(-1)
        docs = (
            np.full(len(values), -1, np.int64)
            if docs is None
            else np.asarray(docs, dtype=np.int64).reshape(-1)
        )
        if len(values) != len(keys) or len(docs) != len(keys):
            raise ValueError(f"{len(keys)} keys, {len(values)} values, {len(docs)} docs")
        d = keys.shape[1]
        if index_factory:
            index = faiss.index_factory(d, index_factory, faiss.METRIC_L2)
            index.train(keys)
        else:
            index = faiss.IndexFlatL2(d)
        index.add(keys)
        u, c = np.unique(docs, return_counts=True)
        return cls(
            index=index,
            values=values,
            docs=docs,
            keys=keys if keep_keys else None,
            _doc_counts={int(a): int(b) for a, b in zip(u, c, strict=True)},
        )

    @property
    def size(self) -> int:
        """N, the number of entries."""
        return int(len(self.values))

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(
        self, queries: np.ndarray, k: int, exclude_doc: int = -1
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest entries of queries [q, d], nearest first, never from ``exclude_doc``.

        Returns:
            (squared L2 distances float64 [q, k'], values int64 [q, k']) with k' = min(k, the
            entries not excluded); exactly the k' nearest (the search fetches k plus the excluded
            document's entry count, then drops those).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        excluded = self._doc_counts.get(int(exclude_doc), 0) if exclude_doc >= 0 else 0
        kk = min(int(k), self.size - excluded)
        if kk <= 0 or len(queries) == 0:
            return np.zeros((len(queries), 0)), np.zeros((len(queries), 0), np.int64)
        fetch = min(self.size, kk + excluded)
        dist, ids = self.index.search(queries, fetch)
        if excluded:
            keep = (ids >= 0) & (self.docs[np.maximum(ids, 0)] != exclude_doc)
            order = np.argsort(~keep, axis=1, kind="stable")[:, :kk]
            dist = np.take_along_axis(dist, order, 1)
            ids = np.take_along_axis(ids, order, 1)
        else:
            dist, ids = dist[:, :kk], ids[:, :kk]
        vals = np.where(ids >= 0, self.values[np.maximum(ids, 0)], -1)
        dist = np.where(ids >= 0, dist.astype(np.float64), np.inf)
        return dist, vals


def knn_logprob(
    distances: np.ndarray,
    values: np.ndarray,
    targets: np.ndarray,
    k: int,
    temperature: float = 1.0,
) -> np.ndarray:
    """log p_kNN(target) from each query's neighbours (nearest first): float64 [q].

    ``p_kNN(y) = sum_i softmax(-d_i / temperature)[i] * [v_i == y]`` over the first k neighbours;
    -inf where no neighbour has the target's value (or there is no neighbour).
    """
    d = np.asarray(distances, dtype=np.float64)[:, :k] / float(temperature)
    v = np.asarray(values)[:, :k]
    t = np.asarray(targets, dtype=np.int64).reshape(-1, 1)
    if d.shape[1] == 0:
        return np.full(len(t), -np.inf)
    finite = np.isfinite(d)
    dmin = np.where(finite, d, np.inf).min(axis=1, keepdims=True)
    w = np.where(finite, np.exp(-(d - np.where(np.isfinite(dmin), dmin, 0.0))), 0.0)
    z = w.sum(axis=1)
    hit = (w * (v == t)).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((z > 0) & (hit > 0), np.log(hit) - np.log(z), -np.inf)


def interpolate(logp_lm: np.ndarray, logp_knn: np.ndarray, lmbda: float) -> np.ndarray:
    """log(lambda * p_kNN + (1 - lambda) * p_LM), in log space (float64); lambda = 0 returns
    ``logp_lm`` unchanged (``logaddexp(x, -inf) == x``)."""
    if not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"lambda={lmbda}: expected a weight in [0, 1]")
    lm = np.asarray(logp_lm, dtype=np.float64)
    if lmbda == 0.0:
        return lm.copy()
    with np.errstate(divide="ignore"):
        a = lm + math.log1p(-lmbda) if lmbda < 1.0 else np.full_like(lm, -np.inf)
        return np.logaddexp(a, np.asarray(logp_knn, dtype=np.float64) + math.log(lmbda))


def database_documents(db: Any) -> tuple[list[list[int]], np.ndarray]:
    """The token documents of a ``retro_db.Database`` (its chunks' real tokens, concatenated in
    order) and their database document indices int64 [D']."""
    n = int(db.num_chunks)
    docs = np.asarray(db.doc_ids, dtype=np.int64)
    out: list[list[int]] = []
    index: list[int] = []
    step = 65536
    current: list[int] = []
    cur_doc = None
    for start in range(0, n, step):
        ids = np.arange(start, min(n, start + step))
        toks, lens = db.chunk_tokens(ids)
        for j, i in enumerate(ids):
            d = int(docs[i])
            if d != cur_doc:
                if cur_doc is not None and current:
                    out.append(current)
                    index.append(cur_doc)
                current, cur_doc = [], d
            current.extend(int(t) for t in toks[j, : int(lens[j])])
    if cur_doc is not None and current:
        out.append(current)
        index.append(cur_doc)
    return out, np.asarray(index, dtype=np.int64)


def _digest(tokens: Sequence[int]) -> str:
    return hashlib.sha256(np.asarray(tokens, dtype=np.int64).tobytes()).hexdigest()


def matching_database_documents(
    token_documents: Sequence[Sequence[int]],
    database_docs: Sequence[Sequence[int]],
    database_index: Sequence[int],
    *,
    doc_ids: Sequence[str] | None = None,
    db: Any = None,
) -> np.ndarray:
    """int64 [D]: the database document each evaluated document *is* (-1 if none): by doc id
    (``db.document_index``) when given, else the database document with identical tokens."""
    table = {_digest(d): int(i) for d, i in zip(database_docs, database_index, strict=True)}
    out = np.full(len(token_documents), -1, dtype=np.int64)
    for j, d in enumerate(token_documents):
        if doc_ids is not None and db is not None and hasattr(db, "document_index"):
            out[j] = int(db.document_index(str(doc_ids[j])))
        if out[j] < 0:
            out[j] = table.get(_digest(d), -1)
    return out


def build_datastore(
    model: torch.nn.Module,
    token_documents: Sequence[Sequence[int]],
    doc_index: Sequence[int] | None = None,
    *,
    prefix_id: int,
    chunk_size: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    max_batch_tokens: int | None = 8192,
    index_factory: str | None = None,
    max_tokens: int | None = None,
    keep_keys: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> Datastore:
    """The kNN-LM datastore of a corpus: (read-out hidden state -> next token) for every token.

    Args:
        model: the causal LM (as in :func:`score_knnlm`).
        token_documents: the database's documents (:func:`database_documents`).
        doc_index: their database document indices (the exclusion); default 0..D'-1.
        prefix_id: the token before each document's first token.
        chunk_size, window, stride: the scoring geometry (default the model's).
        batch_size: windows per forward pass; max_batch_tokens: at most this many tokens per
            forward pass (a longer window runs alone; None: no bound). The database's long
            documents fill windows of n tokens, and the forward pass's logits of B windows are
            B x n x |V| floats: for SmolLM2 (n = 8,192, |V| = 49,152) 1.6 GB a window.
        index_factory: a faiss factory string for a compressed index (default exact L2).
        max_tokens: at most this many tokens: a seeded random subset of whole documents (taken
            in random order while they fit, kept in database order; logged).
        seed: seeds that subset.
        keep_keys: keep the float32 keys in memory beside the index.
    """
    t0 = time.perf_counter()
    n, s, m, pad = causal_geometry(model, chunk_size=chunk_size, window=window, stride=stride)
    docs = [list(map(int, d)) for d in token_documents if len(d)]
    dix = (
        np.arange(len(token_documents), dtype=np.int64)
        if doc_index is None
        else np.asarray(doc_index, dtype=np.int64)
    )
    dix = np.asarray([dix[i] for i, d in enumerate(token_documents) if len(d)], dtype=np.int64)
    if max_tokens is not None and sum(len(d) for d in docs) > int(max_tokens):
        # a seeded random subset of whole documents (every source of the database represented),
        # kept in database order: documents are taken in random order while they fit
        order = np.random.default_rng(seed).permutation(len(docs))
        chosen, total = [], 0
        for j in order:
            if total + len(docs[j]) <= int(max_tokens):
                chosen.append(int(j))
                total += len(docs[j])
        chosen.sort()
        logger.warning(
            "kNN-LM datastore: a random %d of %d documents (%d of %d tokens, max_tokens=%d)",
            len(chosen), len(docs), total, sum(len(d) for d in docs), int(max_tokens),
        )  # fmt: skip
        docs, dix = [docs[j] for j in chosen], dix[chosen]
    if not docs:
        raise ValueError("kNN-LM datastore: no tokens to build it from")
    keys: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    owner: list[np.ndarray] = []
    with torch.inference_mode():
        _, h0 = first_token_logp(model, prefix_id)
    h0 = h0.float().cpu().numpy()
    keys.append(np.repeat(h0[None], len(docs), axis=0))
    vals.append(np.asarray([d[0] for d in docs], dtype=np.int64))
    owner.append(dix.copy())

    def collect(it: Item, hidden: torch.Tensor, _lp: np.ndarray) -> None:
        keys.append(hidden.float().cpu().numpy())
        vals.append(np.asarray(it.tokens[it.first :], dtype=np.int64))
        owner.append(np.full(it.num_targets, dix[it.doc], dtype=np.int64))

    score_items(
        model, window_items(docs, n, s), chunk_size=m, pad_id=pad, batch_size=batch_size,
        max_batch_tokens=max_batch_tokens, on_hidden=collect, progress=progress,
        desc="kNN-LM datastore",
    )  # fmt: skip
    store = Datastore.from_arrays(
        np.concatenate(keys),
        np.concatenate(vals),
        np.concatenate(owner),
        index_factory=index_factory,
        keep_keys=keep_keys,
    )
    store.build_seconds = time.perf_counter() - t0
    logger.info(
        "kNN-LM datastore: %d entries (d=%d) from %d documents in %.1f s",
        store.size, store.dim, len(docs), store.build_seconds,
    )  # fmt: skip
    return store


@dataclass
class KnnScores:
    """Per-token log p of the LM and of the kNN distribution, for every k of a sweep.

    Attributes:
        lm: D arrays float64 [T_d] of log p_LM(token) (natural log).
        knn: {k: D arrays float64 [T_d] of log p_kNN(token)}.
        token_documents: the documents scored.
        geometry: (n, s, m, pad_id).
        decode: token ids -> text (the chunks' bytes).
        seconds: wall time of the scoring (LM passes + searches).
        datastore_size: N.
    """

    lm: list[np.ndarray]
    knn: dict[int, list[np.ndarray]]
    token_documents: list[list[int]]
    geometry: tuple[int, int, int, int]
    decode: Callable[[list[int]], str]
    seconds: float = 0.0
    datastore_size: int = 0

    @property
    def ks(self) -> list[int]:
        return sorted(self.knn)

    def result(self, lmbda: float = DEFAULT_LAMBDA, k: int | None = None) -> ScoreResult:
        """The interpolated model's :class:`ScoreResult` at weight ``lmbda`` and k neighbours
        (default the largest k scored)."""
        kk = max(self.knn) if k is None else int(k)
        if kk not in self.knn:
            raise ValueError(f"k={kk} was not scored (scored: {self.ks})")
        n, s, m, pad = self.geometry
        bits = []
        for lm, kn in zip(self.lm, self.knn[kk], strict=True):
            lp = interpolate(lm, kn, lmbda)
            b = -lp / LN2
            b[0] = -np.float32(lp[0]) / LN2  # token 0 as score_token_documents computes it
            bits.append(b)
        return assemble_result(
            self.token_documents, bits, chunk_size=m, pad_id=pad, decode=self.decode, window=n,
            stride=s, k=kk,
            meta={"method": "knnlm", "lambda": float(lmbda), "knn_k": kk,
                  "datastore": self.datastore_size},
        )  # fmt: skip

    def sweep(
        self, lambdas: Sequence[float] = (0.0, 0.1, 0.25, 0.5), ks: Sequence[int] | None = None
    ) -> list[dict[str, Any]]:
        """bpb at every (lambda, k): [{"lambda", "k", "bpb"}]."""
        rows = []
        for k in ks or self.ks:
            for lam in lambdas:
                rows.append({"lambda": float(lam), "k": int(k), "bpb": self.result(lam, k).bpb()})
        return rows


def score_knnlm(
    model: torch.nn.Module,
    token_documents: Sequence[Sequence[int]],
    datastore: Datastore,
    *,
    decode: Callable[[list[int]], str],
    prefix_id: int,
    ks: Sequence[int] = (DEFAULT_K,),
    temperature: float = 1.0,
    exclude_doc_ids: Sequence[int] | None = None,
    chunk_size: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> KnnScores:
    """Score documents with kNN-LM: the LM's log p and log p_kNN of every token, for each k.

    Args:
        model: a causal LM that reads no neighbours here: a ``RetrofittedLM`` (its frozen base),
            a ``Retro`` or a Hugging Face causal LM (then ``chunk_size`` is required).
        token_documents: D documents of token ids (each non-empty).
        datastore: from :func:`build_datastore` (the same model).
        decode: token ids -> text; prefix_id: the token before each document's first token.
        ks: neighbour counts to score (each capped by the datastore's size; the search runs once
            with the largest).
        temperature: divides the distances in the softmax (the paper: 1).
        exclude_doc_ids: int [D]: the database document each evaluated document is (-1: none);
            its entries are never neighbours of that document.
        chunk_size, window, stride, batch_size: as the RETRO rows score (default the model's).

    Returns:
        :class:`KnnScores`; ``.result(lmbda, k)`` is the interpolated model's ScoreResult.
    """
    t0 = time.perf_counter()
    n, s, m, pad = causal_geometry(model, chunk_size=chunk_size, window=window, stride=stride)
    docs = [list(map(int, d)) for d in token_documents]
    for i, d in enumerate(docs):
        if not d:
            raise ValueError(f"document {i} has no tokens")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks={list(ks)}: expected neighbour counts >= 1")
    excl = (
        np.full(len(docs), -1, np.int64)
        if exclude_doc_ids is None
        else np.asarray(exclude_doc_ids, dtype=np.int64)
    )
    if len(excl) != len(docs):
        raise ValueError(f"exclude_doc_ids: {len(excl)} entries for {len(docs)} documents")
    kmax = max(int(k) for k in ks)
    if kmax > datastore.size:
        logger.info("kNN-LM: k=%d capped by the datastore's %d entries", kmax, datastore.size)
    lm = [np.zeros(len(d), dtype=np.float64) for d in docs]
    knn = {int(k): [np.zeros(len(d), dtype=np.float64) for d in docs] for k in ks}

    def vote(doc: int, pos: int, queries: np.ndarray, targets: np.ndarray) -> None:
        dist, vals = datastore.search(queries, kmax, int(excl[doc]))
        for k in knn:
            knn[k][doc][pos : pos + len(targets)] = knn_logprob(dist, vals, targets, k, temperature)

    with torch.inference_mode():
        first_logp, h0 = first_token_logp(model, prefix_id)
    h0 = h0.float().cpu().numpy()[None]
    for i, d in enumerate(docs):
        lm[i][0] = np.float64(first_logp[d[0]])
        vote(i, 0, h0, np.asarray([d[0]]))

    def on_hidden(it: Item, hidden: torch.Tensor, lp: np.ndarray) -> None:
        lm[it.doc][it.target_from : it.target_from + len(lp)] = lp
        vote(
            it.doc,
            it.target_from,
            hidden.float().cpu().numpy(),
            np.asarray(it.tokens[it.first :], dtype=np.int64),
        )

    score_items(
        model, window_items(docs, n, s), chunk_size=m, pad_id=pad, batch_size=batch_size,
        on_hidden=on_hidden, progress=progress, desc="kNN-LM",
    )  # fmt: skip
    return KnnScores(
        lm=lm,
        knn=knn,
        token_documents=docs,
        geometry=(n, s, m, pad),
        decode=decode,
        seconds=time.perf_counter() - t0,
        datastore_size=datastore.size,
    )
