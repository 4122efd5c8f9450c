"""Sliding-window scoring of documents for RETRO[ON], RETRO[OFF] and a decoder-only baseline.

The scheme (the usual strided perplexity, with RETRO's chunk alignment):

* A document's tokens ``t[0..T-1]`` are scored one document at a time (windows never cross
  documents, as in lm-eval's ``loglikelihood_rolling``).
* ``t[0]`` is scored after a single prefix token (the tokenizer's end-of-text id, as lm-eval does);
  a one-token input retrieves nothing (the first m-1 tokens of a sequence never do), so this is
  exactly what a window ``[eos] + t`` would give for it.
* Windows of ``n`` (``window``) tokens start at ``0, s, 2s, ...`` (``stride`` s, a multiple of the chunk
  size m) and end at ``min(start + n, T)``; each window scores only the tokens that no earlier window
  scored, so every token is scored exactly once, with ``start`` as far back as the stride allows
  (at least ``n - s`` tokens of context once the first window is passed). The last window is the
  first one that reaches ``T``.
* Because window starts are multiples of m, the window's chunks are the document's own chunks
  ``t[c*m:(c+1)*m]``: neighbours are retrieved once per document chunk (a partial last chunk padded
  with the pad id), cached, and reused by every window (and by every k of a sweep: retrieval is done
  once with the largest k, neighbours are sorted nearest first, the first k are kept).
* Aggregation: per evaluation chunk ``C = t[c*m:(c+1)*m]`` (m = 64 in the paper) we keep its bits
  (sum of ``-log2 p`` of its tokens), its real token count, its UTF-8 bytes and its neighbours, so that
  bpb can be bucketed by the overlap of C with its neighbours (``overlap.bucket_bpb``).

Bytes attribution: the bytes of a chunk are ``len(tokenizer.decode(chunk_tokens).encode("utf-8"))``.
With a byte-level BPE a character whose UTF-8 bytes are split across a chunk boundary decodes on each
side as the decoder renders the fragment (U+FFFD, 3 bytes, for GPT-2), so the sum over a document's
chunks can differ by a few bytes from the document's own byte count; every bpb this module reports
(overall, per document, per bucket) divides by these same chunk bytes, so buckets and totals agree.
Measured with GPT-2 BPE on 20 wikitext-mini test articles: 409,877 chunk bytes for 409,873 document
bytes (+0.001%). lm-eval's ``bits_per_byte`` divides by the document's own UTF-8 bytes instead.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from retro_core.interface import RetrievalLM
from retro_core.retrieval import Neighbours, check_retriever

logger = logging.getLogger(__name__)

__all__ = [
    "DocumentNeighbours",
    "ScoreResult",
    "Window",
    "check_retriever_for",
    "has_retrieval",
    "model_device",
    "model_geometry",
    "plan_windows",
    "retrieve_document_neighbours",
    "score_documents",
    "score_token_documents",
    "shuffle_document_neighbours",
    "shuffled_slots",
    "sweep_k",
]

LN2 = math.log(2.0)


@dataclass(frozen=True)
class Window:
    """One scoring window over a document.

    Attributes:
        doc: index of the document.
        begin: first token of the window (a multiple of m).
        end: one past the window's last token (``end - begin <= n``).
        score_from: first target token the window scores (``begin < score_from <= end``; the targets
            ``t[score_from:end]`` are read from the logits at positions ``score_from-1-begin ..
            end-2-begin``).
    """

    doc: int
    begin: int
    end: int
    score_from: int


def plan_windows(length: int, window: int, stride: int, doc: int = 0) -> list[Window]:
    """Strided windows over a document of ``length`` tokens (T).

    Token 0 is not covered (it is scored after the prefix token). Every token ``1..T-1`` is scored by
    exactly one window.

    Args:
        length: T, the document's number of tokens.
        window: n, the most tokens a window holds.
        stride: s, the distance between window starts (``1 <= s < n``).
        doc: the document index stored in each window.
    """
    if not 1 <= stride < window:
        raise ValueError(
            f"stride={stride}: expected 1 <= stride < window={window} (a window must hold the "
            "token before the first one it scores)"
        )
    out: list[Window] = []
    prev_end = 1
    begin = 0
    while prev_end < length:
        end = min(begin + window, length)
        if end > prev_end:
            out.append(Window(doc, begin, end, prev_end))
            prev_end = end
        begin += stride
    return out


@dataclass(frozen=True)
class DocumentNeighbours:
    """Neighbours of every chunk of one document: tokens [c, k, r], lengths [c, k], chunk_ids [c, k]."""

    tokens: np.ndarray
    lengths: np.ndarray
    chunk_ids: np.ndarray

    def first(self, k: int) -> DocumentNeighbours:
        """The k nearest neighbours of each chunk (retrievers return them nearest first)."""
        if k > self.tokens.shape[1]:
            raise ValueError(f"k={k} but only {self.tokens.shape[1]} neighbours were retrieved")
        return DocumentNeighbours(self.tokens[:, :k], self.lengths[:, :k], self.chunk_ids[:, :k])


def _chunks_of(tokens: Sequence[int], m: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Split a document into chunks: int64 [c, m] padded with pad_id, and real lengths [c]."""
    n_chunks = max(1, math.ceil(len(tokens) / m))
    out = np.full((n_chunks, m), pad_id, dtype=np.int64)
    flat = np.asarray(tokens, dtype=np.int64)
    out.reshape(-1)[: len(flat)] = flat
    lengths = np.full(n_chunks, m, dtype=np.int64)
    lengths[-1] = len(flat) - (n_chunks - 1) * m
    return out, lengths


def retrieve_document_neighbours(
    retriever: Any,
    token_documents: Sequence[Sequence[int]],
    *,
    chunk_size: int,
    k: int,
    pad_id: int,
    batch_size: int = 256,
    progress: bool = True,
) -> list[DocumentNeighbours]:
    """Retrieve the k nearest database neighbours of every chunk of every document, once.

    Args:
        retriever: a ``retro_core.retrieval.Retriever`` (e.g. ``retro_db.Database``).
        token_documents: D documents of token ids.
        chunk_size: m.
        k: neighbours per chunk.
        pad_id: pads a document's partial last chunk when the retriever has no ``pad_id``.
        batch_size: query chunks per ``retrieve`` call.

    Returns:
        One :class:`DocumentNeighbours` per document (tokens [c, k, r], c = ceil(T / m)).
    """
    # A partial last chunk is padded with the retriever's own pad id (retro_db takes trailing pad
    # tokens as padding), else with the model's.
    query_pad = int(getattr(retriever, "pad_id", pad_id))
    all_chunks = []
    counts = []
    for doc in token_documents:
        chunks, _ = _chunks_of(doc, chunk_size, query_pad)
        all_chunks.append(chunks)
        counts.append(len(chunks))
    queries = np.concatenate(all_chunks) if all_chunks else np.zeros((0, chunk_size), np.int64)
    toks, lens, ids = [], [], []
    for start in tqdm(
        range(0, len(queries), batch_size), desc="retrieve", disable=not progress, unit="batch"
    ):
        nb = retriever.retrieve(queries[start : start + batch_size], k)
        toks.append(np.asarray(nb.tokens))
        lens.append(np.asarray(nb.lengths))
        ids.append(np.asarray(nb.chunk_ids))
    if not toks:
        return []
    tokens = np.concatenate(toks).astype(np.int64)
    lengths = np.concatenate(lens).astype(np.int64)
    chunk_ids = np.concatenate(ids).astype(np.int64)
    if tokens.shape[1] < k:
        raise ValueError(
            f"retriever returned {tokens.shape[1]} neighbours per chunk, expected k={k}"
        )
    out = []
    offset = 0
    for c in counts:
        out.append(
            DocumentNeighbours(
                tokens[offset : offset + c, :k],
                lengths[offset : offset + c, :k],
                chunk_ids[offset : offset + c, :k],
            )
        )
        offset += c
    return out


def shuffled_slots(
    groups: Sequence[int] | np.ndarray,
    *,
    seed: int = 0,
    avoid_same_group: bool = True,
    rounds: int = 32,
) -> np.ndarray:
    """A seeded derangement of C slots: the slot whose neighbours each slot receives.

    The control "RETRO[ON] with shuffled neighbours" gives evaluation chunk i the neighbours that
    were retrieved for chunk ``out[i]``. Guarantees, for C >= 2:

    - ``out`` is a permutation of ``0..C-1`` (each slot's neighbours are used exactly once);
    - ``out[i] != i`` for every i (a derangement: no chunk gets its own slot's neighbours);
    - with ``avoid_same_group``, the fewest possible chunks get neighbours from their own group (a
      document): none when no group holds more than C/2 chunks, else ``2 * max_group - C``.

    Construction: the slots are laid out group by group (the largest group first, groups and slots
    within them in a seeded random order) and each slot takes the slot ``max_group`` places further
    on (cyclically; 1 place when all slots share one group), which meets the guarantees; then
    ``rounds`` rounds of seeded random swaps between disjoint pairs of slots, each swap kept only when
    it keeps the guarantees, mix the assignment.

    Args:
        groups: int [C] group (document index) of each slot.
        seed: seeds the layout and the swaps (same seed and groups: same output).
        avoid_same_group: also keep chunks from receiving their own group's neighbours where possible.
        rounds: swap rounds (each proposes C/2 swaps).

    Returns:
        int64 [C] source slot of each slot.

    Raises:
        ValueError: fewer than 2 slots (a single chunk has no other chunk to take neighbours from),
            or ``groups`` not 1-D.
    """
    g = np.asarray(groups)
    if g.ndim != 1:
        raise ValueError(f"groups must be 1-D [C], got shape {list(g.shape)}")
    c = len(g)
    if c < 2:
        raise ValueError(
            f"shuffled neighbours need at least 2 evaluation chunks, got {c}: a single chunk has "
            "no other chunk to take neighbours from"
        )
    g = g.astype(np.int64) if avoid_same_group else np.zeros(c, dtype=np.int64)
    rng = np.random.default_rng(seed)
    labels, inverse, counts = np.unique(g, return_inverse=True, return_counts=True)
    # Group order: largest first, ties (and the rest) in random order; slots within a group shuffled.
    group_rank = np.empty(len(labels), dtype=np.int64)
    order_groups = np.lexsort((rng.permutation(len(labels)), -counts))
    group_rank[order_groups] = np.arange(len(labels))
    layout = np.lexsort((rng.permutation(c), group_rank[inverse]))  # [C] slots, grouped
    biggest = int(counts.max())
    shift = biggest if biggest < c else 1
    out = np.empty(c, dtype=np.int64)
    out[layout] = layout[(np.arange(c) + shift) % c]
    # Mixing: swap the sources of disjoint random pairs (i, j) when neither becomes its own source
    # and the number of same-group assignments does not grow.
    for _ in range(max(0, int(rounds))):
        perm = rng.permutation(c)
        i, j = perm[0 : c - 1 : 2], perm[1:c:2]
        si, sj = out[i], out[j]
        same_now = (g[si] == g[i]).astype(np.int64) + (g[sj] == g[j])
        same_new = (g[sj] == g[i]).astype(np.int64) + (g[si] == g[j])
        ok = (sj != i) & (si != j) & (same_new <= same_now)
        out[i[ok]], out[j[ok]] = sj[ok], si[ok]
    return out


def shuffle_document_neighbours(
    neighbours: Sequence[DocumentNeighbours],
    *,
    seed: int = 0,
    avoid_same_document: bool = True,
) -> list[DocumentNeighbours]:
    """A shuffled copy of a benchmark's neighbours: every chunk gets another chunk's neighbours.

    The control for RETRO[ON]: the neighbours retrieved for the C evaluation chunks of all
    documents (concatenated in document order, as :func:`retrieve_document_neighbours` returns
    them) are permuted across the whole benchmark with :func:`shuffled_slots`, a seeded derangement
    that also avoids a chunk's own document where the documents' sizes allow. Shapes are kept: the
    result can replace ``neighbours`` in :func:`score_token_documents`.

    Args:
        neighbours: D :class:`DocumentNeighbours` (tokens [c_d, k, r]), sum of c_d = C.
        seed: seeds the permutation.
        avoid_same_document: keep chunks from receiving neighbours retrieved for their own document.

    Returns:
        D :class:`DocumentNeighbours` with the same shapes; chunk i of the benchmark holds the
        neighbours (tokens, lengths, database chunk ids) retrieved for chunk ``shuffled_slots(...)[i]``.

    Raises:
        ValueError: C < 2 (a benchmark with a single chunk has no other chunk's neighbours).
    """
    if not neighbours:
        return []
    counts = [int(nb.tokens.shape[0]) for nb in neighbours]
    doc = np.repeat(np.arange(len(neighbours), dtype=np.int64), counts)
    src = shuffled_slots(doc, seed=seed, avoid_same_group=avoid_same_document)
    tokens = np.concatenate([nb.tokens for nb in neighbours])[src]
    lengths = np.concatenate([nb.lengths for nb in neighbours])[src]
    ids = np.concatenate([nb.chunk_ids for nb in neighbours])[src]
    same = int((doc[src] == doc).sum())
    if same:
        logger.info(
            "shuffled neighbours: %d of %d chunks take them from their own document (one document "
            "holds more than half of the chunks)",
            same,
            len(doc),
        )
    out = []
    offset = 0
    for c in counts:
        out.append(
            DocumentNeighbours(
                tokens[offset : offset + c],
                lengths[offset : offset + c],
                ids[offset : offset + c],
            )
        )
        offset += c
    return out


@dataclass
class ScoreResult:
    """Per-chunk scores of a set of documents.

    C evaluation chunks in all (a document of T tokens has ceil(T/m) of them, the last possibly
    partial). Arrays are aligned on C.

    Attributes:
        chunk_size: m.
        doc_index: int64 [C] index of each chunk's document.
        chunk_index: int64 [C] position of the chunk in its document.
        bits: float64 [C] sum of -log2 p(token) over the chunk's tokens.
        bytes: int64 [C] UTF-8 bytes of the chunk's decoded text (see the module docstring).
        tokens: int64 [C] real tokens in the chunk (m except a document's last chunk).
        chunk_tokens: int64 [C, m] the chunk's tokens, padded with ``pad_id``.
        neighbour_tokens: int64 [C, k, r] neighbours (chunk + continuation) used for RETRO[ON], or None.
        neighbour_lengths: int64 [C, k] real tokens per neighbour row, or None.
        neighbour_ids: int64 [C, k] database chunk ids of the neighbours, or None.
        k: neighbours per chunk given to the model (None for RETRO[OFF] / baseline).
        window: n used; stride: s used; pad_id: padding id.
        num_documents: D.
    """

    chunk_size: int
    doc_index: np.ndarray
    chunk_index: np.ndarray
    bits: np.ndarray
    bytes: np.ndarray
    tokens: np.ndarray
    chunk_tokens: np.ndarray
    neighbour_tokens: np.ndarray | None = None
    neighbour_lengths: np.ndarray | None = None
    neighbour_ids: np.ndarray | None = None
    k: int | None = None
    window: int = 0
    stride: int = 0
    pad_id: int = 0
    num_documents: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_chunks(self) -> int:
        return int(len(self.bits))

    def total_bits(self, mask: np.ndarray | None = None) -> float:
        return float(self.bits[mask].sum() if mask is not None else self.bits.sum())

    def total_bytes(self, mask: np.ndarray | None = None) -> int:
        return int(self.bytes[mask].sum() if mask is not None else self.bytes.sum())

    def bpb(self, mask: np.ndarray | None = None) -> float:
        """Bits per UTF-8 byte over all chunks (or the chunks selected by a bool mask [C]).

        NaN when the selection holds no bytes.
        """
        b = self.total_bytes(mask)
        return self.total_bits(mask) / b if b else float("nan")

    def bits_per_token(self) -> float:
        t = int(self.tokens.sum())
        return float(self.bits.sum()) / t if t else float("nan")

    def token_perplexity(self) -> float:
        return float(2.0 ** self.bits_per_token())

    def doc_bits(self) -> np.ndarray:
        """float64 [D] total bits of each document."""
        return np.bincount(self.doc_index, weights=self.bits, minlength=self.num_documents)

    def doc_bytes(self) -> np.ndarray:
        """int64 [D] total bytes of each document (sum over its chunks)."""
        return np.bincount(self.doc_index, weights=self.bytes, minlength=self.num_documents).astype(
            np.int64
        )

    def doc_loglikelihood(self) -> np.ndarray:
        """float64 [D] natural-log likelihood of each document (what lm-eval's rolling score is)."""
        return -self.doc_bits() * LN2

    def word_perplexity(self, words: Sequence[int] | int) -> float:
        """exp(total NLL in nats / words); ``words`` is a total or one count per document."""
        w = int(np.sum(words))
        if w <= 0:
            raise ValueError("word_perplexity: the benchmark has no words")
        return float(math.exp(self.total_bits() * LN2 / w))

    def select_documents(self, docs: Sequence[int] | np.ndarray) -> np.ndarray:
        """bool [C]: the chunks of the given documents."""
        return np.isin(self.doc_index, np.asarray(docs, dtype=np.int64))

    def summary(self) -> dict[str, Any]:
        return {
            "bpb": self.bpb(),
            "bits": self.total_bits(),
            "bytes": self.total_bytes(),
            "tokens": int(self.tokens.sum()),
            "chunks": self.num_chunks,
            "documents": self.num_documents,
            "token_perplexity": self.token_perplexity(),
            "k": self.k,
            "window": self.window,
            "stride": self.stride,
        }


def model_geometry(model: torch.nn.Module) -> tuple[int, int, int, int]:
    """The geometry a retrieval LM is scored with: (n, m, r, pad_id).

    Args:
        model: a retro_core model (``Retro`` or ``RetrofittedLM``): anything with a ``config``
            holding ``max_seq_len``, ``chunk_size`` and optionally ``neighbour_len`` and ``pad_id``.

    Returns:
        n (``max_seq_len``, the longest sequence), m (``chunk_size``), r (``neighbour_len``,
        default 2m: a neighbour chunk plus its continuation) and the pad id (default 0).
    """
    cfg = model.config
    m = int(cfg.chunk_size)
    r = int(cfg.neighbour_len) if getattr(cfg, "neighbour_len", None) else 2 * m
    return int(cfg.max_seq_len), m, r, int(getattr(cfg, "pad_id", 0))


def default_window_stride(
    model: torch.nn.Module, window: int | None, stride: int | None
) -> tuple[int, int]:
    """Resolve (n, s): n defaults to the model's max_seq_len, s to n/2 rounded down to a multiple of m."""
    n_max, m, _, _ = model_geometry(model)
    n = int(window) if window else n_max
    if n > n_max:
        raise ValueError(f"window={n} is longer than the model's max_seq_len={n_max}")
    if n < m:
        raise ValueError(f"window={n} is shorter than one chunk (m={m})")
    s = int(stride) if stride else max(m, (n // 2) // m * m)
    if s % m:
        raise ValueError(f"stride={s} must be a multiple of the chunk size m={m}")
    if not 1 <= s < n:
        raise ValueError(
            f"stride={s}: expected m <= stride < window={n} (a window must hold the token before "
            "the first one it scores)"
        )
    return n, s


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` (Retro, RETRO-fitted and HF models)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _targets_logprob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p of targets: logits [B, t, V], targets [B, t] -> [B, t] (float32 log-softmax)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def score_token_documents(
    model: RetrievalLM,
    token_documents: Sequence[Sequence[int]],
    *,
    decode: Callable[[list[int]], str],
    prefix_id: int,
    neighbours: Sequence[DocumentNeighbours] | None = None,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
    keep_neighbours: bool = True,
) -> ScoreResult:
    """Score tokenised documents with strided windows (see the module docstring).

    Args:
        model: a ``retro_core.model.Retro`` (a decoder-only baseline has ``cca_layers=()``).
        token_documents: D documents of token ids (each non-empty).
        decode: token ids -> text, used for the bytes of each chunk.
        prefix_id: the token that conditions a document's first token (end-of-text).
        neighbours: one :class:`DocumentNeighbours` per document (RETRO[ON]); None = RETRO[OFF].
        window: n (default the model's max_seq_len); stride: s (default n/2, a multiple of m).
        batch_size: windows per forward pass (windows of the same chunk count are batched; a partial
            last chunk is right-padded, which a causal model never sees from real positions).
        keep_neighbours: store the neighbours' tokens per chunk in the result (for r(C)).

    Returns:
        ScoreResult with per-chunk bits, bytes, tokens and (RETRO[ON]) neighbours.
    """
    n, s = default_window_stride(model, window, stride)
    _, m, r, pad_id = model_geometry(model)
    device = model_device(model)
    docs = [list(map(int, d)) for d in token_documents]
    for i, d in enumerate(docs):
        if not d:
            raise ValueError(f"document {i} has no tokens")
    if neighbours is not None:
        if len(neighbours) != len(docs):
            raise ValueError(f"{len(neighbours)} neighbour sets for {len(docs)} documents")
        for i, (d, nb) in enumerate(zip(docs, neighbours, strict=True)):
            if nb.tokens.shape[0] != math.ceil(len(d) / m):
                raise ValueError(
                    f"document {i}: {nb.tokens.shape[0]} neighbour chunks for "
                    f"{math.ceil(len(d) / m)} chunks"
                )
            if nb.tokens.shape[-1] != r:
                raise ValueError(
                    f"neighbours have r={nb.tokens.shape[-1]} tokens but the model expects r={r}"
                )
    token_bits = [np.zeros(len(d), dtype=np.float64) for d in docs]

    was_training = model.training
    model.eval()
    with torch.inference_mode():
        # t[0] of every document: logits of the single prefix token (no retrieval is possible).
        first = model(torch.tensor([[prefix_id]], dtype=torch.long, device=device))
        first_logp = torch.log_softmax(first[0, 0].float(), dim=-1).cpu().numpy()
        for i, d in enumerate(docs):
            token_bits[i][0] = -first_logp[d[0]] / LN2

        windows = [w for i, d in enumerate(docs) for w in plan_windows(len(d), n, s, doc=i)]
        # Group by chunk count so a batch needs at most m-1 tokens of right padding each, then
        # by the first scored position so a batch reads out few positions it does not score.
        windows.sort(
            key=lambda w: (math.ceil((w.end - w.begin) / m), w.score_from - w.begin, w.doc, w.begin)
        )
        keeps = _accepts_logits_to_keep(model)
        batches: list[list[Window]] = []
        for w in windows:
            lw = math.ceil((w.end - w.begin) / m)
            if (
                batches
                and len(batches[-1]) < batch_size
                and math.ceil((batches[-1][0].end - batches[-1][0].begin) / m) == lw
            ):
                batches[-1].append(w)
            else:
                batches.append([w])
        for batch in tqdm(batches, desc="score", disable=not progress, unit="batch"):
            lw = math.ceil((batch[0].end - batch[0].begin) / m)
            tok = np.full((len(batch), lw * m), pad_id, dtype=np.int64)
            for b, w in enumerate(batch):
                tok[b, : w.end - w.begin] = docs[w.doc][w.begin : w.end]
            kwargs = {}
            if neighbours is not None:
                kk = neighbours[batch[0].doc].tokens.shape[1]
                nt = np.full((len(batch), lw, kk, r), pad_id, dtype=np.int64)
                nl = np.zeros((len(batch), lw, kk), dtype=np.int64)
                for b, w in enumerate(batch):
                    c0 = w.begin // m
                    nb = neighbours[w.doc]
                    c1 = min(c0 + lw, nb.tokens.shape[0])
                    nt[b, : c1 - c0] = nb.tokens[c0:c1]
                    nl[b, : c1 - c0] = nb.lengths[c0:c1]
                kwargs["neighbours"] = torch.from_numpy(nt).to(device)
                kwargs["neighbour_lengths"] = torch.from_numpy(nl).to(device)
            # Position p predicts token p+1: logits from the batch's first scored position only
            # (the |V|-way read-out dominates a small model's cost; earlier positions are context).
            first = min(w.score_from - 1 - w.begin for w in batch) if keeps else 0
            if keeps:
                kwargs["logits_to_keep"] = lw * m - first
            logits = model(torch.from_numpy(tok).to(device), **kwargs)  # [B, l*m - first, V]
            for b, w in enumerate(batch):
                # Only the window's new targets are normalised.
                lo = w.score_from - 1 - w.begin
                hi = w.end - 1 - w.begin
                tgt = torch.from_numpy(tok[b, lo + 1 : hi + 1]).to(device)
                logp = _targets_logprob(logits[b : b + 1, lo - first : hi - first], tgt[None])[0]
                token_bits[w.doc][w.score_from : w.end] = -logp.double().cpu().numpy() / LN2
    if was_training:
        model.train()

    doc_index, chunk_index, bits, nbytes, ntok, ctoks = [], [], [], [], [], []
    nb_t, nb_l, nb_i = [], [], []
    for i, d in enumerate(docs):
        chunks, lengths = _chunks_of(d, m, pad_id)
        c = len(chunks)
        doc_index.append(np.full(c, i, dtype=np.int64))
        chunk_index.append(np.arange(c, dtype=np.int64))
        padded = np.zeros(c * m)
        padded[: len(d)] = token_bits[i]
        bits.append(padded.reshape(c, m).sum(axis=1))
        nbytes.append(
            np.array(
                [len(decode(d[j * m : (j + 1) * m]).encode("utf-8")) for j in range(c)],
                dtype=np.int64,
            )
        )
        ntok.append(lengths)
        ctoks.append(chunks)
        if neighbours is not None and keep_neighbours:
            nb_t.append(neighbours[i].tokens)
            nb_l.append(neighbours[i].lengths)
            nb_i.append(neighbours[i].chunk_ids)
    cat = np.concatenate
    return ScoreResult(
        chunk_size=m,
        doc_index=cat(doc_index) if docs else np.zeros(0, np.int64),
        chunk_index=cat(chunk_index) if docs else np.zeros(0, np.int64),
        bits=cat(bits) if docs else np.zeros(0),
        bytes=cat(nbytes) if docs else np.zeros(0, np.int64),
        tokens=cat(ntok) if docs else np.zeros(0, np.int64),
        chunk_tokens=cat(ctoks) if docs else np.zeros((0, m), np.int64),
        neighbour_tokens=cat(nb_t) if nb_t else None,
        neighbour_lengths=cat(nb_l) if nb_l else None,
        neighbour_ids=cat(nb_i) if nb_i else None,
        k=None if neighbours is None or not docs else int(neighbours[0].tokens.shape[1]),
        window=n,
        stride=s,
        pad_id=pad_id,
        num_documents=len(docs),
    )


def _prefix_id(tokenizer: Any, model: torch.nn.Module) -> int:
    eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = model_geometry(model)[3]
    return int(eos)


def check_retriever_for(model: torch.nn.Module, retriever: Any) -> None:
    """Refuse a retriever whose chunk size m or tokenizer differs from ``model``'s.

    Raises:
        RetrieverMismatchError: (from ``retro_core.retrieval.check_retriever``) naming what differs.
    """
    cfg = model.config
    check_retriever(
        retriever, chunk_size=int(cfg.chunk_size), tokenizer_id=getattr(cfg, "tokenizer_id", None)
    )


def has_retrieval(model: torch.nn.Module) -> bool:
    """Whether ``model`` reads neighbours: its config names at least one CCA layer.

    False for a decoder-only baseline (``cca_layers=()``) and for a model whose config has no
    ``cca_layers`` at all (a plain language model).
    """
    cca = getattr(model.config, "cca_layers", None)
    return cca is not None and len(tuple(cca)) > 0


def score_documents(
    model: RetrievalLM,
    tokenizer: Any,
    documents: Sequence[str],
    *,
    retriever: Any = None,
    k: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    neighbours: Sequence[DocumentNeighbours] | None = None,
    progress: bool = True,
) -> ScoreResult:
    """Score documents (text) with strided windows; RETRO[ON] when a retriever is given.

    Args:
        model: ``retro_core.model.Retro`` (RETRO, or a decoder-only baseline with ``cca_layers=()``).
        tokenizer: an LM tokenizer with ``encode``, ``decode`` and ``eos_id`` (retro_db's LMTokenizer).
        documents: D texts (documents never share a window).
        retriever: a Retriever (e.g. ``retro_db.Database``) for RETRO[ON]; None = RETRO[OFF].
            Refused (RetrieverMismatchError) when its chunk size or tokenizer differs from the model's.
        k: neighbours per chunk (default the model's num_neighbours).
        window, stride: n and s (default max_seq_len and n/2).
        neighbours: precomputed neighbours (from :func:`retrieve_document_neighbours`), instead of a
            retriever.

    Returns:
        ScoreResult (per evaluation chunk of m tokens).
    """
    token_docs = [tokenizer.encode(t) for t in documents]
    for i, d in enumerate(token_docs):
        if not d:
            raise ValueError(f"document {i} is empty after tokenisation")
    if retriever is not None and neighbours is None:
        if not has_retrieval(model):
            raise ValueError("the model has no CCA layers (a decoder-only baseline): no retriever")
        check_retriever_for(model, retriever)
        kk = int(k) if k else int(model.config.num_neighbours)
        neighbours = retrieve_document_neighbours(
            retriever,
            token_docs,
            chunk_size=int(model.config.chunk_size),
            k=kk,
            pad_id=model_geometry(model)[3],
            progress=progress,
        )
    elif neighbours is not None and k:
        neighbours = [nb.first(int(k)) for nb in neighbours]
    return score_token_documents(
        model,
        token_docs,
        decode=tokenizer.decode,
        prefix_id=_prefix_id(tokenizer, model),
        neighbours=neighbours,
        window=window,
        stride=stride,
        batch_size=batch_size,
        progress=progress,
    )


def sweep_k(
    model: RetrievalLM,
    tokenizer: Any,
    documents: Sequence[str],
    retriever: Any,
    ks: Sequence[int] = (1, 2, 4, 10),
    *,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> dict[int, ScoreResult]:
    """RETRO[ON] scores for each k in ``ks``, retrieving once with max(ks) neighbours per chunk."""
    if not ks:
        raise ValueError("sweep_k: empty list of k")
    check_retriever_for(model, retriever)
    token_docs = [tokenizer.encode(t) for t in documents]
    for i, d in enumerate(token_docs):
        if not d:
            raise ValueError(f"document {i} is empty after tokenisation")
    full = retrieve_document_neighbours(
        retriever,
        token_docs,
        chunk_size=int(model.config.chunk_size),
        k=max(ks),
        pad_id=model_geometry(model)[3],
        progress=progress,
    )
    out = {}
    for k in ks:
        logger.info("scoring with k=%d", k)
        out[int(k)] = score_token_documents(
            model,
            token_docs,
            decode=tokenizer.decode,
            prefix_id=_prefix_id(tokenizer, model),
            neighbours=[nb.first(int(k)) for nb in full],
            window=window,
            stride=stride,
            batch_size=batch_size,
            progress=progress,
        )
    return out


def neighbours_from(nb: Neighbours) -> DocumentNeighbours:
    """Wrap a retro_core ``Neighbours`` of one document's chunks ([c, k, r]) as DocumentNeighbours."""
    return DocumentNeighbours(
        np.asarray(nb.tokens, dtype=np.int64),
        np.asarray(nb.lengths, dtype=np.int64),
        np.asarray(nb.chunk_ids, dtype=np.int64),
    )
