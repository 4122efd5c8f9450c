"""Scoring engine shared by the retrieval baselines that read a plain causal LM (kNN-LM, in-context).

The harness scores RETRO with :func:`retro_eval.perplexity.score_token_documents`. The two
comparison methods of :mod:`retro_eval.knnlm` and :mod:`retro_eval.incontext` score *the same
tokens* of the same documents with a causal LM that reads no neighbours through cross-attention:

* the frozen base of a retro-fitted model (``RetrofittedLM`` called with ``neighbours=None``, whose
  logits are exactly the base model's),
* a ``retro_core.model.Retro`` (a decoder-only baseline, or RETRO[OFF]),
* a plain Hugging Face causal LM (then ``chunk_size`` and ``window`` are passed explicitly).

A scoring *item* is one forward row: a token sequence and the span of its last positions whose
next-token probabilities it scores. :func:`score_items` batches items exactly as
``score_token_documents`` batches its windows (same sort key, same grouping, same right padding to
a multiple of m, same ``logits_to_keep``), so the strided windows of :func:`window_items` give the
base model's per-token bits bit for bit; it can also hand each batch's hidden states before the
read-out (the kNN-LM query) to a callback.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .perplexity import (
    ScoreResult,
    default_window_stride,
    model_device,
    model_geometry,
    plan_windows,
)

__all__ = [
    "Item",
    "assemble_result",
    "causal_geometry",
    "causal_lm",
    "first_token_logp",
    "max_input_length",
    "readout_hidden",
    "score_items",
    "window_items",
]

LN2 = math.log(2.0)


@dataclass(frozen=True)
class Item:
    """One forward row of a scoring pass.

    Attributes:
        doc: the document whose tokens are scored.
        tokens: the row's input tokens (a context, possibly after prepended retrieved text).
        first: index in ``tokens`` of the first scored target (``1 <= first <= len(tokens) - 1``):
            the targets are ``tokens[first:]`` and they are the document's tokens
            ``target_from .. target_from + len(tokens) - first - 1``.
        target_from: position in the document of the first scored target.
        order: a tie-breaking key (the window's start in the document).
    """

    doc: int
    tokens: tuple[int, ...]
    first: int
    target_from: int
    order: int = 0

    @property
    def num_targets(self) -> int:
        return len(self.tokens) - self.first


def causal_geometry(
    model: torch.nn.Module,
    *,
    chunk_size: int | None = None,
    window: int | None = None,
    stride: int | None = None,
) -> tuple[int, int, int, int]:
    """(n, s, m, pad_id) for scoring ``model``: a retro_core model's own geometry (as the RETRO
    rows use), or, for a Hugging Face causal LM, ``chunk_size`` (required) and ``window`` (default
    the model's ``max_position_embeddings``, at most 2048).

    Raises:
        ValueError: a Hugging Face model without ``chunk_size``, or an inconsistent window/stride.
    """
    cfg = model.config
    if getattr(cfg, "chunk_size", None) is not None and getattr(cfg, "max_seq_len", None):
        n, s = default_window_stride(model, window, stride)
        _, m, _, pad = model_geometry(model)
        if chunk_size is not None and int(chunk_size) != m:
            raise ValueError(f"chunk_size={chunk_size} differs from the model's m={m}")
        return n, s, m, pad
    if chunk_size is None:
        raise ValueError(f"{type(model).__name__}: pass chunk_size (the database's m)")
    m = int(chunk_size)
    n_max = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
    n = int(window) if window else min(n_max, 2048) // m * m
    if n > n_max or n < m:
        raise ValueError(f"window={n}: expected m={m} <= window <= {n_max}")
    s = int(stride) if stride else max(m, (n // 2) // m * m)
    if s % m or not 1 <= s < n:
        raise ValueError(f"stride={s}: expected a multiple of m={m} below window={n}")
    pad = getattr(cfg, "pad_token_id", None)
    if pad is None:
        pad = getattr(cfg, "eos_token_id", 0)
    if isinstance(pad, list | tuple):
        pad = pad[0] if pad else 0
    return n, s, m, int(pad or 0)


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The module that computes ``model``'s logits without neighbours: a retro-fitted model's
    frozen Hugging Face base (called directly, so rows may be longer than RETRO's max_seq_len; its
    logits are exactly ``model(tokens)``'s, the CCA hooks being idle outside ``model.forward``),
    else ``model`` itself."""
    base = getattr(model, "base", None)
    if isinstance(base, torch.nn.Module) and hasattr(base, "get_output_embeddings"):
        return base
    return model


def max_input_length(model: torch.nn.Module) -> int:
    """The longest token sequence ``model`` takes: a retro-fitted model's base (or a Hugging Face
    model) its ``max_position_embeddings``, a ``Retro`` its ``max_seq_len``."""
    base = getattr(model, "base", None)
    for cfg in (getattr(base, "config", None), model.config):
        if cfg is None:
            continue
        if getattr(cfg, "max_position_embeddings", None):
            return int(cfg.max_position_embeddings)
    return int(model.config.max_seq_len)


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _readout_module(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The module whose input (or output) is the hidden state the read-out multiplies."""
    base = getattr(model, "base", None)
    if isinstance(base, torch.nn.Module) and hasattr(base, "get_output_embeddings"):
        head = base.get_output_embeddings()  # RetrofittedLM: the frozen base's lm_head
        if head is not None:
            return head, "input"
    get = getattr(model, "get_output_embeddings", None)
    if callable(get) and get() is not None:  # a Hugging Face causal LM
        return get(), "input"
    norm = getattr(model, "norm_f", None)
    if isinstance(norm, torch.nn.Module):  # retro_core.model.Retro: READ(norm_f(h)), tied
        return norm, "output"
    raise TypeError(f"{type(model).__name__}: no read-out layer found (lm_head or norm_f)")


@contextmanager
def readout_hidden(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Capture the hidden states the read-out multiplies, one tensor (B, t, d) per forward call.

    With ``logits_to_keep`` the captured positions are exactly those whose logits are returned.
    """
    module, where = _readout_module(model)
    seen: list[torch.Tensor] = []
    if where == "input":
        handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    else:
        handle = module.register_forward_hook(lambda _m, _a, out: seen.append(out))
    try:
        yield seen
    finally:
        handle.remove()


def _logits(model: torch.nn.Module, tokens: torch.Tensor, keep: int, keeps: bool) -> torch.Tensor:
    out = model(tokens, logits_to_keep=keep) if keeps else model(tokens)
    return out if isinstance(out, torch.Tensor) else out.logits


def first_token_logp(model: torch.nn.Module, prefix_id: int) -> tuple[np.ndarray, torch.Tensor]:
    """float32 log p of every vocabulary entry after the single prefix token (a document's token
    0), and the hidden state (d,) the read-out saw there, as ``score_token_documents`` computes
    them (its bits are ``-logp[t0] / LN2`` in float32 arithmetic)."""
    device = model_device(model)
    with readout_hidden(model) as seen:
        first = _logits(causal_lm(model), torch.tensor([[prefix_id]], device=device), 0, False)
    logp = torch.log_softmax(first[0, -1].float(), dim=-1).cpu().numpy()
    return logp, seen[-1][0, -1]


def window_items(token_documents: Sequence[Sequence[int]], window: int, stride: int) -> list[Item]:
    """The strided windows of ``plan_windows`` as items (what the base model scores)."""
    items = []
    for i, d in enumerate(token_documents):
        for w in plan_windows(len(d), window, stride, doc=i):
            items.append(
                Item(i, tuple(d[w.begin : w.end]), w.score_from - w.begin, w.score_from, w.begin)
            )
    return items


def score_items(
    model: torch.nn.Module,
    items: Sequence[Item],
    *,
    chunk_size: int,
    pad_id: int,
    batch_size: int = 4,
    max_batch_tokens: int | None = None,
    on_hidden: Callable[[Item, torch.Tensor, np.ndarray], None] | None = None,
    progress: bool = True,
    desc: str = "score",
) -> list[tuple[Item, np.ndarray]]:
    """log p (float64, natural log, from float32 log-softmax) of every item's targets.

    Items are sorted and batched as ``score_token_documents`` batches its windows; each row is
    right-padded to a multiple of m (a causal model never sees the padding from real positions).

    Args:
        batch_size: rows per forward pass (B).
        max_batch_tokens: also at most this many padded tokens per forward pass (B x row length;
            a longer row runs alone). None (default): B alone decides, the batching of
            ``score_token_documents``, which scores the same rows bit for bit. A budget bounds the
            (B, t, |V|) logits: 4 rows of 8,192 tokens over a 49,152-token vocabulary are 6.4 GB.
        on_hidden: called per item with its targets' read-out hidden states (t, d) and their log p.

    Returns:
        (item, log p [t]) per item, in batch order.
    """
    m = int(chunk_size)
    device = model_device(model)
    lm = causal_lm(model)
    keeps = _accepts_logits_to_keep(lm)
    ordered = sorted(
        items, key=lambda it: (math.ceil(len(it.tokens) / m), it.first, it.doc, it.order)
    )
    batches: list[list[Item]] = []
    for it in ordered:
        lw = math.ceil(len(it.tokens) / m)
        if (
            batches
            and len(batches[-1]) < batch_size
            and math.ceil(len(batches[-1][0].tokens) / m) == lw
            and (max_batch_tokens is None or (len(batches[-1]) + 1) * lw * m <= max_batch_tokens)
        ):
            batches[-1].append(it)
        else:
            batches.append([it])
    out: list[tuple[Item, np.ndarray]] = []
    was_training = model.training
    model.eval()
    with torch.inference_mode(), readout_hidden(model) as seen:
        for batch in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
            lw = math.ceil(len(batch[0].tokens) / m)
            tok = np.full((len(batch), lw * m), pad_id, dtype=np.int64)
            for b, it in enumerate(batch):
                tok[b, : len(it.tokens)] = it.tokens
            first = min(it.first - 1 for it in batch) if keeps else 0
            seen.clear()
            logits = _logits(lm, torch.from_numpy(tok).to(device), lw * m - first, keeps)
            hidden = seen[-1] if on_hidden is not None else None
            for b, it in enumerate(batch):
                lo, hi = it.first - 1, len(it.tokens) - 1
                tgt = torch.from_numpy(tok[b, lo + 1 : hi + 1]).to(device)
                lg = logits[b : b + 1, lo - first : hi - first].float()
                logp = torch.log_softmax(lg, dim=-1).gather(-1, tgt[None, :, None])[0, :, 0]
                lp = logp.double().cpu().numpy()
                if on_hidden is not None:
                    on_hidden(it, hidden[b, lo - first : hi - first], lp)
                out.append((it, lp))
    if was_training:
        model.train()
    return out


def assemble_result(
    token_documents: Sequence[Sequence[int]],
    token_bits: Sequence[np.ndarray],
    *,
    chunk_size: int,
    pad_id: int,
    decode: Callable[[list[int]], str],
    window: int,
    stride: int,
    k: int | None = None,
    meta: dict[str, Any] | None = None,
) -> ScoreResult:
    """Per-token bits of D documents -> a :class:`ScoreResult` over their chunks of m tokens
    (the same chunks, bytes and token counts ``score_token_documents`` reports)."""
    m = int(chunk_size)
    doc_index, chunk_index, bits, nbytes, ntok, ctoks = [], [], [], [], [], []
    for i, d in enumerate(token_documents):
        d = list(map(int, d))
        c = max(1, math.ceil(len(d) / m))
        chunks = np.full((c, m), pad_id, dtype=np.int64)
        chunks.reshape(-1)[: len(d)] = d
        lengths = np.full(c, m, dtype=np.int64)
        lengths[-1] = len(d) - (c - 1) * m
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
    empty = not token_documents
    cat = np.concatenate
    return ScoreResult(
        chunk_size=m,
        doc_index=np.zeros(0, np.int64) if empty else cat(doc_index),
        chunk_index=np.zeros(0, np.int64) if empty else cat(chunk_index),
        bits=np.zeros(0) if empty else cat(bits),
        bytes=np.zeros(0, np.int64) if empty else cat(nbytes),
        tokens=np.zeros(0, np.int64) if empty else cat(ntok),
        chunk_tokens=np.zeros((0, m), np.int64) if empty else cat(ctoks),
        k=k,
        window=int(window),
        stride=int(stride),
        pad_id=int(pad_id),
        num_documents=len(token_documents),
        meta=dict(meta or {}),
    )
