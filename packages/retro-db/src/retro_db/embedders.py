"""Choosing the chunk embedder from a spec string, and a torch-free hashing embedder.

Specs (what ``--embedder`` takes and the manifest records):

- ``None`` / ``"minilm"``: :class:`retro_db.embed.ChunkEmbedder` with all-MiniLM-L6-v2 (needs the
  ``[embed]`` extra; imported lazily so ``import retro_db`` never imports torch);
- ``"hash:D"``: :class:`HashingEmbedder` of dimension D, no model at all: feature-hashed word
  unigrams and bigrams. It is a deterministic stand-in for tests, smoke runs and machines without
  torch, not a substitute for BERT keys;
- anything else: a Hugging Face encoder directory for ``ChunkEmbedder``.

Any object with ``embed_texts(texts, batch_size=..., progress=...) -> float32 [q, d]``, ``dim`` and
``id`` can be passed instead of a spec.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["Embedder", "HashingEmbedder", "embedder_options", "embedder_spec", "load_embedder"]


@runtime_checkable
class Embedder(Protocol):
    """What the database needs from a chunk embedder (``retro_db.embed.ChunkEmbedder`` is one)."""

    dim: int
    id: str

    def embed_texts(
        self, texts: list[str], batch_size: int = 64, progress: bool = False
    ) -> np.ndarray: ...


_WORD = re.compile(r"\w+")


class HashingEmbedder:
    """Feature-hashing bag of lowercase words and word bigrams, L2-normalised, float32 [q, dim].

    Deterministic across runs and machines (blake2b hashes, no randomness).
    """

    def __init__(self, dim: int = 64) -> None:
        if dim < 1:
            raise ValueError(f"HashingEmbedder: dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.id = f"hashing-{self.dim}-v1"
        self.spec = f"hash:{self.dim}"

    def _bucket(self, feature: str) -> tuple[int, float]:
        h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
        return h % self.dim, 1.0 if (h >> 63) & 1 else -1.0

    def embed_texts(
        self, texts: list[str], batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        """Keys float32 [q, dim] of ``texts`` (``batch_size``/``progress`` accepted, unused)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            words = _WORD.findall(text.lower())
            feats = words + [a + " " + b for a, b in zip(words, words[1:], strict=False)]
            for f in feats:
                j, s = self._bucket(f)
                out[i, j] += s
            norm = float(np.linalg.norm(out[i]))
            if norm > 0:
                out[i] /= norm
        return out


def load_embedder(spec: str | None = None, **kwargs: Any) -> Embedder:
    """Build the embedder a spec names (see the module docstring); kwargs go to ChunkEmbedder."""
    if spec is not None and spec.startswith("hash:"):
        try:
            dim = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"embedder spec {spec!r}: expected 'hash:<dim>'") from None
        return HashingEmbedder(dim)
    from .embed import ChunkEmbedder  # lazy: the only module importing torch

    model_dir = None if spec in (None, "minilm") else spec
    return ChunkEmbedder(model_dir, **kwargs)


def embedder_options(embedder: Any) -> dict[str, Any]:
    """Constructor options that change an embedder's keys (recorded so they are re-created alike).

    For ``ChunkEmbedder``: ``max_length``, ``normalize`` and the resolved ``precision`` (its
    ``"auto"`` picks bf16 or fp32 by CPU, so the manifest pins the one the keys were made with).
    """
    out: dict[str, Any] = {}
    for name in ("max_length", "normalize", "precision"):
        value = getattr(embedder, name, None)
        if isinstance(value, (bool, int, str)):
            out[name] = value
    return out if type(embedder).__name__ == "ChunkEmbedder" else {}


def embedder_spec(embedder: Any, given: str | None = None) -> str | None:
    """The spec to record for ``embedder`` so that it can be re-created lazily at query time."""
    if given is not None:
        return given
    spec = getattr(embedder, "spec", None)
    if spec is not None:
        return str(spec)
    model_dir = getattr(embedder, "model_dir", None)
    if model_dir is None:
        return None
    if type(embedder).__name__ == "ChunkEmbedder":
        from pathlib import Path

        from .embed import default_model_dir  # torch is loaded already if this is one

        if Path(model_dir).resolve() == Path(default_model_dir()).resolve():
            return None  # the packaged default: re-created on any machine
    return str(model_dir)
