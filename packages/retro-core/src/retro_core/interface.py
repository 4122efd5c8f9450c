"""The retrieval-LM interface: what generation, training and scoring need from a model.

Two models satisfy it: :class:`~retro_core.model.Retro` (RETRO trained from scratch, or its
decoder-only baseline) and :class:`~retro_core.retrofit.RetrofittedLM` (a frozen Hugging Face
model with chunked cross-attention added). Code that accepts either takes a :class:`RetrievalLM`.

What the two share is here too, so neither borrows from the other:

- :class:`KVCache`, the state of incremental decoding (the neighbours encoded so far, and for
  ``Retro`` its self-attention keys/values);
- :class:`RetrievalLMMixin`: the input checks, the encoding of each completed chunk's neighbours
  (``E <- ENCODER(RET(C_u), H)`` of paper Algorithm 1, once per chunk with a cache), the CCA
  keys/values over ``E`` (cached likewise), the geometry and the retriever check. It reads only
  ``config``, ``encoder``, ``tok_emb`` and ``rope`` of the model it is mixed into.

Symbols as in :mod:`retro_core.model`: B batch, T tokens in one call, m chunk size, U chunks
whose neighbours are encoded, k neighbours, r tokens per neighbour, d / d' decoder / encoder width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .config import RetroConfig
from .retrieval import check_retriever

__all__ = ["Geometry", "KVCache", "RetrievalLM", "RetrievalLMMixin"]


class Geometry(NamedTuple):
    """The shape of a model's retrieval: m tokens per chunk, k neighbours, r tokens per neighbour."""

    m: int
    k: int
    r: int


@dataclass
class KVCache:
    """State of incremental decoding (see ``new_cache()``); updated in place by ``forward``.

    Attributes:
        keys, values: per decoder layer, rotated self-attention keys/values (B, h, t, hs).
        length: t, the number of tokens consumed so far.
        h_cond: (B, t - U·m, d) the conditioning activations (input of the first CCA) of the tokens
            of the current, not yet complete chunk.
        enc, enc_mask: (B, U, k, r, d') / bool (B, U, k, r) encoded neighbours of the U completed
            chunks, computed once when each chunk completes and reused by the next m tokens.
        cca_kv: per CCA layer, its keys/values (B, U, h, k·r, hs) of ``enc``, also computed once.
    """

    keys: list[Tensor | None]
    values: list[Tensor | None]
    length: int = 0
    h_cond: Tensor | None = None
    enc: Tensor | None = None
    enc_mask: Tensor | None = None
    cca_kv: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)

    @property
    def num_encoded(self) -> int:
        """U, the number of chunks whose neighbours are encoded."""
        return 0 if self.enc is None else int(self.enc.shape[1])


@runtime_checkable
class RetrievalLM(Protocol):
    """A language model that reads the neighbours of each completed chunk (and any ``nn.Module``
    method: ``parameters()``, ``train()``, ``to()`` ...).

    ``forward`` (and calling the model) gives next-token logits (B, T, |V|) for tokens (B, T) at
    absolute positions ``cache.length .. +T-1`` (0 .. T-1 without a cache), with neighbours
    (B, l, k, r) of chunk u at index u (None: RETRO[OFF]), ``neighbour_lengths`` (B, l, k) real
    tokens per neighbour row (None: all real), and ``logits_to_keep`` as in Hugging Face models.
    """

    config: RetroConfig

    def forward(
        self,
        tokens: Tensor,
        neighbours: Tensor | None = None,
        neighbour_lengths: Tensor | None = None,
        *,
        cache: Any = None,
        logits_to_keep: int | Tensor = 0,
    ) -> Tensor:
        """Next-token logits (B, T, |V|)."""
        ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``forward`` through ``nn.Module.__call__`` (hooks included)."""
        ...

    def new_cache(self) -> KVCache:
        """An empty cache for incremental decoding with ``forward(..., cache=cache)``."""
        ...

    @property
    def geometry(self) -> Geometry:
        """(m, k, r): chunk size, neighbours per chunk trained with, tokens per neighbour."""
        ...

    def check_retriever(self, retriever: object) -> None:
        """Refuse a retriever built with another chunk size or tokenizer than the model's."""
        ...


class RetrievalLMMixin:
    """What :class:`~retro_core.model.Retro` and ``RetrofittedLM`` share (mixed into an
    ``nn.Module`` that has ``config``, ``encoder``, ``tok_emb`` and ``rope``)."""

    config: RetroConfig
    encoder: nn.Module | None
    rope: nn.Module

    @property
    def geometry(self) -> Geometry:
        """(m, k, r): chunk size, neighbours per chunk trained with, tokens per neighbour."""
        cfg = self.config
        return Geometry(cfg.chunk_size, cfg.num_neighbours, cfg.neighbour_len)

    def check_retriever(self, retriever: object) -> None:
        """Refuse a retriever built with another chunk size or tokenizer than this model's."""
        check_retriever(
            retriever, chunk_size=self.config.chunk_size, tokenizer_id=self.config.tokenizer_id
        )

    def _check_inputs(
        self, tokens: Tensor, neighbours: Tensor | None, lengths: Tensor | None, end: int
    ) -> None:
        """Raise ValueError on tokens / neighbours / lengths that ``forward`` cannot take."""
        cfg = self.config
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"tokens: expected an int tensor [B, n], got {tokens.dtype} {tuple(tokens.shape)}"
            )
        if end > cfg.max_seq_len:
            raise ValueError(f"tokens: sequence length {end} exceeds max_seq_len={cfg.max_seq_len}")
        if neighbours is None:
            if lengths is not None:
                raise ValueError("neighbour_lengths given without neighbours")
            return
        if neighbours.ndim != 4 or neighbours.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"neighbours: expected [B={tokens.shape[0]}, l, k, r], got {tuple(neighbours.shape)}"
            )
        need = end // cfg.chunk_size
        if neighbours.shape[1] < need:
            raise ValueError(
                f"neighbours: expected the neighbours of at least the {need} complete chunks "
                f"(l >= {need}), got l={neighbours.shape[1]}"
            )
        if neighbours.shape[2] < 1 or neighbours.shape[3] < 1:
            raise ValueError(
                f"neighbours: expected k >= 1 and r >= 1, got {tuple(neighbours.shape)}"
            )
        if lengths is not None and tuple(lengths.shape) != tuple(neighbours.shape[:3]):
            raise ValueError(
                f"neighbour_lengths: expected shape {tuple(neighbours.shape[:3])} ([B, l, k]), "
                f"got {tuple(lengths.shape)}"
            )

    def _cca_kv(
        self, i: int, cca: nn.Module, enc: Tensor, cache: KVCache | None
    ) -> tuple[Tensor, Tensor]:
        """Keys/values (B, U, h, k·r, hs) of layer i's CCA over enc (B, U, k, r, d'), cached."""
        if cache is None:
            return cca.kv(enc, self.rope)
        have = cache.cca_kv.get(i)
        n_have = 0 if have is None else have[0].shape[1]
        n_real = cache.num_encoded  # chunks beyond it are zero padding (no neighbours)
        if n_real > n_have:
            new = cca.kv(cache.enc[:, n_have:n_real], self.rope)
            have = (
                new
                if have is None
                else (torch.cat((have[0], new[0]), 1), torch.cat((have[1], new[1]), 1))
            )
            cache.cca_kv[i] = have
        if enc.shape[1] > n_real:
            pad = cca.kv(enc[:, n_real:], self.rope)
            have = (
                pad
                if have is None
                else (torch.cat((have[0], pad[0]), 1), torch.cat((have[1], pad[1]), 1))
            )
        return have

    def _encode(
        self,
        h: Tensor,
        start: int,
        neighbours: Tensor | None,
        lengths: Tensor | None,
        cache: KVCache | None,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Encode the neighbours of the chunks completed by this call; returns all U chunks' E.

        h: (B, T, d) conditioning activations of this call's tokens. Returns E (B, U, k, r, d')
        and its mask (B, U, k, r), U = (start + T) // m, or (None, None) when nothing was ever
        retrieved. With a cache, chunks completed while ``neighbours`` is None attend nothing.
        """
        m = self.config.chunk_size
        B, T, d = h.shape
        end = start + T
        U_done = cache.num_encoded if cache is not None else 0
        U = end // m
        # Conditioning activations from the first token of chunk U_done to the end of this call.
        if cache is not None and cache.h_cond is not None:
            h_all = torch.cat((cache.h_cond, h), dim=1)  # (B, end - U_done·m, d)
        else:
            h_all = h
        if h_all.shape[1] != end - U_done * m:
            raise RuntimeError("KVCache out of step with the sequence")
        enc, mask = (cache.enc, cache.enc_mask) if cache is not None else (None, None)
        if neighbours is not None and U > U_done:
            _, _, k, r = neighbours.shape
            nb = neighbours[:, U_done:U]  # (B, U_new, k, r)
            if lengths is None:
                real = torch.ones(nb.shape, dtype=torch.bool, device=nb.device)
            else:  # (B, U_new, k, r)
                real = torch.arange(r, device=nb.device) < lengths[:, U_done:U, :, None]
            h_chunks = h_all[:, : (U - U_done) * m].reshape(B, U - U_done, m, d)  # (B, U_new, m, d)
            e_new = self.encoder(self.tok_emb(nb), real, h_chunks)  # (B, U_new, k, r, d')
            enc = e_new if enc is None else torch.cat((enc, e_new), dim=1)  # (B, U, k, r, d')
            mask = real if mask is None else torch.cat((mask, real), dim=1)  # (B, U, k, r)
            h_all = h_all[:, (U - U_done) * m :]  # (B, end - U·m, d): the incomplete chunk
        if cache is not None:
            cache.h_cond, cache.enc, cache.enc_mask = h_all, enc, mask
        if enc is not None and enc.shape[1] < U:
            # Chunks completed without neighbours (cache mode, neighbours=None): attend nothing.
            missing = U - enc.shape[1]
            enc = torch.cat((enc, enc.new_zeros(B, missing, *enc.shape[2:])), dim=1)
            mask = torch.cat((mask, mask.new_zeros(B, missing, *mask.shape[2:])), dim=1)
        return enc, mask
