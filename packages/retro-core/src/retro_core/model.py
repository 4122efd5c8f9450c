"""The RETRO model (Borgeaud et al., 2021, arXiv:2112.04426): a decoder with chunked cross-attention.

One file, top to bottom: rotary positions, attention, the feed-forward, the neighbour ``Encoder``,
``ChunkedCrossAttention`` (CCA), the decoder ``Block`` and the ``Retro`` model (its ``KVCache``
and what it shares with ``RetrofittedLM`` are in :mod:`retro_core.interface`).

Symbols (paper section 2): B batch, n sequence length (T when a forward sees only part of it),
m chunk size, l = ceil(n / m) chunks, U chunks whose neighbours are encoded, k neighbours per chunk,
r = 2m tokens per neighbour (the neighbour chunk N followed by its continuation F), d decoder width,
d' encoder width, h heads, hs head size, |V| vocabulary size.

Paper Algorithm 1 (appendix B), which ``Retro.forward`` follows::

    H <- EMB(X)
    for p in 1..L:
        H <- ATTN(H)                                       # causal self-attention
        if p == min(P): E <- ENCODER(RET(C_u)_u, H)        # conditioned on H of the retrieving chunk
        if p in P:      H <- CCA(H, E)                     # chunked cross-attention, causally shifted
        H <- FFW(H)
    O <- READ(H)

Choices the paper leaves open, and ours:
- Pre-norm residual blocks with RMSNorm, no biases, GELU feed-forward, tied input/output embeddings,
  GPT-2 initialisation (normal(0, 0.02), residual output projections scaled by 1/sqrt(2L)).
- Positions are relative everywhere through rotary embeddings (RoPE); there is no absolute position
  embedding. Self-attention uses absolute token positions (RoPE makes the scores relative). In CCA
  the m attending tokens (the last token of chunk u and the first m-1 of chunk u+1) get positions
  m-1 .. 2m-2, i.e. their offset from the start of chunk u, and each neighbour's tokens get
  positions 0 .. r-1 (N at 0 .. m-1, F at m .. 2m-1): a query and the neighbour token aligned with
  it have relative distance 0, the continuation of "the next token" is at distance +1. The encoder
  uses 0 .. r-1 within each neighbour and 0 .. m-1 within the retrieving chunk for its cross-attention.
- The encoder embeds neighbours with the decoder's token embedding (shared) and is conditioned on
  the decoder's residual stream right before the first CCA (after that layer's self-attention).
- A chunk with no real neighbour token (all rows padding) contributes exactly zero through CCA,
  the same as ``neighbours=None`` for that chunk (no NaN from fully masked attention).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import RetroConfig
from .interface import KVCache, RetrievalLMMixin

__all__ = [
    "CCAAttention",
    "ChunkedCrossAttention",
    "Encoder",
    "KVCache",
    "Retro",
    "capture_cca_attention",
    "init_weights",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings (Su et al., 2021)


def keep_positions(h: Tensor, logits_to_keep: int | Tensor) -> Tensor:
    """The positions of h (B, T, d) whose logits are wanted (Hugging Face's ``logits_to_keep``).

    0 keeps all T, an int N > 0 the last N, a 1-D int tensor those positions (B, len, d).
    """
    if isinstance(logits_to_keep, Tensor):
        if logits_to_keep.ndim != 1:
            raise ValueError(
                f"logits_to_keep: expected an int or a 1-D tensor of positions, got shape "
                f"{tuple(logits_to_keep.shape)}"
            )
        return h[:, logits_to_keep.to(h.device)]
    n = int(logits_to_keep)
    if n < 0:
        raise ValueError(f"logits_to_keep: expected >= 0 (0 = every position), got {n}")
    return h if n == 0 else h[:, -n:]


class Rotary(nn.Module):
    """A table of rotary cos/sin for positions 0 .. max_pos-1 (not saved in the state dict)."""

    def __init__(self, head_size: int, base: float, max_pos: int):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.float64) / head_size))
        angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
        self.register_buffer("cos", angles.cos().float(), persistent=False)  # (max_pos, hs/2)
        self.register_buffer("sin", angles.sin().float(), persistent=False)  # (max_pos, hs/2)

    def forward(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """pos: int (T,) -> cos, sin (T, hs/2)."""
        if pos.numel() and int(pos.max()) >= self.cos.shape[0]:
            raise ValueError(
                f"position {int(pos.max())} is beyond the rotary table ({self.cos.shape[0]} "
                "positions): raise RetroConfig.max_seq_len / neighbour_len"
            )
        return self.cos[pos], self.sin[pos]


def apply_rotary(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate pairs (x_i, x_{i+hs/2}) of x (..., T, hs) by the angles of rope (T, hs/2)."""
    cos, sin = (t.to(x.dtype) for t in rope)
    x1, x2 = x.chunk(2, dim=-1)  # (..., T, hs/2) each
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


# ----------------------------------------------------------------------------------------------
# Building blocks


class Attention(nn.Module):
    """Multi-head attention of queries from x (width d_q) over a context (width d_kv).

    Serves decoder self-attention, CCA, and the encoder's self- and cross-attention.
    """

    def __init__(self, d_q: int, d_kv: int, d_attn: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_q, d_attn, bias=False)
        self.k_proj = nn.Linear(d_kv, d_attn, bias=False)
        self.v_proj = nn.Linear(d_kv, d_attn, bias=False)
        self.out_proj = nn.Linear(d_attn, d_q, bias=False)
        self.resid_drop = nn.Dropout(dropout)

    def _heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, -1).transpose(1, 2)  # (B, h, T, hs)

    def kv(self, ctx: Tensor, k_rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Rotated keys and values (B, h, Tk, hs) of a context ctx (B, Tk, d_kv)."""
        k = apply_rotary(self._heads(self.k_proj(ctx)), k_rope)  # (B, h, Tk, hs)
        v = self._heads(self.v_proj(ctx))  # (B, h, Tk, hs)
        return k, v

    def forward(
        self,
        x: Tensor,
        ctx: Tensor | None,
        q_rope: tuple[Tensor, Tensor],
        k_rope: tuple[Tensor, Tensor] | None,
        mask: Tensor | None = None,
        is_causal: bool = False,
        past: tuple[Tensor, Tensor] | None = None,
        kv: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, Tq, d_q), ctx (B, Tk, d_kv); mask bool broadcastable to (B, h, Tq, Tk), True = attend.

        ``past`` are cached rotated keys/values (B, h, Tp, hs) prepended to this call's; ``kv``
        replaces the context's keys/values altogether (then ctx is unused). Returns the output
        (B, Tq, d_q) and the keys/values (B, h, Tp + Tk, hs) for a cache.
        """
        B, Tq, _ = x.shape
        q = apply_rotary(self._heads(self.q_proj(x)), q_rope)  # (B, h, Tq, hs)
        k, v = kv if kv is not None else self.kv(ctx, k_rope)  # (B, h, Tk, hs)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)  # (B, h, Tp + Tk, hs)
            v = torch.cat((past[1], v), dim=2)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, h, Tq, hs)
        y = y.transpose(1, 2).reshape(B, Tq, -1)  # (B, Tq, h*hs)
        return self.resid_drop(self.out_proj(y)), (k, v)


class FeedForward(nn.Module):
    """FFW: d -> d_ff -> d with GELU."""

    def __init__(self, d: int, d_ff: int, dropout: float):
        super().__init__()
        self.up = nn.Linear(d, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.down(F.gelu(self.up(x))))


# ----------------------------------------------------------------------------------------------
# The neighbour encoder (paper section 2.4, Algorithm 1 ENCODER)


class EncoderBlock(nn.Module):
    """Bidirectional self-attention, cross-attention to the retrieving chunk's activations, FFW."""

    def __init__(self, cfg: RetroConfig):
        super().__init__()
        de, p = cfg.enc_d_model, cfg.dropout
        self.norm1 = nn.RMSNorm(de, eps=cfg.norm_eps)
        self.self_attn = Attention(de, de, de, cfg.enc_n_heads, p)
        self.norm2 = nn.RMSNorm(de, eps=cfg.norm_eps)
        self.cross_attn = Attention(de, cfg.d_model, de, cfg.enc_n_heads, p)
        self.norm3 = nn.RMSNorm(de, eps=cfg.norm_eps)
        self.ffw = FeedForward(de, cfg.enc_d_ff, p)

    def forward(
        self, x: Tensor, ctx: Tensor, mask: Tensor, rope_r: tuple, rope_kr: tuple, rope_m: tuple
    ) -> Tensor:
        """x (B·U·k, r, d') neighbours, ctx (B·U, m, d) their retrieving chunks, mask (B·U·k, 1, 1, r).

        In the cross-attention the k neighbours of a chunk are concatenated on the query axis
        (each query attends the same m chunk tokens independently), so the chunk's keys and
        values are computed once, not k times.
        """
        N, r, de = x.shape
        BU = ctx.shape[0]
        xn = self.norm1(x)
        x = x + self.self_attn(xn, xn, rope_r, rope_r, mask=mask)[0]
        xq = self.norm2(x).reshape(BU, N // BU * r, de)  # (B·U, k·r, d')
        x = x + self.cross_attn(xq, ctx, rope_kr, rope_m)[0].reshape(N, r, de)  # (B·U·k, r, d')
        return x + self.ffw(self.norm3(x))


class Encoder(nn.Module):
    """Encodes the k neighbours of each chunk, conditioned on the decoder activations of that chunk."""

    def __init__(self, cfg: RetroConfig):
        super().__init__()
        de = cfg.enc_d_model
        self.in_proj = (
            nn.Linear(cfg.d_model, de, bias=False) if de != cfg.d_model else nn.Identity()
        )
        self.in_norm = nn.RMSNorm(de, eps=cfg.norm_eps) if cfg.enc_input_norm else nn.Identity()
        self.ctx_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.enc_layers))
        self.norm_f = nn.RMSNorm(de, eps=cfg.norm_eps)
        max_pos = max(cfg.neighbour_len, cfg.chunk_size)
        self.rope = Rotary(de // cfg.enc_n_heads, cfg.rope_base, max_pos)

    def forward(self, emb: Tensor, mask: Tensor, h_chunks: Tensor) -> Tensor:
        """Encode neighbours.

        Args:
            emb: (B, U, k, r, d) token embeddings of the neighbours of U chunks.
            mask: bool (B, U, k, r), True on real tokens.
            h_chunks: (B, U, m, d) decoder activations of each retrieving chunk.

        Returns:
            E (B, U, k, r, d'). Rows without real tokens hold finite values that CCA masks out.
        """
        B, U, k, r, d = emb.shape
        m = h_chunks.shape[2]
        x = self.in_norm(self.in_proj(emb)).reshape(B * U * k, r, -1)  # (B·U·k, r, d')
        ctx = self.ctx_norm(h_chunks).reshape(B * U, m, d)  # (B·U, m, d)
        km = mask.reshape(B * U * k, r)  # (B·U·k, r)
        km = km | ~km.any(-1, keepdim=True)  # an empty row attends to all of itself: finite, unused
        km = km[:, None, None, :]  # (B·U·k, 1, 1, r)
        pos_r = torch.arange(r, device=emb.device)
        rope_r, rope_m = self.rope(pos_r), self.rope(torch.arange(m, device=emb.device))
        rope_kr = self.rope(pos_r.repeat(k))  # (k·r,) the k neighbours on one axis
        for block in self.blocks:
            x = block(x, ctx, km, rope_r, rope_kr, rope_m)
        return self.norm_f(x).view(B, U, k, r, -1)  # (B, U, k, r, d')


# ----------------------------------------------------------------------------------------------
# Chunked cross-attention (paper section 2.4, equation 3, Figure 2)


@dataclass
class CCAAttention:
    """The attention probabilities of one chunked cross-attention layer in one forward call.

    Recorded by :func:`capture_cca_attention`. T tokens at absolute positions ``start ..
    start+T-1``; each attends the k x r neighbour tokens of one chunk (see
    :class:`ChunkedCrossAttention`).

    Attributes:
        name: the CCA module's qualified name in the model (e.g. ``blocks.4.cca``).
        start: absolute position of the call's first token.
        chunks: int64 (T,) the chunk u whose neighbours each token attends,
            u = (t - (m-1)) // m, or -1 for the first m-1 tokens of a sequence (they attend
            nothing).
        probs: float32 (B, T, h, k, r) each token's attention probabilities, per head, over the
            k neighbours x r tokens of its chunk: padding tokens get 0, and over the k·r tokens
            each (token, head) sums to 1, except in a CCA with an attention *sink* (a retro-fit's
            ``BaseAttentionCCA``), where the rest, 1 - sum, is the mass that reads nothing.
            All zero for a token whose ``chunks`` is -1 or whose chunk has no real neighbour
            token (CCA adds exactly nothing there).
        head_weights: float32 (h,) non-negative, summing to 1: how much each head contributes
            to the layer's output (uniform; a retro-fit's gated heads by their |gate|); a head
            average weighted by these keeps a sum of 1 over the neighbour tokens.
    """

    name: str
    start: int
    chunks: Tensor
    probs: Tensor
    head_weights: Tensor


class ChunkedCrossAttention(nn.Module):
    """CCA with the paper's causal shift.

    The token at absolute position t >= m-1 attends to the encoded neighbours of chunk
    u = (t - (m-1)) // m, i.e. tokens (u+1)m-1 .. (u+2)m-2 (the last token of chunk u and the first
    m-1 of chunk u+1) attend E_u. Tokens 0 .. m-2 attend nothing: their output is zero, so the
    residual stream passes through unchanged. The k neighbours x r tokens of a chunk are
    concatenated on one key axis.

    Inside :func:`capture_cca_attention` each forward also records its attention probabilities
    (a :class:`CCAAttention`), computed beside the output, which stays the same bit for bit.
    """

    # (records, name) while inside capture_cca_attention; a class default, so subclasses that
    # skip this __init__ (BaseAttentionCCA) have it too
    _capture: tuple[list[CCAAttention], str] | None = None

    def __init__(self, cfg: RetroConfig):
        super().__init__()
        self.m = cfg.chunk_size
        self.attn = Attention(cfg.d_model, cfg.enc_d_model, cfg.d_model, cfg.n_heads, cfg.dropout)

    def attention_probabilities(
        self, q: Tensor, pos_q: Tensor, kv: tuple[Tensor, Tensor], km: Tensor, rope: Rotary
    ) -> Tensor:
        """The probabilities :meth:`attend` uses for the same arguments: float32 (G, h, Tq, k·r).

        softmax(q·k / sqrt(hs)) over the real neighbour tokens (masked ones get 0), without
        dropout. Each row sums to 1.
        """
        keys = kv[0]  # (G, h, k·r, hs)
        qh = apply_rotary(self.attn._heads(self.attn.q_proj(q)), rope(pos_q))  # (G, h, Tq, hs)
        s = qh.float() @ keys.float().transpose(-1, -2) / math.sqrt(keys.shape[-1])
        s = s.masked_fill(~km[:, None, None, :], float("-inf"))  # (G, h, Tq, k·r)
        return s.softmax(-1)

    def head_weights(self) -> Tensor:
        """float32 (h,): each head's share of the output (uniform here), summing to 1."""
        h = self.attn.n_heads
        return torch.full((h,), 1.0 / h)

    def kv(self, enc: Tensor, rope: Rotary) -> tuple[Tensor, Tensor]:
        """Keys and values (B, U, h, k·r, hs) of encoded neighbours enc (B, U, k, r, d').

        Key positions are 0 .. r-1 within each neighbour. Computed once per chunk (and cached
        during generation), then read by every token attending that chunk.
        """
        B, U, k, r, de = enc.shape
        pos_k = torch.arange(r, device=enc.device).repeat(
            k
        )  # (k·r,) position within each neighbour
        keys, values = self.attn.kv(enc.reshape(B * U, k * r, de), rope(pos_k))  # (B·U, h, k·r, hs)
        return keys.view(B, U, *keys.shape[1:]), values.view(B, U, *values.shape[1:])

    def attend(
        self, q: Tensor, pos_q: Tensor, kv: tuple[Tensor, Tensor], km: Tensor, rope: Rotary
    ) -> Tensor:
        """Attention of G groups of queries over their chunk's neighbours.

        q (G, Tq, d) at offsets pos_q (Tq,) from the start of the attended chunk; kv the keys and
        values (G, h, k·r, hs); km bool (G, k·r), True on real neighbour tokens. Returns (G, Tq, d).
        """
        return self.attn(q, None, rope(pos_q), None, mask=km[:, None, None, :], kv=kv)[0]

    # The causal shift, m = 4: token t attends the neighbours E_u of the chunk u that it follows,
    # u = (t - (m-1)) // m, so what it reads never holds its own or a later token's continuation.
    #
    #   token t    0  1  2  3  4  5  6  7  8  9 10 11 12 ...
    #   chunk      |--- C0 ---|--- C1 ---|--- C2 ---|---
    #   attends    -  -  -  E0 E0 E0 E0 E1 E1 E1 E1 E2 E2 ...
    #
    # In a batch the tokens are regrouped into groups of m (3..6, 7..10, ...), one per attended
    # chunk, each a query block over that chunk's k·r neighbour tokens.
    def forward(
        self, x: Tensor, start: int, enc_mask: Tensor, kv: tuple[Tensor, Tensor], rope: Rotary
    ) -> Tensor:
        """CCA output for x.

        Args:
            x: (B, T, d) normalised decoder activations of tokens at positions start .. start+T-1.
            start: absolute position of x[:, 0].
            enc_mask: bool (B, U, k, r), True on real neighbour tokens of chunks 0 .. U-1; U must
                cover every chunk attended by x, i.e. U >= (start + T) // m.
            kv: keys and values (B, U, h, k·r, hs) of the encoded neighbours (see :meth:`kv`).
            rope: the decoder's rotary table.

        Returns:
            (B, T, d), exactly zero for tokens that attend nothing or whose chunk has no real
            neighbour token.
        """
        m = self.m
        B, T, d = x.shape
        s0 = start - (m - 1)  # shifted position of x[:, 0]; token t attends chunk (t - (m-1)) // m
        skip = min(T, max(0, -s0))  # leading tokens t < m-1 attend nothing
        if skip == T:
            if self._capture is not None:  # no token attends anything: all-zero probabilities
                p = x.new_zeros(B, kv[0].shape[2], 0, kv[0].shape[3], dtype=torch.float32)
                has0 = torch.ones(B, dtype=torch.bool, device=x.device)
                self._record(p, has0, B, T, start, skip, 0, 1, enc_mask.shape[2:])
            return torch.zeros_like(x)
        s_first, s_last = s0 + skip, s0 + T - 1
        u_lo, u_hi = s_first // m, s_last // m  # attended chunks u_lo .. u_hi
        nU = u_hi - u_lo + 1
        front = s_first - u_lo * m  # tokens of the first attending group already seen before
        xs = x[:, skip:]  # (B, T', d)
        h, kr, hs = kv[0].shape[2:]
        keys = kv[0][:, u_lo : u_hi + 1].reshape(B * nU, h, kr, hs)  # (B·nU, h, k·r, hs)
        values = kv[1][:, u_lo : u_hi + 1].reshape(B * nU, h, kr, hs)
        km = enc_mask[:, u_lo : u_hi + 1].reshape(B * nU, kr)  # (B·nU, k·r)
        has = km.any(-1)  # (B·nU,) the chunk has at least one real neighbour token
        km = km | ~has[:, None]  # fully masked rows would give NaN: attend all, zero below
        if nU == 1:  # all of x attends one chunk (e.g. one generation step): no padding needed
            q = xs  # (B, T', d)
            pos_q = torch.arange(m - 1 + front, m - 1 + front + xs.shape[1], device=x.device)
        else:
            xs = F.pad(xs, (0, 0, front, nU * m - front - xs.shape[1]))  # (B, nU·m, d)
            q = xs.reshape(B * nU, m, d)  # (B·nU, m, d): the m tokens attending chunk u
            pos_q = torch.arange(m - 1, 2 * m - 1, device=x.device)  # offsets from chunk u's start
        y = self.attend(q, pos_q, (keys, values), km, rope)  # (B·nU, m or T', d)
        y = torch.where(has[:, None, None], y, torch.zeros((), dtype=y.dtype, device=y.device))
        if self._capture is not None:
            with torch.no_grad():
                p = self.attention_probabilities(q, pos_q, (keys, values), km, rope)
                self._record(p, has, B, T, start, skip, front, nU, enc_mask.shape[2:])
        if nU > 1:
            y = y.reshape(B, nU * m, d)[:, front : front + T - skip]  # (B, T', d)
        return F.pad(y, (0, 0, skip, 0))  # (B, T, d)

    def _record(
        self,
        p: Tensor,
        has: Tensor,
        B: int,
        T: int,
        start: int,
        skip: int,
        front: int,
        nU: int,
        kr: tuple[int, ...],
    ) -> None:
        """Append probabilities p (B·nU, h, m or T', k·r) to the capture, one row per token."""
        assert self._capture is not None
        records, name = self._capture
        m = self.m
        h = p.shape[1]
        p = p * has[:, None, None, None].to(p.dtype)  # chunks without neighbours read nothing
        if nU > 1:  # (B, nU, h, m, k·r) -> the tokens' order
            p = p.view(B, nU, h, m, -1).permute(0, 1, 3, 2, 4).reshape(B, nU * m, h, -1)
            p = p[:, front : front + T - skip]
        else:
            p = p.permute(0, 2, 1, 3)  # (B, T', h, k·r)
        p = F.pad(p, (0, 0, 0, 0, skip, 0))  # (B, T, h, k·r)
        pos = torch.arange(start, start + T)
        chunks = torch.where(pos >= m - 1, (pos - (m - 1)) // m, -1)
        records.append(
            CCAAttention(
                name=name,
                start=int(start),
                chunks=chunks,
                probs=p.reshape(B, T, h, *kr).float().cpu(),
                head_weights=self.head_weights().float().cpu(),
            )
        )


@contextmanager
def capture_cca_attention(model: nn.Module) -> Iterator[list[CCAAttention]]:
    """Record the attention probabilities of every chunked cross-attention layer of ``model``.

    Inside the ``with`` block each forward of a :class:`ChunkedCrossAttention` (or a subclass,
    e.g. a retro-fit's ``BaseAttentionCCA``) appends one :class:`CCAAttention` to the list this
    yields, in call order (one per CCA layer per forward). The probabilities are computed beside
    the layer's own attention, so the forward's outputs are the same, bit for bit, as without
    capture; they cost one more q·k product per layer. Works for ``Retro`` and ``RetrofittedLM``
    alike (anything whose CCA modules are ``ChunkedCrossAttention``); nothing is recorded after
    the block exits.

    Example::

        with capture_cca_attention(model) as records:
            logits = model(tokens, neighbours)
        probs = records[0].probs  # (B, T, h, k, r)
    """
    records: list[CCAAttention] = []
    mods = [(n, mod) for n, mod in model.named_modules() if isinstance(mod, ChunkedCrossAttention)]
    for name, mod in mods:
        mod._capture = (records, name)
    try:
        yield records
    finally:
        for _, mod in mods:
            mod._capture = None


# ----------------------------------------------------------------------------------------------
# The decoder


class Block(nn.Module):
    """Decoder block p: H <- ATTN(H); [E <- ENCODER(RET(C), H)]; [H <- CCA(H, E)]; H <- FFW(H).

    Each step is pre-norm and residual. Only blocks p in P (``cfg.cca_layers``) have CCA; the
    first of them (p = min(P), ``conditions``) also encodes the neighbours, conditioned on its
    residual stream after self-attention.
    """

    def __init__(self, cfg: RetroConfig, layer: int):
        super().__init__()
        d, p = cfg.d_model, cfg.dropout
        self.layer = layer  # p, 1-indexed
        self.conditions = layer == cfg.cond_layer
        self.norm1 = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.attn = Attention(d, d, d, cfg.n_heads, p)
        if layer in cfg.cca_layers:  # only these names are absent from the baseline's state dict
            self.norm_cca = nn.RMSNorm(d, eps=cfg.norm_eps)
            self.cca = ChunkedCrossAttention(cfg)
        else:
            self.cca = None
        self.norm2 = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.ffw = FeedForward(d, cfg.d_ff, p)

    def forward(self, h: Tensor, run: _Run) -> Tensor:
        """h (B, T, d) -> (B, T, d); reads and updates ``run`` (the cache, the encoded E)."""
        h = h + self._self_attention(self.norm1(h), run)  # H <- ATTN(H)
        if self.cca is not None:
            if self.conditions and run.encode is not None:
                run.enc, run.enc_mask = run.encode(h)  # E <- ENCODER(RET(C_u)_u, H)
            if run.enc is not None:  # H <- CCA(H, E)
                kv = run.cca_kv(self.layer - 1, self.cca, run.enc)
                h = h + self.cca(self.norm_cca(h), run.start, run.enc_mask, kv, run.rotary)
        return h + self.ffw(self.norm2(h))  # H <- FFW(H)

    def _self_attention(self, x: Tensor, run: _Run) -> Tensor:
        """Causal self-attention of x (B, T, d) after the cached tokens; appends to the cache."""
        i, cache = self.layer - 1, run.cache
        past = None if cache is None or cache.keys[i] is None else (cache.keys[i], cache.values[i])
        a, (k_all, v_all) = self.attn(
            x, x, run.rope, run.rope, mask=run.mask, is_causal=run.is_causal, past=past
        )
        if cache is not None:
            cache.keys[i], cache.values[i] = k_all, v_all
        return a


@dataclass
class _Run:
    """What every block reads during one :meth:`Retro.forward` (tokens start .. start+T-1)."""

    start: int
    rope: tuple[Tensor, Tensor]  # self-attention rotary cos/sin at the T positions
    mask: Tensor | None  # self-attention mask, or None with is_causal
    is_causal: bool
    cache: KVCache | None
    rotary: Rotary  # the decoder's table, read by CCA
    encode: Callable[[Tensor], tuple[Tensor | None, Tensor | None]] | None  # None: no retrieval
    cca_kv: Callable[[int, ChunkedCrossAttention, Tensor], tuple[Tensor, Tensor]]
    enc: Tensor | None = None  # (B, U, k, r, d') once encoded
    enc_mask: Tensor | None = None  # (B, U, k, r)


def init_weights(module: nn.Module) -> None:
    """GPT-2 initialisation of one module: Linear/Embedding weights ~ normal(0, 0.02), biases 0.

    Use with ``model.apply(init_weights)``.
    """
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


class Retro(RetrievalLMMixin, nn.Module):
    """The RETRO language model; ``cfg.cca_layers == ()`` gives the matched decoder-only baseline.

    Parameter names of the shared parts (``tok_emb``, ``blocks.<i>.{norm1,attn,norm2,ffw}``,
    ``norm_f``) are identical with and without retrieval, so a baseline's state dict is a subset of
    the RETRO one's. The output projection is tied to ``tok_emb`` (no separate weight).
    """

    def __init__(self, config: RetroConfig):
        super().__init__()
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, p) for p in range(1, cfg.n_layers + 1))
        self.encoder = Encoder(cfg) if cfg.cca_layers else None
        self.norm_f = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        max_pos = max(cfg.max_seq_len, cfg.neighbour_len, 2 * cfg.chunk_size)
        self.rope = Rotary(cfg.d_model // cfg.n_heads, cfg.rope_base, max_pos)
        self.apply(init_weights)
        # GPT-2: residual output projections scaled by 1/sqrt(2L).
        for name, p in self.named_parameters():
            if name.endswith(("out_proj.weight", "ffw.down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (the tied embedding counted once, or not at all)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if exclude_embeddings else n

    def retrieval_parameter_names(self) -> list[str]:
        """Names of the parameters a decoder-only baseline lacks (CCA layers and the encoder).

        RETRO-fitting (paper section 4.4) trains exactly these and freezes the rest.
        """
        return [
            name
            for name, _ in self.named_parameters()
            if name.startswith("encoder.") or ".cca." in name or ".norm_cca." in name
        ]

    def new_cache(self) -> KVCache:
        """An empty cache for incremental decoding with ``forward(..., cache=cache)``."""
        L = self.config.n_layers
        return KVCache(keys=[None] * L, values=[None] * L)

    def forward(
        self,
        tokens: Tensor,
        neighbours: Tensor | None = None,
        neighbour_lengths: Tensor | None = None,
        *,
        cache: KVCache | None = None,
        logits_to_keep: int | Tensor = 0,
    ) -> Tensor:
        """Next-token logits.

        Args:
            tokens: int (B, n) token ids. With a ``cache``, the next T tokens after the
                ``cache.length`` already consumed (absolute positions cache.length .. +T-1).
            neighbours: int (B, l, k, r) neighbour tokens of chunk u at index u (absolute chunk
                index; l >= number of complete chunks, extra chunks are ignored), or None for
                RETRO[OFF] (CCA contributes nothing). With a cache, only the chunks that complete
                during this call are read; earlier ones come from the cache.
            neighbour_lengths: int (B, l, k) real tokens per neighbour row (a prefix; 0 = no
                neighbour), or None when all r tokens are real.
            cache: a :class:`KVCache` for incremental decoding, updated in place.
            logits_to_keep: as in Hugging Face models: 0 = logits at all T positions; an int
                N > 0 = only the last N positions; a 1-D int tensor = only those positions (the
                same for every row). The |V|-way read-out is the costliest matmul of a small
                model, so scoring a strided window's new tokens only is much cheaper.

        Returns:
            logits (B, T, |V|), or (B, N, |V|) / (B, len(logits_to_keep), |V|).
        """
        start = cache.length if cache is not None else 0
        end = start + tokens.shape[1]
        self._check_inputs(tokens, neighbours, neighbour_lengths, end)
        h = self.drop(self.tok_emb(tokens))  # H <- EMB(X): (B, T, d)
        run = self._run(tokens, start, neighbours, neighbour_lengths, cache)
        for block in self.blocks:  # ATTN; [ENCODER]; [CCA]; FFW
            h = block(h, run)
        if cache is not None:
            cache.length = end
        h = self.norm_f(keep_positions(h, logits_to_keep))
        return F.linear(h, self.tok_emb.weight)  # O <- READ(H): (B, T, |V|), tied

    def _run(
        self,
        tokens: Tensor,
        start: int,
        neighbours: Tensor | None,
        lengths: Tensor | None,
        cache: KVCache | None,
    ) -> _Run:
        """The positions, self-attention mask and retrieval hooks of one forward."""
        T = tokens.shape[1]
        end = start + T
        pos = torch.arange(start, end, device=tokens.device)
        if cache is None or start == 0:
            mask, is_causal = None, T > 1
        elif T == 1:
            mask, is_causal = None, False
        else:  # a block of T new tokens after a cached prefix: token i sees positions <= start+i
            mask = torch.arange(end, device=tokens.device)[None, :] <= pos[:, None]  # (T, start+T)
            is_causal = False
        encode = None
        if self.encoder is not None and (neighbours is not None or cache is not None):
            encode = partial(
                self._encode, start=start, neighbours=neighbours, lengths=lengths, cache=cache
            )
        return _Run(
            start=start,
            rope=self.rope(pos),
            mask=mask,
            is_causal=is_causal,
            cache=cache,
            rotary=self.rope,
            encode=encode,
            cca_kv=partial(self._cca_kv, cache=cache),
        )
