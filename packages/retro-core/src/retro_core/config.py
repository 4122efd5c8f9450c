"""Configuration of the RETRO model (Borgeaud et al., 2021, arXiv:2112.04426, section 2 and appendix B).

Symbols follow the paper: n sequence length, m chunk size, l = n/m chunks, k neighbours,
r = 2m neighbour tokens (chunk N + continuation F), d width, L layers, P the set of layers with
chunked cross-attention (CCA).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["RetroConfig", "default_cca_layers"]


def default_cca_layers(n_layers: int) -> tuple[int, ...]:
    """The default set P of decoder layers (1-indexed) that carry chunked cross-attention.

    Paper rule (section 4, appendix C): every 3rd layer starting from layer 6, i.e. 6, 9, 12, ...
    for models with ``n_layers >= 6`` (a 12-layer model gets (6, 9, 12)).

    Shallower models (``n_layers < 6``, used in tests and small experiments) keep the paper's
    spacing but anchor it at the top: every 3rd layer counted back from the last layer, which is
    always included. So 1 -> (1,), 2 -> (2,), 3 -> (3,), 4 -> (1, 4), 5 -> (2, 5). The last layer is
    the one the paper's rule also always reaches when ``n_layers`` is a multiple of 3.
    """
    if n_layers < 1:
        raise ValueError(f"RetroConfig.n_layers: expected >= 1, got {n_layers}")
    if n_layers >= 6:
        return tuple(range(6, n_layers + 1, 3))
    return tuple(sorted(range(n_layers, 0, -3)))


@dataclass(frozen=True)
class RetroConfig:
    """Hyper-parameters of :class:`retro_core.model.Retro` (immutable, JSON-serialisable).

    ``None`` fields are resolved in ``__post_init__`` (so a loaded config always has concrete values).
    """

    vocab_size: int  # |V|, size of the token vocabulary
    d_model: int = 512  # d, decoder width
    n_heads: int = 8  # attention heads of the decoder (self-attention and CCA)
    n_layers: int = 12  # L, decoder layers
    d_ff: int | None = None  # hidden width of the decoder FFW; None -> 4 d
    chunk_size: int = 64  # m, tokens per chunk
    num_neighbours: int = 2  # k, neighbours per chunk used in training (the model accepts any k)
    neighbour_len: int | None = (
        None  # r, tokens per neighbour (chunk N + continuation F); None -> 2m
    )
    enc_layers: int = 2  # L_enc, layers of the bidirectional neighbour encoder
    enc_d_model: int | None = None  # d', encoder width; None -> d
    enc_n_heads: int | None = None  # attention heads of the encoder; None -> n_heads
    enc_d_ff: int | None = None  # hidden width of the encoder FFW; None -> 4 d'
    # RMS-normalise the encoder's input (the neighbours' token embeddings after the d -> d'
    # projection). A retro-fitted base's frozen embeddings are small (SmolLM2: RMS 0.14) next to
    # what the encoder's cross-attention to the decoder adds, which drowns the neighbours' content.
    enc_input_norm: bool = False
    # RETRO-fitting only (``retro_core.retrofit``): each CCA after layer p starts as a trainable
    # copy of the base's own self-attention of layer p + 1, and the neighbours are encoded by the
    # frozen base itself (its layers 1..p, the hidden states a neighbour would have in context),
    # so the base's induction heads read the neighbours from the first step.
    cca_from_base: bool = False
    # With cca_from_base: per CCA layer, the heads whose output gate starts open (others start 0).
    cca_heads: tuple[tuple[int, ...], ...] | None = None
    cca_layers: tuple[int, ...] | None = (
        None  # P, 1-indexed CCA layers; None -> default rule; () = baseline
    )
    dropout: float = 0.0  # dropout on residual branches and attention weights
    max_seq_len: int = 2048  # n, the longest sequence (incl. generated tokens) the model accepts
    pad_id: int = 0  # token id used to pad neighbours (and sequences in the dataset format)
    tokenizer_id: str | None = None  # identity of the LM tokenizer (checked against a retriever)
    rope_base: float = 10000.0  # base of the rotary position frequencies (relative positions)
    norm_eps: float = 1e-5  # epsilon of the RMSNorm layers

    # Over 80 lines: one flat check per field, in field order; split up it would read worse.
    def __post_init__(self) -> None:
        def err(field: str, expected: str, got: Any) -> ValueError:
            return ValueError(f"RetroConfig.{field}: expected {expected}, got {got!r}")

        def positive_int(field: str) -> None:
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise err(field, "a positive int", v)

        # Resolve defaults (object.__setattr__ because the dataclass is frozen).
        set_ = object.__setattr__
        if self.d_ff is None:
            set_(self, "d_ff", 4 * self.d_model)
        if self.neighbour_len is None:
            set_(self, "neighbour_len", 2 * self.chunk_size)
        if self.enc_d_model is None:
            set_(self, "enc_d_model", self.d_model)
        if self.enc_n_heads is None:
            set_(self, "enc_n_heads", self.n_heads)
        if self.enc_d_ff is None:
            set_(self, "enc_d_ff", 4 * self.enc_d_model)
        for field in ("vocab_size", "d_model", "n_heads", "n_layers", "chunk_size"):
            positive_int(field)
        if self.cca_layers is None:
            set_(self, "cca_layers", default_cca_layers(self.n_layers))
        elif isinstance(self.cca_layers, list):
            set_(self, "cca_layers", tuple(self.cca_layers))

        for field in (
            "d_ff",
            "num_neighbours",
            "neighbour_len",
            "enc_d_model",
            "enc_n_heads",
            "enc_d_ff",
            "max_seq_len",
        ):
            positive_int(field)
        if self.enc_layers < 0 or isinstance(self.enc_layers, bool):
            raise err("enc_layers", "an int >= 0", self.enc_layers)
        if self.d_model % self.n_heads:
            raise err("d_model", f"a multiple of n_heads={self.n_heads}", self.d_model)
        if (self.d_model // self.n_heads) % 2:
            raise err(
                "d_model", "d_model / n_heads even (rotary embeddings rotate pairs)", self.d_model
            )
        if self.enc_d_model % self.enc_n_heads:
            raise err(
                "enc_d_model", f"a multiple of enc_n_heads={self.enc_n_heads}", self.enc_d_model
            )
        if (self.enc_d_model // self.enc_n_heads) % 2:
            raise err("enc_d_model", "enc_d_model / enc_n_heads even", self.enc_d_model)
        if self.neighbour_len < self.chunk_size:
            raise err("neighbour_len", f">= chunk_size={self.chunk_size}", self.neighbour_len)
        if self.cca_heads is not None:
            heads = tuple(tuple(h) for h in self.cca_heads)
            set_(self, "cca_heads", heads)
            n_cca = len(self.cca_layers)
            if len(heads) != n_cca or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.n_heads
                for hs in heads
                for i in hs
            ):
                raise err(
                    "cca_heads",
                    f"{n_cca} tuples (one per CCA layer) of head numbers in 0..{self.n_heads - 1}",
                    self.cca_heads,
                )
        cca = self.cca_layers
        if not isinstance(cca, tuple) or not all(
            isinstance(p, int) and not isinstance(p, bool) for p in cca
        ):
            raise err("cca_layers", "a tuple of 1-indexed layer numbers", cca)
        if any(p < 1 or p > self.n_layers for p in cca):
            raise err("cca_layers", f"layer numbers within 1..n_layers={self.n_layers}", cca)
        if list(cca) != sorted(set(cca)):
            raise err("cca_layers", "sorted, unique layer numbers", cca)
        if not (0.0 <= float(self.dropout) < 1.0):
            raise err("dropout", "a float in [0, 1)", self.dropout)
        if not (math.isfinite(self.rope_base) and self.rope_base > 1.0):
            raise err("rope_base", "a finite float > 1", self.rope_base)
        if not (self.norm_eps > 0):
            raise err("norm_eps", "a float > 0", self.norm_eps)
        if not isinstance(self.pad_id, int) or not (0 <= self.pad_id < self.vocab_size):
            raise err("pad_id", f"an int in [0, vocab_size={self.vocab_size})", self.pad_id)
        if self.tokenizer_id is not None and not isinstance(self.tokenizer_id, str):
            raise err("tokenizer_id", "a str or None", self.tokenizer_id)

    @property
    def is_retro(self) -> bool:
        """True when the model has at least one CCA layer (False: the decoder-only baseline)."""
        return len(self.cca_layers) > 0

    @property
    def cond_layer(self) -> int | None:
        """The decoder layer whose activations condition the encoder: min(P) (paper Algorithm 1:
        the activations after that layer's self-attention, right before its CCA)."""
        return self.cca_layers[0] if self.cca_layers else None

    def baseline(self) -> RetroConfig:
        """The matched decoder-only baseline: the same config with ``cca_layers=()``."""
        d = self.to_dict()
        d["cca_layers"] = []
        return RetroConfig.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of every field (tuples become lists)."""
        d = asdict(self)
        d["cca_layers"] = list(self.cca_layers)
        if self.cca_heads is not None:
            d["cca_heads"] = [list(h) for h in self.cca_heads]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RetroConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise a ValueError naming them."""
        if not isinstance(d, dict):
            raise ValueError(f"RetroConfig.from_dict: expected a dict, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"RetroConfig: unknown fields {unknown}; expected a subset of {sorted(names)}"
            )
        if "vocab_size" not in d:
            raise ValueError("RetroConfig: missing required field 'vocab_size'")
        d = dict(d)
        if d.get("cca_layers") is not None:
            d["cca_layers"] = tuple(d["cca_layers"])
        return cls(**d)
