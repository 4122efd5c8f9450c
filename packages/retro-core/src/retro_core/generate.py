"""Autoregressive generation with retrieval at chunk boundaries (paper section 2.4).

Each time the sequence completes a chunk C_u (m tokens), its k neighbours are retrieved through
``retriever.retrieve`` and encoded once, conditioned on the decoder activations of C_u; the
encoding is reused by CCA for the next m tokens (the last token of C_u and the first m-1 of
C_{u+1}). With ``use_cache=True`` self-attention keys/values and the encoded neighbours live in a
:class:`~retro_core.interface.KVCache`, so each new token costs one step; ``use_cache=False``
recomputes the whole forward (retrieving for every complete chunk) at every step: the reference.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .config import RetroConfig
from .interface import RetrievalLM
from .retrieval import Retriever

__all__ = ["generate", "sample_next"]

logger = logging.getLogger(__name__)


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """Pick the next token from logits (|V|,): greedy when temperature == 0, else sample.

    Sampling applies temperature, then keeps the top_k most likely tokens, then the smallest set
    whose probability reaches top_p (nucleus sampling), and draws with ``generator``.
    """
    logits = logits.float()
    if temperature == 0.0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already reach top_p (always keep the first).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _retrieve(
    retriever: Retriever, chunks: list[list[int]], k: int, pad_id: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Neighbours of q complete chunks (q, m) -> tokens (q, k, r) and lengths (q, k) as tensors."""
    nb = retriever.retrieve(np.asarray(chunks, dtype=np.int64), k)
    q = len(chunks)
    if nb.tokens.ndim != 3 or nb.tokens.shape[:2] != (q, k):
        raise ValueError(
            f"retriever returned neighbour tokens of shape {nb.tokens.shape}, expected ({q}, {k}, r)"
        )
    tokens = torch.as_tensor(np.asarray(nb.tokens), dtype=torch.long)
    lengths = torch.as_tensor(np.asarray(nb.lengths), dtype=torch.long)
    real = torch.arange(tokens.shape[-1]) < lengths[..., None]
    tokens = torch.where(real, tokens, pad_id)  # the database's pad id may lie outside |V|
    return tokens.to(device), lengths.to(device)


class _ChunkNeighbours:
    """The neighbours of the completed chunks of a growing sequence, retrieved once each."""

    def __init__(
        self,
        retriever: Retriever | None,
        tokens: list[int],
        m: int,
        k: int,
        pad_id: int,
        device: torch.device,
    ) -> None:
        self.retriever, self.tokens, self.m, self.k = retriever, tokens, m, k
        self.pad_id, self.device = pad_id, device
        self.nb_tokens: list[Tensor] = []  # chunk u at index u: (k, r)
        self.nb_lengths: list[Tensor] = []  # (k,)

    def __call__(self, n_chunks: int, refresh: bool) -> tuple[Tensor | None, Tensor | None]:
        """(1, U, k, r) / (1, U, k) neighbours of chunks 0..U-1 (retrieving the missing ones;
        all of them again with ``refresh``), or (None, None) without a retriever or chunk."""
        if self.retriever is None or n_chunks == 0:
            return None, None
        if refresh:
            self.nb_tokens.clear()
            self.nb_lengths.clear()
        have, m = len(self.nb_tokens), self.m
        if n_chunks > have:
            chunks = [self.tokens[u * m : (u + 1) * m] for u in range(have, n_chunks)]
            t, lens = _retrieve(self.retriever, chunks, self.k, self.pad_id, self.device)
            self.nb_tokens.extend(t.unbind(0))
            self.nb_lengths.extend(lens.unbind(0))
        return torch.stack(self.nb_tokens)[None], torch.stack(self.nb_lengths)[None]


def _check_arguments(
    cfg: RetroConfig,
    prompt_ids: Sequence[int] | Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    k: int | None,
) -> tuple[list[int], int]:
    """The prompt as a list and k (default ``cfg.num_neighbours``); ValueError on a bad argument."""
    prompt = prompt_ids.reshape(-1).tolist() if isinstance(prompt_ids, Tensor) else list(prompt_ids)
    if not prompt or not all(isinstance(t, int | np.integer) for t in prompt):
        raise ValueError("prompt_ids: expected a non-empty sequence of int token ids")
    if any(t < 0 or t >= cfg.vocab_size for t in prompt):
        raise ValueError(f"prompt_ids: token ids must lie in [0, vocab_size={cfg.vocab_size})")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected >= 0, got {max_new_tokens}")
    if len(prompt) + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
            f"max_seq_len={cfg.max_seq_len}"
        )
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: expected >= 1, got {top_k}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p: expected in (0, 1], got {top_p}")
    k = cfg.num_neighbours if k is None else int(k)
    if k < 1:
        raise ValueError(f"k: expected >= 1, got {k}")
    return prompt, k


@torch.no_grad()
def generate(
    model: RetrievalLM,
    prompt_ids: Sequence[int] | Tensor,
    retriever: Retriever | None = None,
    max_new_tokens: int = 64,
    *,
    k: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> list[int]:
    """Continue a prompt.

    Args:
        model: a :class:`~retro_core.interface.RetrievalLM` (``Retro`` or ``RetrofittedLM``),
            switched to eval mode.
        prompt_ids: the n0 >= 1 prompt token ids, a sequence or an int tensor (n0,).
        retriever: finds the neighbours of each completed chunk, or None for RETRO[OFF]. Checked
            against the model's chunk size m and tokenizer id first.
        max_new_tokens: the most tokens to generate; n0 + max_new_tokens <= max_seq_len.
        k: neighbours per chunk (default ``config.num_neighbours``).
        temperature: 0 = greedy; otherwise logits are divided by it before sampling.
        top_k, top_p: restrict sampling to the k most likely tokens / the nucleus of mass top_p.
        eos_id: stop after generating this token (it is included in the output).
        generator: the torch.Generator used for sampling (for reproducible samples).
        use_cache: incremental decoding with a KV cache (False: recompute everything each step).

    Returns:
        The new token ids only (at most max_new_tokens).
    """
    cfg, m = model.config, model.config.chunk_size
    prompt, k = _check_arguments(cfg, prompt_ids, max_new_tokens, temperature, top_k, top_p, k)
    if retriever is not None:
        model.check_retriever(retriever)
        if not cfg.is_retro:
            logger.warning("the model has no CCA layers (baseline): the retriever is not used")
            retriever = None
    model.eval()
    device = next(model.parameters()).device
    tokens = list(prompt)
    new: list[int] = []
    sample_kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    if max_new_tokens == 0:
        return new

    neighbours_upto = _ChunkNeighbours(retriever, tokens, m, k, cfg.pad_id, device)
    if use_cache:
        cache = model.new_cache()
        x = torch.tensor([tokens], dtype=torch.long, device=device)  # (1, n0): prefill
        nb, lens = neighbours_upto(len(tokens) // m, refresh=False)
        logits = model(x, nb, lens, cache=cache)[0, -1]
        for step in range(max_new_tokens):
            nxt = sample_next(logits, **sample_kw)
            tokens.append(nxt)
            new.append(nxt)
            if nxt == eos_id or step == max_new_tokens - 1:
                break
            # Feeding token t = len-1; when it completes chunk u, retrieve its neighbours now
            # (the model encodes them once, into the cache); otherwise the cache has all it needs.
            nb = lens = None
            if len(tokens) % m == 0:
                nb, lens = neighbours_upto(len(tokens) // m, refresh=False)
            x = torch.tensor([[nxt]], dtype=torch.long, device=device)  # (1, 1)
            logits = model(x, nb, lens, cache=cache)[0, -1]
    else:
        for _ in range(max_new_tokens):
            x = torch.tensor([tokens], dtype=torch.long, device=device)  # (1, n)
            nb, lens = neighbours_upto(len(tokens) // m, refresh=True)
            nxt = sample_next(model(x, nb, lens)[0, -1], **sample_kw)
            tokens.append(nxt)
            new.append(nxt)
            if nxt == eos_id:
                break
    return new
