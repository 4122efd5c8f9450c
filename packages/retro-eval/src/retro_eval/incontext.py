"""In-context retrieval (In-Context RALM, Ram et al. 2023) as a scoring method for a frozen causal LM.

The comparison row "in-context retrieval" of issue 17: the LM reads no neighbours through
cross-attention; instead, at every chunk boundary the text retrieved for the *previous* chunk is
prepended to its context window. The retrieval is RETRO's own (the same
:func:`~retro_eval.perplexity.retrieve_document_neighbours`, chunk + continuation, r tokens, nearest
first), and the tokens scored are exactly RETRO's, so the per-chunk bits line up with the RETRO
rows' :class:`~retro_eval.perplexity.ScoreResult`.

Scheme, for a document ``t`` of T tokens, chunk size m, window n and stride s (RETRO's):

* token 0 is scored after the prefix token, as the base model scores it (no retrieval yet);
* the base's strided windows (``plan_windows(T, n, s)``) decide which tokens each window scores
  and its context start ``begin``. Each chunk u that a window scores (the part of ``t[u*m:(u+1)*m]``
  inside the window's new tokens) becomes one forward row::

      [the nearest neighbour of chunk u-1 (its real tokens, chunk + continuation)] + t[b : hi]

  with ``b = begin`` (the base's own context, what RETRO reads beside its neighbours) when the row
  fits in ``max_length`` tokens (default the longest input the LM takes: a retro-fitted model's
  base reads n + r easily), else the latest start that fits (the retrieved text is kept and the
  oldest context is dropped, as Ram et al. do); the targets are the chunk's scored tokens at the
  end of the row. Chunk 0 has no previous chunk and no neighbour;
* a window whose chunks all have no neighbour (an empty neighbour, length 0) is scored as one row,
  exactly the base's window, so an empty neighbour gives the base model's scores bit for bit.

Ram et al. retrieve every s' = 4..32 tokens with the last tokens as the query; here the stride is
RETRO's chunk (m) and the query is the previous chunk, so the two methods read the same
neighbours at the same points. The cost is one forward pass per chunk (of up to n tokens): the
price of in-context retrieval that RETRO's chunked cross-attention avoids.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .causal import (
    LN2,
    Item,
    assemble_result,
    causal_geometry,
    first_token_logp,
    max_input_length,
    score_items,
)
from .perplexity import DocumentNeighbours, ScoreResult, plan_windows

logger = logging.getLogger(__name__)

__all__ = ["incontext_items", "score_incontext"]


def incontext_items(
    token_documents: Sequence[Sequence[int]],
    neighbours: Sequence[DocumentNeighbours] | None,
    *,
    chunk_size: int,
    window: int,
    stride: int,
    rank: int = 0,
    max_length: int | None = None,
) -> list[Item]:
    """The forward rows of in-context retrieval (see the module docstring).

    Args:
        token_documents: D documents of token ids.
        neighbours: one :class:`DocumentNeighbours` per document (tokens [c, k, r]), or None (no
            retrieval: the base's windows).
        chunk_size: m; window: n; stride: s.
        rank: which neighbour of the previous chunk is prepended (0 = the nearest).
        max_length: the longest row (default n); rounded down to a multiple of m.

    Returns:
        Items whose targets cover every token ``1..T-1`` of every document exactly once.
    """
    m, n = int(chunk_size), int(window)
    limit = max(n, int(max_length or n)) // m * m if max_length else n
    items: list[Item] = []
    for i, d in enumerate(token_documents):
        d = list(map(int, d))
        nb = None if neighbours is None else neighbours[i]
        if nb is not None and nb.tokens.shape[0] != math.ceil(len(d) / m):
            raise ValueError(
                f"document {i}: {nb.tokens.shape[0]} neighbour chunks for "
                f"{math.ceil(len(d) / m)} chunks"
            )
        if nb is not None and rank >= nb.tokens.shape[1]:
            raise ValueError(f"rank={rank} but only {nb.tokens.shape[1]} neighbours per chunk")

        def prepend(u: int, nb: DocumentNeighbours | None = nb) -> list[int]:
            """The real tokens of the neighbour retrieved for chunk u - 1 (none for u = 0)."""
            if nb is None or u == 0:
                return []
            length = int(nb.lengths[u - 1, rank])
            return [int(t) for t in nb.tokens[u - 1, rank, :length]]

        for w in plan_windows(len(d), n, stride, doc=i):
            chunks = range(w.score_from // m, (w.end - 1) // m + 1)
            prefixes = {u: prepend(u) for u in chunks}
            if not any(prefixes.values()):  # no retrieved text: the base's own window
                items.append(
                    Item(
                        i, tuple(d[w.begin : w.end]), w.score_from - w.begin, w.score_from, w.begin
                    )
                )
                continue
            for u in chunks:
                lo, hi = max(w.score_from, u * m), min((u + 1) * m, w.end)
                pre = prefixes[u]
                room = limit - (hi - lo + 1)  # left after the targets and the token before them
                if len(pre) > room:
                    pre = pre[:room]  # only when r > limit - m - 1: keep the neighbour's start
                b = max(w.begin, hi - (limit - len(pre)))
                row = pre + d[b:hi]
                items.append(Item(i, tuple(row), len(pre) + lo - b, lo, w.begin * (m + 1) + u))
    return items


def score_incontext(
    model: torch.nn.Module,
    token_documents: Sequence[Sequence[int]],
    neighbours: Sequence[DocumentNeighbours] | None,
    *,
    decode: Callable[[list[int]], str],
    prefix_id: int,
    chunk_size: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    rank: int = 0,
    max_length: int | None = None,
    progress: bool = True,
) -> ScoreResult:
    """Score documents with in-context retrieval (In-Context RALM) over RETRO's chunks.

    Args:
        model: a causal LM that reads no neighbours here: a ``RetrofittedLM`` (called with
            ``neighbours=None``: its frozen base), a ``Retro`` or a Hugging Face causal LM
            (then ``chunk_size`` is required).
        token_documents: D documents of token ids (each non-empty).
        neighbours: RETRO's neighbours of each document's chunks (from
            ``retrieve_document_neighbours``); None scores the plain base model.
        decode: token ids -> text (the bytes of each chunk).
        prefix_id: the token that conditions a document's first token.
        chunk_size, window, stride: m, n and s (default the model's, as the RETRO rows use).
        batch_size: rows per forward pass.
        rank: which neighbour is prepended (0 = the nearest).
        max_length: the longest row (neighbour + context + targets); default
            :func:`retro_eval.causal.max_input_length` (the LM's own limit), so that the base
            keeps its n-token context beside the neighbour where it can.

    Returns:
        A :class:`ScoreResult` over the same chunks as the RETRO rows (``k`` = 1, the neighbours
        are not stored; ``meta["forward_tokens"]`` counts the tokens the LM ran over).
    """
    n, s, m, pad = causal_geometry(model, chunk_size=chunk_size, window=window, stride=stride)
    docs = [list(map(int, d)) for d in token_documents]
    for i, d in enumerate(docs):
        if not d:
            raise ValueError(f"document {i} has no tokens")
    if neighbours is not None and len(neighbours) != len(docs):
        raise ValueError(f"{len(neighbours)} neighbour sets for {len(docs)} documents")
    limit = int(max_length) if max_length else max_input_length(model)
    items = incontext_items(
        docs, neighbours, chunk_size=m, window=n, stride=s, rank=rank, max_length=limit
    )
    token_bits = [np.zeros(len(d), dtype=np.float64) for d in docs]
    with torch.inference_mode():
        first_logp, _ = first_token_logp(model, prefix_id)
    for i, d in enumerate(docs):
        token_bits[i][0] = -first_logp[d[0]] / LN2
    scored = score_items(
        model, items, chunk_size=m, pad_id=pad, batch_size=batch_size, progress=progress,
        desc="in-context",
    )  # fmt: skip
    for it, lp in scored:
        token_bits[it.doc][it.target_from : it.target_from + len(lp)] = -lp / LN2
    forward_tokens = sum(len(it.tokens) for it in items)
    return assemble_result(
        docs, token_bits, chunk_size=m, pad_id=pad, decode=decode, window=n, stride=s,
        k=None if neighbours is None else 1,
        meta={"method": "incontext", "forward_tokens": forward_tokens, "rows": len(items),
              "max_length": limit},
    )  # fmt: skip
