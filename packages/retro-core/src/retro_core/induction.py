"""Chunked cross-attention that starts as the base model's own induction heads (RETRO-fitting).

A pretrained LM already knows how to copy from its context: its *induction heads* (Olsson et al.
2022) attend, from the current token, to the token that followed an earlier occurrence of it, and
copy that token forward. Trained from scratch, a RETRO-fit's CCA must rediscover this, and on a
2-core machine that takes longer than the whole demo (``docs/experiments/learning-curve.md``: no
neighbour-reading at 1M tokens). This module lets CCA start from the base's own copying heads:

- :func:`induction_scores` measures, on seeded random token sequences repeated twice, how much
  each head of each layer attends from the second copy to the token after the first occurrence;
  :func:`induction_heads` picks the heads above a threshold.
- :class:`BaseAttentionCCA` is a CCA (same causal shift and chunk grouping as
  :class:`~retro_core.model.ChunkedCrossAttention`) whose RMSNorm and query/key/value/output
  projections are trainable copies of one base decoder layer's self-attention (grouped-query
  attention included), with a per-head output gate (open on the chosen heads, 0 elsewhere) and a
  per-head learned *sink* (attention mass that reads nothing, so a head can abstain when no
  neighbour matches): its logit is ``sink_h + q·null_key_h / sqrt(hs)`` (unrotated query), a
  bias plus a learned query-dependent part, both starting at 0. Its keys and values are computed from the neighbours' hidden states
  entering that layer, as the frozen base computes them (``RetrofittedLM`` runs the base on the
  neighbours: that is this variant's encoder). Rotary positions place the k neighbours (r tokens
  each) at positions 0 .. k·r-1 and the attending tokens right after them, as if the neighbours
  had been read just before the chunk.

Symbols: m chunk size, k neighbours, r tokens per neighbour, h heads, h_kv key/value heads,
hs head size, d width, G query groups (one per attended chunk).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .model import ChunkedCrossAttention

__all__ = ["GATE_LR_SCALE", "BaseAttentionCCA", "induction_heads", "induction_scores", "rotate"]

# Learning-rate multiplier of the gates, sinks and null keys against the copied projections in
# retro_core.train (measured: lr 1e-4 for the copies, 1e-2 for these; learning-curve.md).
GATE_LR_SCALE = 100.0

RopeFn = Callable[[Tensor], tuple[Tensor, Tensor]]  # positions (T,) -> cos, sin (T, hs)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding in the rotate-half layout of Llama: x (..., T, hs), cos/sin (T, hs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@torch.no_grad()
def induction_scores(
    hf_model: nn.Module, *, length: int = 64, batch: int = 4, seed: int = 0
) -> Tensor:
    """Induction score of every head: (L, h) in [0, 1].

    Feeds ``batch`` sequences of ``length`` random tokens (at most half the model's positions)
    repeated twice (seeded) and averages, over
    the second copy, the attention from each token to the token after its first occurrence.
    Needs a model that returns attention weights (``output_attentions``; eager attention).
    """
    cfg = hf_model.config
    length = min(length, int(getattr(cfg, "max_position_embeddings", 2 * length)) // 2)
    g = torch.Generator().manual_seed(seed)
    lo = min(1000, cfg.vocab_size // 4)
    x = torch.randint(lo, cfg.vocab_size, (batch, length), generator=g)
    dev = next(hf_model.parameters()).device
    seq = torch.cat([x, x], dim=1).to(dev)  # (batch, 2·length)
    old = getattr(cfg, "_attn_implementation", None)
    try:
        if old is not None:
            hf_model.set_attn_implementation("eager")
        att = hf_model(seq, output_attentions=True).attentions  # L x (batch, h, 2·len, 2·len)
    finally:
        if old is not None:
            hf_model.set_attn_implementation(old)
    q = torch.arange(length, 2 * length - 1, device=dev)
    return torch.stack([a[:, :, q, q - length + 1].mean((0, 2)) for a in att]).float().cpu()


def induction_heads(
    scores: Tensor, *, threshold: float = 0.4, max_layers: int = 4
) -> dict[int, tuple[int, ...]]:
    """{layer (1-indexed): heads} whose induction score is at least ``threshold``.

    At most ``max_layers`` layers, those with the highest best head; layer 1 is never chosen (a
    CCA copying layer L sits after layer L-1). Returns {} when no head qualifies.
    """
    best = scores.max(dim=1).values  # (L,)
    layers = [
        i + 1 for i in torch.argsort(best, descending=True).tolist() if best[i] >= threshold and i
    ][:max_layers]
    return {
        layer: tuple(int(h) for h in torch.nonzero(scores[layer - 1] >= threshold).flatten())
        for layer in sorted(layers)
    }


class BaseAttentionCCA(ChunkedCrossAttention):
    """CCA whose weights start as a copy of one Llama-family decoder layer's self-attention.

    ``forward`` (inherited) groups the queries by attended chunk with the paper's causal shift;
    :meth:`kv` and :meth:`attend` do the base layer's attention on the neighbours. Call it on the
    *unnormalised* hidden states: it applies its own copy of the layer's input RMSNorm.
    """

    def __init__(self, layer: nn.Module, chunk_size: int, heads: tuple[int, ...], n_heads: int):
        nn.Module.__init__(self)
        attn = layer.self_attn
        self.m = chunk_size
        self.n_heads = n_heads
        self.head_dim = attn.q_proj.out_features // n_heads
        self.n_kv = attn.k_proj.out_features // self.head_dim
        self.norm = copy.deepcopy(layer.input_layernorm)
        self.q_proj = copy.deepcopy(attn.q_proj)
        self.k_proj = copy.deepcopy(attn.k_proj)
        self.v_proj = copy.deepcopy(attn.v_proj)
        self.o_proj = copy.deepcopy(attn.o_proj)
        for p in self.parameters():
            p.requires_grad_(True)
        gate = torch.zeros(n_heads)
        gate[list(heads)] = 1.0
        p0 = self.q_proj.weight
        self.gate = nn.Parameter(gate.to(device=p0.device, dtype=p0.dtype))  # (h,)
        self.sink = nn.Parameter(torch.zeros(n_heads, device=p0.device, dtype=p0.dtype))  # (h,)
        # the sink's query-dependent part: a learned "null key" per head (starts at 0)
        self.null_key = nn.Parameter(
            torch.zeros(n_heads, self.head_dim, device=p0.device, dtype=p0.dtype)
        )  # (h, hs)
        for p in (self.gate, self.sink, self.null_key):  # a few numbers each: a faster rate
            p.lr_scale = GATE_LR_SCALE  # read by retro_core.train (its own optimizer group)

    def _split(self, x: Tensor, n: int) -> Tensor:
        G, T, _ = x.shape
        return x.view(G, T, n, self.head_dim).transpose(1, 2)  # (G, n, T, hs)

    def kv(self, enc: Tensor, rope: RopeFn) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """Keys and values (B, U, h, k·r, hs) from the neighbours' hidden states enc (B, U, k, r, d).

        The k neighbours sit at rotary positions 0 .. k·r-1 (one after the other).
        """
        B, U, k, r, d = enc.shape
        x = self.norm(enc.reshape(B * U, k * r, d))  # (B·U, k·r, d)
        cos, sin = rope(torch.arange(k * r, device=enc.device))
        keys = rotate(self._split(self.k_proj(x), self.n_kv), cos, sin)  # (B·U, h_kv, k·r, hs)
        values = self._split(self.v_proj(x), self.n_kv)
        rep = self.n_heads // self.n_kv
        keys = keys.repeat_interleave(rep, dim=1)  # (B·U, h, k·r, hs)
        values = values.repeat_interleave(rep, dim=1)
        return keys.view(B, U, *keys.shape[1:]), values.view(B, U, *values.shape[1:])

    def attention_probabilities(  # type: ignore[override]
        self, q: Tensor, pos_q: Tensor, kv: tuple[Tensor, Tensor], km: Tensor, rope: RopeFn
    ) -> Tensor:
        """float32 (G, h, Tq, k·r): what :meth:`attend` puts on each neighbour token.

        Each row sums to 1 minus the mass on the sink (which reads nothing).
        """
        keys = kv[0]  # (G, h, K, hs)
        K = keys.shape[2]
        cos, sin = rope(K + pos_q - (self.m - 1))
        q0 = self._split(self.q_proj(self.norm(q)), self.n_heads).float()  # (G, h, Tq, hs)
        scale = 1.0 / math.sqrt(self.head_dim)
        s = rotate(q0, cos.float(), sin.float()) @ keys.float().transpose(-1, -2) * scale
        s = s.masked_fill(~km[:, None, None, :], float("-inf"))
        sink = (q0 @ self.null_key.float()[:, :, None]) * scale + self.sink.float().view(
            1, -1, 1, 1
        )
        return torch.cat((s, sink), dim=-1).softmax(-1)[..., :K]

    def head_weights(self) -> Tensor:
        """float32 (h,): |gate| of each head, normalised to sum 1 (uniform when all gates are 0)."""
        g = self.gate.detach().abs().float().cpu()
        return g / g.sum() if float(g.sum()) > 0 else torch.full_like(g, 1.0 / len(g))

    def attend(
        self, q: Tensor, pos_q: Tensor, kv: tuple[Tensor, Tensor], km: Tensor, rope: RopeFn
    ) -> Tensor:
        """q (G, Tq, d) unnormalised hidden states at chunk offsets pos_q; returns (G, Tq, d)."""
        keys, values = kv  # (G, h, K, hs), K = k·r
        K = keys.shape[2]
        cos, sin = rope(K + pos_q - (self.m - 1))  # the neighbours come just before the chunk
        q0 = self._split(self.q_proj(self.norm(q)), self.n_heads)  # (G, h, Tq, hs)
        scale = 1.0 / math.sqrt(self.head_dim)
        s = rotate(q0, cos, sin) @ keys.transpose(-1, -2) * scale  # (G, h, Tq, K)
        s = s.masked_fill(~km[:, None, None, :], float("-inf"))
        sink = (q0 @ self.null_key[:, :, None]) * scale + self.sink.view(1, -1, 1, 1)  # (G,h,Tq,1)
        a = torch.cat((s, sink), dim=-1).softmax(-1)[..., :K]  # mass on the sink reads nothing
        y = (a @ values) * self.gate.view(1, -1, 1, 1)  # (G, h, Tq, hs)
        G, _, Tq, _ = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(G, Tq, -1))  # (G, Tq, d)
