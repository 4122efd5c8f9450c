"""RETRO-fitting (paper section 4.2 and Table 3): add retrieval to a frozen pretrained causal LM.

The pretrained Hugging Face model (GPT-2 or Llama family) is kept intact and frozen. New modules
are attached around it with forward hooks on its decoder layers:

- a :class:`~retro_core.model.ChunkedCrossAttention` (pre-normed, residual) right after each
  decoder layer p in P, so the block reads ``H <- H + CCA(norm(H), E)`` on the layer's output;
- a neighbour :class:`~retro_core.model.Encoder`, fed by the base model's frozen token
  embeddings and conditioned on the base model's hidden states at the output of layer min(P),
  i.e. on the residual stream entering the first CCA. ``Retro`` also conditions on the stream
  entering its first CCA, but there that point lies inside block min(P) (after its self-attention,
  before its FFW); a Hugging Face decoder layer runs attention and MLP as one module, so the only
  place a hook can reach, and where the CCA sits, is after the whole layer (its MLP included).

Only the new parameters train (``requires_grad`` is switched off on the base). Every CCA output
projection starts at zero, so before training the retro-fitted model's logits equal the base
model's exactly; with ``neighbours=None`` (RETRO[OFF]) the hooks do nothing at all, so the logits
are the base model's whatever the new weights are. Calling the base model directly (including
``hf_model.generate``) is unaffected: the hooks act only inside :meth:`RetrofittedLM.forward`
(which is therefore not re-entrant: one forward at a time per model).

The default P is :func:`~retro_core.config.default_cca_layers` of the base depth (the paper's
every 3rd layer from layer 6; anchored at the last layer for models shallower than 6 layers).

Saving stores only the new weights (``retrofit.safetensors``) and ``retrofit.json``: the
:class:`~retro_core.config.RetroConfig` of the new parts plus a reference to the base model (its
directory, GGUF file name, and a sha256 over its weight files). :func:`load_retrofitted` reloads
the base from that reference, refuses it when the hash differs, and rebuilds the whole.

The retrieval database must be built with the base model's tokenizer: the model records a
tokenizer id computed with the rule of ``retro_db.tokenizer`` (directory name + the first 12 hex
digits of a sha256 over the tokenizer files) and refuses other retrievers through
:func:`~retro_core.retrieval.check_retriever`.

Symbols: B batch, n sequence length (T in one call), m chunk size, l = ceil(n/m) chunks,
k neighbours, r = 2m tokens per neighbour, d base width, d' encoder width, |V| vocabulary.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from .atomic import sha256_file
from .checkpoint import check_integrity, read_versioned_config, write_weights_and_meta
from .config import RetroConfig
from .induction import BaseAttentionCCA, induction_heads, induction_scores
from .interface import KVCache, RetrievalLMMixin
from .model import ChunkedCrossAttention, Encoder, Rotary, init_weights, keep_positions

__all__ = [
    "RETROFIT_FORMAT",
    "RetrofitCache",
    "RetrofitError",
    "RetrofittedLM",
    "base_weight_files",
    "base_weights_sha256",
    "hf_tokenizer_id",
    "is_retrofit_checkpoint",
    "load_base_model",
    "load_new_weights",
    "load_retrofitted",
    "read_retrofit_config",
    "retrofit",
    "save_retrofitted",
]

logger = logging.getLogger(__name__)

RETROFIT_FORMAT = "retro-retrofit"
RETROFIT_VERSION = 1
CONFIG_FILE = "retrofit.json"
WEIGHTS_FILE = "retrofit.safetensors"

# Where the decoder layers (an nn.ModuleList) live in the supported causal-LM classes.
_LAYER_PATHS = ("model.layers", "transformer.h")  # Llama family, GPT-2 family


class RetrofitError(ValueError):
    """A base model or a retro-fit checkpoint cannot be used (the message names what and why)."""


# ----------------------------------------------------------------------------------------------
# identities of the base model and its tokenizer


def _combined_sha256(files: list[Path]) -> str:
    """sha256 over (name, sha256 of bytes) of each file, sorted by name (retro_db's rule)."""
    h = hashlib.sha256()
    for p in sorted(files, key=lambda p: p.name):
        h.update(p.name.encode())
        h.update(b"\0")
        h.update(bytes.fromhex(sha256_file(p)))
    return h.hexdigest()


def base_weight_files(path: str | os.PathLike[str], gguf_file: str | None = None) -> list[Path]:
    """The weight files of a Hugging Face model directory (or its one GGUF file).

    ``*.safetensors``, else ``*.bin``, else ``*.gguf``; with ``gguf_file`` only that file.
    """
    d = Path(path)
    if gguf_file is not None:
        f = d / gguf_file
        if not f.is_file():
            raise RetrofitError(f"{f}: GGUF file not found")
        return [f]
    if not d.is_dir():
        raise RetrofitError(f"{d}: not a model directory")
    for pattern in ("*.safetensors", "*.bin", "*.gguf"):
        files = sorted(d.glob(pattern))
        if files:
            return files
    raise RetrofitError(f"{d}: no weight files (*.safetensors, *.bin or *.gguf)")


def base_weights_sha256(path: str | os.PathLike[str], gguf_file: str | None = None) -> str:
    """sha256 identifying the base model's weights: over the names and bytes of its weight files."""
    return _combined_sha256(base_weight_files(path, gguf_file))


def hf_tokenizer_id(directory: str | os.PathLike[str]) -> str | None:
    """The tokenizer id that ``retro_db.tokenizer.load_tokenizer(directory).id`` reports.

    Same rule, without importing retro_db: ``f"{dir name}-{sha256[:12]}"`` where the sha256 runs
    over ``tokenizer_config.json`` and ``special_tokens_map.json`` (when present) plus
    ``tokenizer.json`` (or ``vocab.json`` + ``merges.txt``). None when the directory holds no
    tokenizer files (e.g. a GGUF-only model: save its tokenizer with ``save_pretrained``).
    """
    d = Path(directory)
    if not d.is_dir():
        return None
    used = [
        d / n for n in ("tokenizer_config.json", "special_tokens_map.json") if (d / n).is_file()
    ]
    if (d / "tokenizer.json").is_file():
        used.append(d / "tokenizer.json")
    elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        used += [d / "vocab.json", d / "merges.txt"]
    else:
        return None
    return f"{d.name}-{_combined_sha256(used)[:12]}"


def load_base_model(
    path: str | os.PathLike[str],
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` of a local directory (GGUF files are dequantised).

    Needs the ``[hf]`` extra (transformers), and the ``gguf`` package for ``gguf_file``.
    """
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RetrofitError("RETRO-fitting needs transformers: pip install 'retro-core[hf]'") from e
    d = Path(path)
    if not d.is_dir():
        raise RetrofitError(f"{d}: not a Hugging Face model directory")
    kw: dict[str, Any] = {"dtype": dtype}
    if gguf_file is not None:
        kw["gguf_file"] = gguf_file
    model = AutoModelForCausalLM.from_pretrained(str(d), **kw)
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------
# the model


def _layer_owner(hf_model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(module holding the decoder layer list, its attribute name, the list)."""
    n = getattr(hf_model.config, "num_hidden_layers", None)
    for path in _LAYER_PATHS:
        *parents, attr = path.split(".")
        owner: Any = hf_model
        for part in parents:
            owner = getattr(owner, part, None)
        obj = getattr(owner, attr, None)
        if isinstance(obj, nn.ModuleList) and len(obj) == n:
            return owner, attr, obj
    raise RetrofitError(
        f"{type(hf_model).__name__}: no decoder layer list found at {list(_LAYER_PATHS)} "
        f"(supported: GPT-2 and Llama-family causal LMs)"
    )


def _decoder_layers(hf_model: nn.Module) -> nn.ModuleList:
    return _layer_owner(hf_model)[2]


@contextmanager
def _only_layers(hf_model: nn.Module, lo: int, hi: int) -> Iterator[None]:
    """Run the base model with its decoder layers lo .. hi-1 (0-indexed) only, then restore."""
    owner, attr, layers = _layer_owner(hf_model)
    setattr(owner, attr, nn.ModuleList(list(layers)[lo:hi]))
    try:
        yield
    finally:
        setattr(owner, attr, layers)


@dataclass
class RetrofitCache(KVCache):
    """Incremental-decoding state of a :class:`RetrofittedLM` (see :meth:`RetrofittedLM.new_cache`).

    ``past_key_values`` is the base model's own cache (a transformers ``Cache``); the inherited
    ``length``, ``h_cond``, ``enc`` and ``enc_mask`` hold the encoded neighbours exactly as in
    :class:`~retro_core.model.KVCache` (``keys``/``values`` stay unused).
    """

    past_key_values: Any = None


@dataclass
class _Call:
    """What the hooks need during one :meth:`RetrofittedLM.forward`."""

    start: int
    neighbours: Tensor | None
    lengths: Tensor | None
    cache: RetrofitCache | None
    enc: Tensor | None = None
    enc_mask: Tensor | None = None
    base_enc: dict[int, Tensor] | None = None  # cca_from_base: p -> (B, U, k, r, d)


class RetrofitCCA(nn.Module):
    """``H <- H + CCA(RMSNorm(H), E)`` after one decoder layer of the base model."""

    def __init__(self, cfg: RetroConfig):
        super().__init__()
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.cca = ChunkedCrossAttention(cfg)


class RetrofittedLM(RetrievalLMMixin, nn.Module):
    """A frozen Hugging Face causal LM with chunked cross-attention and a neighbour encoder.

    Build it with :func:`retrofit`. Like :class:`~retro_core.model.Retro` it is a
    :class:`~retro_core.interface.RetrievalLM` (``config``, ``forward(tokens, neighbours,
    neighbour_lengths, cache=...)``, ``new_cache()``, ``geometry``, ``check_retriever``), and it
    shares Retro's input checks, neighbour encoding and CCA keys/values through
    :class:`~retro_core.interface.RetrievalLMMixin`; so :func:`retro_core.train.train` trains it
    and :func:`retro_core.generate.generate` decodes with it (with the base model's KV cache).

    Attributes:
        base: the Hugging Face model (frozen, always in eval mode; its state is never changed).
        config: RetroConfig of the new parts (d_model, n_heads, n_layers mirror the base).
        cca_layers: ModuleDict ``{str(p): RetrofitCCA}`` for p in ``config.cca_layers``.
        encoder: the neighbour :class:`~retro_core.model.Encoder`.
        base_ref: {"path", "gguf_file", "sha256", "model_type"} or None (then it cannot be saved).
    """

    def __init__(self, base: nn.Module, config: RetroConfig, base_ref: dict[str, Any] | None):
        super().__init__()
        self.base = base
        self.config = config
        self.base_ref = base_ref
        base.requires_grad_(False)
        base.eval()
        layers = _decoder_layers(base)
        if config.n_layers != len(layers) or config.d_model != base.config.hidden_size:
            raise RetrofitError(
                f"RetroConfig (n_layers={config.n_layers}, d_model={config.d_model}) does not fit "
                f"the base model ({len(layers)} layers, hidden_size={base.config.hidden_size})"
            )
        hs = config.d_model // config.n_heads
        self.rope = Rotary(hs, config.rope_base, max(config.neighbour_len, 2 * config.chunk_size))
        p0 = next(base.parameters())
        self.encoder: Encoder | None = None
        if config.cca_from_base:  # CCA = copies of the base's attention; the base encodes
            self._check_prefix_support()
            # a plain list: the base's rotary table is not a submodule of the new weights
            self._rotary = [_layer_owner(base)[0].rotary_emb]
            if max(config.cca_layers) >= config.n_layers:
                raise RetrofitError(
                    f"cca_from_base: CCA after layer p copies layer p + 1; the base has "
                    f"{config.n_layers} layers, got cca_layers={list(config.cca_layers)}"
                )
            heads = config.cca_heads or tuple(
                tuple(range(config.n_heads)) for _ in config.cca_layers
            )
            self.cca_layers = nn.ModuleDict(
                {
                    str(p): BaseAttentionCCA(layers[p], config.chunk_size, hh, config.n_heads)
                    for p, hh in zip(config.cca_layers, heads, strict=False)
                }
            )
        else:
            self.cca_layers = nn.ModuleDict(
                {str(p): RetrofitCCA(config) for p in config.cca_layers}
            )
            self.encoder = Encoder(config)
            self.cca_layers.apply(init_weights)
            self.encoder.apply(init_weights)
            with torch.no_grad():  # CCA starts as the identity: logits equal the base model's
                for layer in self.cca_layers.values():
                    layer.cca.attn.out_proj.weight.zero_()
            self.encoder.to(device=p0.device, dtype=p0.dtype)
        self.cca_layers.to(device=p0.device, dtype=p0.dtype)
        self.rope.to(device=p0.device)
        self._call: _Call | None = None
        # transformers >= 5.x names the KV cache argument `cache` (`past_key_values` before).
        params = inspect.signature(base.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._keeps_logits = "logits_to_keep" in params
        self._hooks = [
            layers[p - 1].register_forward_hook(partial(self._after_layer, p))
            for p in config.cca_layers
        ]

    # -- structure -------------------------------------------------------------------------------

    @property
    def tok_emb(self) -> nn.Module:
        """The base model's (frozen) token embedding, shared with the encoder."""
        return self.base.get_input_embeddings()

    def train(self, mode: bool = True) -> RetrofittedLM:
        """Switch the new modules' mode; the frozen base stays in eval mode (no dropout)."""
        super().train(mode)
        self.base.eval()
        return self

    def new_state_dict(self) -> dict[str, Tensor]:
        """The new weights only (``cca_layers.*``, ``encoder.*``): what a checkpoint stores."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base.")}

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """All parameters, base included (the tied embedding counted once, or not at all)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if exclude_embeddings else n

    def trainable_parameters(self) -> dict[str, Any]:
        """Summary of the trainable (new) parameters: counts, share of the total, per module."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = self.num_parameters()
        return {
            "trainable": trainable,
            "total": total,
            "base": total - trainable,
            "share": trainable / total,
            "encoder": sum(p.numel() for p in self.encoder.parameters()) if self.encoder else 0,
            "cca": sum(p.numel() for p in self.cca_layers.parameters()),
            "cca_layers": list(self.config.cca_layers),
        }

    def remove_hooks(self) -> None:
        """Detach from the base model (it is then exactly the untouched model again)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def new_cache(self) -> RetrofitCache:
        """An empty cache for incremental decoding with ``forward(..., cache=cache)``."""
        return RetrofitCache(keys=[], values=[])

    # -- the frozen prefix -----------------------------------------------------------------------

    @property
    def prefix_depth(self) -> int:
        """Base layers below the first retrieval layer: min(P) - 1 (1-indexed P).

        Their output depends neither on the new weights nor on the neighbours.
        """
        return min(self.config.cond_layer, *self.config.cca_layers) - 1

    def _check_prefix_support(self) -> None:
        owner, attr, _ = _layer_owner(self.base)
        if attr != "layers":  # GPT-2 adds its position embedding to inputs_embeds
            raise RetrofitError(
                f"{type(self.base).__name__}: a frozen prefix needs a Llama-family base model"
            )

    @torch.no_grad()
    def frozen_prefix(self, tokens: Tensor) -> Tensor:
        """The base model's hidden states entering layer min(P): H (B, n, d), no gradient.

        A training loop that sees the same sequences in several epochs can compute them once (the
        base below the first retrieval layer is frozen and never reads neighbours) and pass them to
        :meth:`forward` as ``prefix=H``: the logits are the same, and each step then runs only the
        layers from min(P) up. Llama-family bases only.

        Args:
            tokens: int (B, n) token ids at positions 0 .. n-1.
        """
        self._check_prefix_support()
        depth = self.prefix_depth
        emb = self.tok_emb(tokens)  # (B, n, d)
        if depth == 0:
            return emb
        owner = _layer_owner(self.base)[0]
        layers = _decoder_layers(self.base)
        seen: list[Tensor] = []
        hook = layers[depth - 1].register_forward_hook(
            lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out)
        )
        try:
            with _only_layers(self.base, 0, depth):
                owner(inputs_embeds=emb, use_cache=False)
        finally:
            hook.remove()
        return seen[-1]

    # -- the base as the neighbour encoder (config.cca_from_base) ---------------------------------

    def _base_rope(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """The base's own rotary table at positions pos (T,): cos, sin (T, hs)."""
        cos, sin = self._rotary[0](self.tok_emb.weight, pos[None])
        return cos[0], sin[0]

    @torch.no_grad()
    def encode_neighbours(
        self, neighbours: Tensor, lengths: Tensor | None = None
    ) -> tuple[dict[int, Tensor], Tensor]:
        """The frozen base's hidden states of each neighbour leaving every layer p in P.

        Only with ``config.cca_from_base``: each neighbour (r tokens) runs through the base's
        layers 1 .. max(P) on its own, from position 0. They depend on no trainable weight, so a
        training loop can compute them once per sequence and pass them as ``forward(encoded=)``.

        Args:
            neighbours: int (B, U, k, r); lengths: int (B, U, k) real tokens (None: all real).

        Returns:
            ({p: (B, U, k, r, d)}, mask bool (B, U, k, r), True on real tokens).
        """
        if not self.config.cca_from_base:
            raise RetrofitError("encode_neighbours: only for a model built with cca_from_base")
        B, U, k, r = neighbours.shape
        if lengths is None:
            real = torch.ones(neighbours.shape, dtype=torch.bool, device=neighbours.device)
        else:
            real = torch.arange(r, device=neighbours.device) < lengths[..., None]
        P = self.config.cca_layers
        owner, _, layers = _layer_owner(self.base)
        seen: dict[int, Tensor] = {}

        def keep(p: int, _m: nn.Module, _a: Any, out: Any) -> None:
            seen[p] = out[0] if isinstance(out, tuple) else out

        hooks = [layers[p - 1].register_forward_hook(partial(keep, p)) for p in P]
        saved, self._call = self._call, None  # the CCA hooks stay idle in this inner run
        try:
            with _only_layers(self.base, 0, max(P)):
                owner(input_ids=neighbours.reshape(B * U * k, r), use_cache=False)
        finally:
            self._call = saved
            for hook in hooks:
                hook.remove()
        return {p: seen[p].reshape(B, U, k, r, -1) for p in P}, real

    def _base_encoding(
        self,
        end: int,
        neighbours: Tensor | None,
        lengths: Tensor | None,
        cache: RetrofitCache | None,
        encoded: tuple[dict[int, Tensor], Tensor] | None,
    ) -> tuple[dict[int, Tensor] | None, Tensor | None]:
        """({p: (B, U, k, r, d)}, mask (B, U, k, r)) of the U = end // m completed chunks."""
        U = end // self.config.chunk_size
        P = self.config.cca_layers
        if encoded is not None:
            if cache is not None or neighbours is None:
                raise ValueError("encoded: needs neighbours and no cache")
            dtype = self.tok_emb.weight.dtype
            return {p: e[:, :U].to(dtype) for p, e in encoded[0].items()}, encoded[1][:, :U]
        if cache is None:
            if neighbours is None or U == 0:
                return None, None
            return self.encode_neighbours(
                neighbours[:, :U], None if lengths is None else lengths[:, :U]
            )
        done = cache.num_encoded
        if neighbours is not None and U > done:
            new, mask = self.encode_neighbours(
                neighbours[:, done:U], None if lengths is None else lengths[:, done:U]
            )
            stacked = torch.cat([new[p] for p in P], dim=-1)  # (B, U_new, k, r, |P|·d)
            cache.enc = stacked if cache.enc is None else torch.cat((cache.enc, stacked), 1)
            cache.enc_mask = (
                mask if cache.enc_mask is None else torch.cat((cache.enc_mask, mask), 1)
            )
        if cache.enc is None:
            return None, None
        enc, mask = cache.enc, cache.enc_mask
        if enc.shape[1] < U:  # chunks completed without neighbours attend nothing
            missing = U - enc.shape[1]
            enc = torch.cat((enc, enc.new_zeros(enc.shape[0], missing, *enc.shape[2:])), dim=1)
            mask = torch.cat((mask, mask.new_zeros(mask.shape[0], missing, *mask.shape[2:])), 1)
        return dict(zip(P, enc.split(self.config.d_model, dim=-1), strict=True)), mask

    # -- forward ---------------------------------------------------------------------------------

    def forward(
        self,
        tokens: Tensor,
        neighbours: Tensor | None = None,
        neighbour_lengths: Tensor | None = None,
        *,
        cache: RetrofitCache | None = None,
        logits_to_keep: int | Tensor = 0,
        prefix: Tensor | None = None,
        encoded: tuple[dict[int, Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Next-token logits of the retro-fitted model (same contract as ``Retro.forward``).

        Args:
            tokens: int (B, T) token ids at absolute positions ``cache.length .. +T-1`` (0 .. n-1
                without a cache).
            neighbours: int (B, l, k, r) neighbours of chunk u at index u, or None (RETRO[OFF]:
                exactly the base model's logits).
            neighbour_lengths: int (B, l, k) real tokens per neighbour row, or None (all real).
            cache: a :class:`RetrofitCache`, updated in place (the base model's past_key_values
                plus the encoded neighbours of completed chunks).
            logits_to_keep: 0 = all positions, N > 0 = the last N, a 1-D tensor = those
                positions (passed to the base model when it accepts ``logits_to_keep``).
            prefix: (B, T, d) the :meth:`frozen_prefix` of ``tokens`` (no cache): only the layers
                from min(P) up run.
            encoded: with ``config.cca_from_base``, the :meth:`encode_neighbours` of
                ``neighbours`` (no cache), computed once and reused (they depend on no new weight).

        Returns:
            logits (B, T, |V|).
        """
        start = cache.length if cache is not None else 0
        end = start + tokens.shape[1]
        self._check_inputs(tokens, neighbours, neighbour_lengths, end)
        inputs: dict[str, Tensor] = {"input_ids": tokens}
        only: Any = nullcontext()
        if prefix is not None:
            self._check_prefix_support()
            if cache is not None or prefix.shape != (*tokens.shape, self.config.d_model):
                raise ValueError(
                    f"prefix: expected shape {(*tokens.shape, self.config.d_model)} and no cache, "
                    f"got {tuple(prefix.shape)}"
                )
            inputs = {"inputs_embeds": prefix.to(self.tok_emb.weight.dtype)}
            only = _only_layers(self.base, self.prefix_depth, self.config.n_layers)
        call = _Call(start, neighbours, neighbour_lengths, cache)
        if self.config.cca_from_base:
            call.base_enc, call.enc_mask = self._base_encoding(
                end, neighbours, neighbour_lengths, cache, encoded
            )
        self._call = call
        past = None if cache is None else cache.past_key_values
        kwargs: dict[str, Any] = {self._cache_kwarg: past}
        if self._keeps_logits:
            kwargs["logits_to_keep"] = logits_to_keep
        try:
            with only:
                out = self.base(**inputs, use_cache=cache is not None, return_dict=True, **kwargs)
        finally:
            self._call = None
        if cache is not None:
            cache.past_key_values = getattr(out, self._cache_kwarg)
            cache.length = end
        if self._keeps_logits:
            return out.logits
        return keep_positions(out.logits, logits_to_keep)

    def _after_layer(self, p: int, module: nn.Module, args: Any, output: Any) -> Any:
        """Forward hook of decoder layer p (1-indexed): encode at min(P), then CCA when p in P."""
        call = self._call
        if call is None:  # the base model called on its own: untouched
            return None
        h = output[0] if isinstance(output, tuple) else output  # (B, T, d)
        if self.config.cca_from_base:
            if call.base_enc is None:
                return None
            cca = self.cca_layers[str(p)]
            kv = cca.kv(call.base_enc[p], self._base_rope)  # (B, U, h, k·r, hs) each
            h = h + cca(h, call.start, call.enc_mask, kv, self._base_rope)
            return (h, *output[1:]) if isinstance(output, tuple) else h
        if p == self.config.cond_layer and (call.neighbours is not None or call.cache is not None):
            # E <- ENCODER(RET(C_u), H) for the chunks completed in this call (cached after)
            call.enc, call.enc_mask = self._encode(
                h, call.start, call.neighbours, call.lengths, call.cache
            )
        if call.enc is None:
            return None
        layer = self.cca_layers[str(p)]
        kv = self._cca_kv(p - 1, layer.cca, call.enc, call.cache)  # (B, U, h, k·r, hs) each
        h = h + layer.cca(layer.norm(h), call.start, call.enc_mask, kv, self.rope)
        return (h, *output[1:]) if isinstance(output, tuple) else h


# ----------------------------------------------------------------------------------------------
# building, saving, loading


def _first_int(v: Any) -> int | None:
    if isinstance(v, list | tuple):
        v = v[0] if v else None
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None


def _layers_from_induction_heads(
    hf_model: nn.Module,
    cca_layers: tuple[int, ...] | list[int] | None,
    cca_heads: tuple[tuple[int, ...], ...] | None,
    induction_threshold: float,
) -> tuple[tuple[int, ...] | list[int], tuple[tuple[int, ...], ...]]:
    """``cca_from_base``: P and the heads whose gates start open, from the base's induction heads.

    Without ``cca_layers``: CCA after layer L-1 for each layer L with a head scoring at least
    ``induction_threshold``; without ``cca_heads``: the heads of each given layer above it.
    """
    if _layer_owner(hf_model)[1] != "layers":
        raise RetrofitError(
            f"cca_from_base: {type(hf_model).__name__} is not a Llama-family model (its "
            f"rotary attention is what the CCA copies)"
        )
    scores = induction_scores(hf_model)  # (L, h)
    if cca_layers is None:
        chosen = induction_heads(scores, threshold=induction_threshold)
        if not chosen:
            raise RetrofitError(
                f"retrofit: no head of the base has an induction score >= "
                f"{induction_threshold} (best {float(scores.max()):.2f}); pass cca_layers="
            )
        cca_layers = tuple(layer - 1 for layer in chosen)
        cca_heads = tuple(chosen.values())
    elif not all(0 < p < len(scores) for p in cca_layers):
        raise RetrofitError(
            f"cca_from_base: CCA after layer p copies layer p + 1; the base has "
            f"{len(scores)} layers, got cca_layers={list(cca_layers)}"
        )
    elif cca_heads is None:
        cca_heads = tuple(
            tuple(int(h) for h in torch.nonzero(scores[p] >= induction_threshold).flatten())
            for p in cca_layers
        )
    logger.info(
        "cca_from_base: CCA after layers %s copies the heads %s of the layers above "
        "(induction scores %s)",
        list(cca_layers),
        [list(h) for h in cca_heads],
        [
            [round(float(scores[p][h]), 2) for h in hh]
            for p, hh in zip(cca_layers, cca_heads, strict=False)
        ],
    )
    return cca_layers, cca_heads


def _base_reference(
    hf_model: nn.Module, base_path: str | os.PathLike[str] | None, gguf_file: str | None
) -> tuple[str | os.PathLike[str] | None, dict[str, Any] | None]:
    """The base model's directory (given, or its ``name_or_path``) and the reference saved to
    ``retrofit.json`` ({"path", "gguf_file", "sha256", "model_type"}), or (None, None)."""
    hc = hf_model.config
    if base_path is None:
        name = getattr(hf_model, "name_or_path", "") or getattr(hc, "_name_or_path", "")
        base_path = name if name and Path(name).is_dir() else None
    if base_path is None:
        logger.warning("retrofit: the base model has no directory: it cannot be saved")
        return None, None
    return base_path, {
        "path": str(Path(base_path).resolve()),
        "gguf_file": gguf_file,
        "sha256": base_weights_sha256(base_path, gguf_file),
        "model_type": getattr(hc, "model_type", None),
    }


def _tokenizer_id(
    tokenizer_id: str | None,
    tokenizer_dir: str | os.PathLike[str] | None,
    base_path: str | os.PathLike[str] | None,
) -> str | None:
    """The tokenizer id the database must have: given, else from ``tokenizer_dir``, else from
    the base model's directory; None (with a warning) when none is found."""
    if tokenizer_id is None and tokenizer_dir is not None:
        tokenizer_id = hf_tokenizer_id(tokenizer_dir)
        if tokenizer_id is None:
            raise RetrofitError(f"{tokenizer_dir}: no tokenizer files (tokenizer.json, ...)")
    if tokenizer_id is None and base_path is not None:
        tokenizer_id = hf_tokenizer_id(base_path)
    if tokenizer_id is None:
        logger.warning(
            "retrofit: no tokenizer id (pass tokenizer_dir=): retrievers are checked by chunk "
            "size only"
        )
    return tokenizer_id


# Over 80 lines only for the documentation of its 21 options; the body is about 50.
def retrofit(
    hf_model: nn.Module | str | os.PathLike[str],
    *,
    cca_layers: tuple[int, ...] | list[int] | None = None,
    k: int = 2,
    chunk_size: int = 64,
    neighbour_len: int | None = None,
    enc_layers: int = 2,
    enc_d_model: int | None = None,
    enc_n_heads: int | None = None,
    enc_input_norm: bool = False,
    cca_from_base: bool = False,
    induction_threshold: float = 0.4,
    cca_heads: tuple[tuple[int, ...], ...] | None = None,
    train_copies: bool = True,
    dropout: float = 0.0,
    pad_id: int | None = None,
    tokenizer_id: str | None = None,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    base_path: str | os.PathLike[str] | None = None,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
) -> RetrofittedLM:
    """RETRO-fit a pretrained Hugging Face causal LM (GPT-2 or Llama family).

    Args:
        hf_model: the model (kept intact and frozen) or a local model directory to load.
        cca_layers: P, 1-indexed base layers followed by CCA; None -> ``default_cca_layers``
            (6, 9, 12, ... ; for fewer than 6 layers every 3rd counted back from the last).
        k: neighbours per chunk used in training (the model accepts any k).
        chunk_size: m, tokens per chunk; must equal the database's.
        neighbour_len: r, tokens per neighbour; None -> 2m.
        enc_layers, enc_d_model, enc_n_heads: the new encoder (width d' defaults to the base's d;
            heads default to the base's, or to d' / head size when d' differs from d).
        enc_input_norm: RMS-normalise the encoder's input (``RetroConfig.enc_input_norm``).
        cca_from_base: each CCA starts as a copy of the base's self-attention in the layer above
            it and reads the neighbours as the frozen base encodes them (``RetroConfig.
            cca_from_base``; Llama family). With ``cca_layers=None``, P is chosen from the base's
            induction heads (:func:`~retro_core.induction.induction_scores`): CCA after layer L-1
            for the (at most 4) layers L with a head scoring at least ``induction_threshold``;
            those heads' gates start open, the others' at 0.
        induction_threshold: see ``cca_from_base``.
        cca_heads: with ``cca_from_base`` and ``cca_layers``: the heads whose gates start open,
            per CCA layer, instead of those scoring at least ``induction_threshold`` (a resumed
            run passes its recorded ``RetroConfig.cca_heads``).
        train_copies: with ``cca_from_base``, whether the copied norm and projections train
            (False: only the per-head gates, sinks and null keys do).
        dropout: dropout of the new modules.
        pad_id: id padding neighbours; None -> the base config's pad, else eos, else 0.
        tokenizer_id: id of the tokenizer the database must have; None -> computed from
            ``tokenizer_dir``, else from ``base_path`` when it holds tokenizer files.
        tokenizer_dir: a Hugging Face tokenizer directory to compute the tokenizer id from.
        base_path: the model's directory (recorded, with a hash of its weights, for saving);
            None -> ``hf_model`` when it is a path, else ``hf_model.name_or_path`` if a directory.
        gguf_file: the GGUF file inside ``base_path`` the model was loaded from, if any.
        dtype: dtype used when loading ``hf_model`` from a path.
        seed: seeds the initialisation of the new weights.

    Returns:
        The :class:`RetrofittedLM`; its trainable share is logged.
    """
    if isinstance(hf_model, str | os.PathLike):
        base_path = hf_model if base_path is None else base_path
        hf_model = load_base_model(hf_model, gguf_file=gguf_file, dtype=dtype)
    if not isinstance(hf_model, nn.Module) or not hasattr(hf_model, "config"):
        raise RetrofitError(
            f"retrofit: expected a Hugging Face causal LM, got {type(hf_model).__name__}"
        )
    hc = hf_model.config
    base_path, base_ref = _base_reference(hf_model, base_path, gguf_file)
    tokenizer_id = _tokenizer_id(tokenizer_id, tokenizer_dir, base_path)
    if pad_id is None:  # the base's pad, else its eos, else 0 (only padding: it is masked out)
        pad_id = _base_pad_id(hc)
    eps = getattr(hc, "rms_norm_eps", None) or getattr(hc, "layer_norm_epsilon", None) or 1e-5
    if enc_n_heads is None and enc_d_model is not None and enc_d_model != hc.hidden_size:
        # a narrower/wider encoder keeps the base's head size: d' / (d / h) heads
        enc_n_heads = max(1, enc_d_model // (hc.hidden_size // hc.num_attention_heads))
    if cca_heads is not None and (not cca_from_base or cca_layers is None):
        raise RetrofitError("retrofit: cca_heads needs cca_from_base=True and cca_layers")
    if cca_from_base:
        cca_layers, cca_heads = _layers_from_induction_heads(
            hf_model, cca_layers, cca_heads, induction_threshold
        )
    try:
        config = RetroConfig(
            vocab_size=int(hc.vocab_size),
            d_model=int(hc.hidden_size),
            n_heads=int(hc.num_attention_heads),
            n_layers=int(hc.num_hidden_layers),
            chunk_size=chunk_size,
            num_neighbours=k,
            neighbour_len=neighbour_len,
            enc_layers=enc_layers,
            enc_d_model=enc_d_model,
            enc_n_heads=enc_n_heads,
            enc_input_norm=enc_input_norm,
            cca_from_base=cca_from_base,
            cca_heads=cca_heads,
            cca_layers=None if cca_layers is None else tuple(cca_layers),
            dropout=dropout,
            max_seq_len=int(getattr(hc, "max_position_embeddings", None) or 2048),
            pad_id=pad_id or 0,
            tokenizer_id=tokenizer_id,
            norm_eps=float(eps),
        )
    except ValueError as e:
        raise RetrofitError(f"retrofit: {e}") from None
    if not config.is_retro:
        raise RetrofitError("retrofit: cca_layers is empty; expected at least one layer")
    if seed is not None:
        torch.manual_seed(seed)
    model = RetrofittedLM(hf_model, config, base_ref)
    if cca_from_base and not train_copies:
        for name, p in model.cca_layers.named_parameters():
            p.requires_grad_(name.endswith((".gate", ".sink", ".null_key")))
    _log_retrofitted(model, getattr(hc, "model_type", type(hf_model).__name__))
    return model


def _log_retrofitted(model: RetrofittedLM, model_type: str) -> None:
    """Log what was added to the base and the share of the parameters that trains."""
    config, s = model.config, model.trainable_parameters()
    logger.info(
        "retro-fitted %s (%d layers, d=%d): CCA after layers %s, encoder: %s; "
        "trainable %d of %d parameters (%.2f%%)",
        model_type,
        config.n_layers,
        config.d_model,
        list(config.cca_layers),
        "the frozen base (cca_from_base)"
        if config.cca_from_base
        else f"{config.enc_layers} layers, d'={config.enc_d_model}",
        s["trainable"],
        s["total"],
        100 * s["share"],
    )


def _base_pad_id(hc: Any) -> int | None:
    """The base config's pad id, else its eos id (when inside the vocabulary), else None."""
    for name in ("pad_token_id", "eos_token_id"):
        v = _first_int(getattr(hc, name, None))
        if v is not None and 0 <= v < int(hc.vocab_size):
            return v
    return None


def is_retrofit_checkpoint(directory: str | os.PathLike[str]) -> bool:
    """True when ``directory`` holds a checkpoint written by :func:`save_retrofitted`."""
    return (Path(directory) / CONFIG_FILE).is_file()


def save_retrofitted(
    model: RetrofittedLM, directory: str | os.PathLike[str], extra: dict[str, Any] | None = None
) -> Path:
    """Write the new weights (``retrofit.safetensors``) and ``retrofit.json`` to ``directory``.

    ``retrofit.json``: {"format": "retro-retrofit", "version": 1, "config": {RetroConfig},
    "base": {"path", "gguf_file", "sha256", "model_type"}, "extra": {...} | null}. The base
    weights are not copied. Files are written to temporary names, fsynced and renamed, the JSON last.
    """
    if model.base_ref is None:
        raise RetrofitError(
            "save_retrofitted: the base model has no directory reference; pass base_path= to "
            "retrofit()"
        )
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": RETROFIT_FORMAT,
        "version": RETROFIT_VERSION,
        "config": model.config.to_dict(),
        "base": model.base_ref,
        "extra": extra,
    }
    state = {k: v.detach().contiguous().cpu() for k, v in model.new_state_dict().items()}
    write_weights_and_meta(
        d / WEIGHTS_FILE,
        d / CONFIG_FILE,
        state,
        meta,
        RetrofitError("save_retrofitted: extra is not JSON-serialisable"),
    )
    logger.info("saved retro-fit weights to %s (%d tensors)", d, len(state))
    return d


def read_retrofit_config(
    directory: str | os.PathLike[str],
) -> tuple[RetroConfig, dict[str, Any], dict[str, Any] | None]:
    """Read and validate ``retrofit.json``: (config, base reference, extra)."""
    path = Path(directory) / CONFIG_FILE
    meta, config = read_versioned_config(
        path, RETROFIT_FORMAT, RETROFIT_VERSION, "save_retrofitted", RetrofitError
    )
    base = meta.get("base")
    if not isinstance(base, dict) or not all(
        isinstance(base.get(key), str) for key in ("path", "sha256")
    ):
        raise RetrofitError(f'{path}: "base" must be an object with "path" and "sha256" strings')
    extra = meta.get("extra")
    if extra is not None and not isinstance(extra, dict):
        raise RetrofitError(f'{path}: "extra" must be an object or null')
    return config, base, extra


def load_new_weights(
    model: RetrofittedLM, directory: str | os.PathLike[str], verify: bool = True
) -> dict | None:
    """Load a retro-fit checkpoint's new weights into ``model`` (same config, same base hash).

    With ``verify`` the recorded sha256 of ``retrofit.json`` and of the weights file are checked
    first. Returns the checkpoint's extra metadata.
    """
    d = Path(directory)
    config, base, extra = read_retrofit_config(d)
    if verify and (d / WEIGHTS_FILE).is_file():
        meta = json.loads((d / CONFIG_FILE).read_text(encoding="utf-8"))
        check_integrity(meta, d / CONFIG_FILE, d / WEIGHTS_FILE, RetrofitError)
    if config.to_dict() != model.config.to_dict():
        diff = sorted(k for k, v in config.to_dict().items() if model.config.to_dict().get(k) != v)
        raise RetrofitError(f"{d / CONFIG_FILE}: config differs from the model's in {diff}")
    if model.base_ref is not None and base["sha256"] != model.base_ref["sha256"]:
        raise RetrofitError(
            f"{d / CONFIG_FILE}: trained on base weights sha256 {base['sha256'][:12]}, but the "
            f"model's base has {model.base_ref['sha256'][:12]}"
        )
    path = d / WEIGHTS_FILE
    if not path.is_file():
        raise RetrofitError(f"{path}: missing (expected the new weights beside {CONFIG_FILE})")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise RetrofitError(f"{path}: not a readable safetensors file ({e})") from e
    expected = model.new_state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise RetrofitError(
            f"{path}: tensors do not match {CONFIG_FILE}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for name, want in expected.items():
        if tuple(state[name].shape) != tuple(want.shape):
            raise RetrofitError(
                f"{path}: tensor {name!r} has shape {tuple(state[name].shape)}, expected "
                f"{tuple(want.shape)}"
            )
    with torch.no_grad():
        for name, want in expected.items():
            want.copy_(state[name])
    return extra


def load_retrofitted(
    directory: str | os.PathLike[str],
    *,
    base_path: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    map_location: str | torch.device = "cpu",
    verify: bool = True,
) -> RetrofittedLM:
    """Rebuild a retro-fitted model saved by :func:`save_retrofitted` (in eval mode).

    ``verify`` checks the recorded sha256 of the new weights and of ``retrofit.json``.

    The base model is loaded from the recorded directory (or ``base_path``) and GGUF file; its
    weights' sha256 must equal the recorded one. ``model.checkpoint_extra`` holds the extra data.

    Raises:
        RetrofitError: bad/missing files, or base weights that differ from the ones trained on.
    """
    d = Path(directory)
    config, base, _ = read_retrofit_config(d)
    if verify and (d / WEIGHTS_FILE).is_file():  # before the base model is loaded
        meta = json.loads((d / CONFIG_FILE).read_text(encoding="utf-8"))
        check_integrity(meta, d / CONFIG_FILE, d / WEIGHTS_FILE, RetrofitError)
    path = Path(base_path) if base_path is not None else Path(base["path"])
    gguf = base.get("gguf_file")
    sha = base_weights_sha256(path, gguf)
    if sha != base["sha256"]:
        raise RetrofitError(
            f"{path}: base weights sha256 {sha[:12]} differ from {base['sha256'][:12]} recorded in "
            f"{d / CONFIG_FILE}: the new weights were trained on another base model"
        )
    hf = load_base_model(path, gguf_file=gguf, dtype=dtype)
    model = RetrofittedLM(hf, config, dict(base, path=str(path.resolve())))
    model.checkpoint_extra = load_new_weights(model, d, verify=False)  # verified above
    model.to(map_location)
    model.eval()
    logger.info("loaded retro-fitted model %s (base %s)", d, path)
    return model
