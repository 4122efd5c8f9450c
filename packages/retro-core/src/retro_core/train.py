"""Training RETRO (or its matched baseline) on a training dataset directory (DESIGN.md 2.2).

:func:`train` runs AdamW (no weight decay on norms, biases and embeddings) with linear warmup and a
cosine decay to ``min_lr``, gradient clipping and accumulation, optional bf16 autocast, seeded data
order, periodic validation, a tqdm progress bar, a JSON-lines metrics log and checkpoints that a
later run resumes exactly: the resumed run continues the same loss curve as an uninterrupted one.

Layout of ``out_dir``::

    train_config.json           the TrainConfig of the run
    metrics.jsonl               one JSON object per logged step (step, loss, lr, grad_norm, tokens,
                                tokens_total, elapsed; val_loss on evaluation steps)
    final_metrics.json          what train() returns
    checkpoints/latest.json     {"step": s, "path": "step_0000000s"}
    checkpoints/step_XXXXXXXX/  config.json + model.safetensors (retro_core.checkpoint) and
                                training_state.safetensors (optimizer moments, RNG states) +
                                training_state.json (step, sampler position, optimizer scalars)

Nothing is pickled: tensors go to safetensors, everything else to JSON.

Data parallel: under ``torchrun --nproc_per_node W`` (environment variables RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or when the caller has already initialised a
``torch.distributed`` process group, :func:`train` wraps the model in
:class:`~torch.nn.parallel.DistributedDataParallel` (backend nccl for CUDA devices, gloo otherwise;
``dist_backend`` overrides). ``batch_size`` stays the GLOBAL micro-batch: every rank draws the same
seeded sequence of global micro-batches and takes its contiguous 1/W slice, so the same
TrainConfig trains the same model (up to float reduction order) on any number of processes, and a
checkpoint resumes on a different W. The loss is normalised by the step's real-token count summed
over all ranks. Only rank 0 writes metrics, checkpoints and shows a progress bar; validation is
sharded over the ranks and all-reduced.

Symbols: B sequences per micro-batch, n = l * m tokens per sequence, k neighbours, r tokens each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, read_checkpoint_config, save_checkpoint
from .config import RetroConfig
from .data import RetroDataset, verify_dataset
from .model import Retro
from .retrofit import (
    RetrofittedLM,
    is_retrofit_checkpoint,
    load_new_weights,
    read_retrofit_config,
    save_retrofitted,
)

__all__ = [
    "MODEL_PRESETS",
    "PrefixCachedDataset",
    "SequenceSubset",
    "TrainConfig",
    "TrainError",
    "latest_checkpoint",
    "lr_at",
    "model_config_for_dataset",
    "train",
]

logger = logging.getLogger(__name__)

STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
STATE_VERSION = 1

# Model sizes for `retro-train --preset`; vocab, m, k, r, pad and tokenizer come from the dataset.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"d_model": 64, "n_heads": 4, "n_layers": 4, "enc_layers": 1, "max_seq_len": 512},
    "small": {"d_model": 256, "n_heads": 4, "n_layers": 6, "enc_layers": 2, "max_seq_len": 2048},
    "base": {"d_model": 512, "n_heads": 8, "n_layers": 12, "enc_layers": 2, "max_seq_len": 2048},
}


class TrainError(ValueError):
    """Training cannot start: incompatible model and dataset, or a bad/absent checkpoint."""


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train` (JSON-serialisable with :meth:`to_dict`)."""

    steps: int = 1000  # optimizer steps; the cosine schedule ends at this step
    batch_size: int = 8  # B, sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (B * grad_accum sequences per step)
    lr: float = 3e-4  # peak learning rate
    min_lr: float = 3e-5  # learning rate at the end of the cosine decay
    warmup_steps: int = 100  # linear warmup from lr / warmup_steps to lr
    weight_decay: float = 0.1  # AdamW decay of matrices (not norms, biases, embeddings)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global grad norm; None or 0 = no clipping
    seed: int = 0  # seeds torch, numpy, python and the data order
    seq_chunks: int = 32  # l, chunks per training sequence (n = l * m)
    num_neighbours: int | None = None  # k used in training (<= the dataset's k); None = model's k
    retrieval: bool = True  # False: neighbours ignored (trains the baseline from the same dataset)
    eval_every: int = 200  # validation every this many steps (0 = only at the end)
    eval_batches: int = 8  # micro-batches of the validation split per evaluation (0 = none)
    valid_fraction: float = 0.01  # documents held out by hash when no valid_dir is given
    split_seed: int = 0  # seed of the document hash split
    checkpoint_every: int = 500  # checkpoint every this many steps (and always at the end)
    keep_checkpoints: int = 2  # most recent checkpoints kept
    log_every: int = 10  # metrics.jsonl line every this many steps
    bf16: bool = False  # bfloat16 autocast of the forward pass
    num_workers: int = 0  # DataLoader worker processes
    device: str = "cpu"
    # Share of the positions whose logits and loss a step computes, drawn afresh each step (the
    # same positions for the whole micro-batch): the |V|-way read-out dominates a retro-fit step.
    # For a retro-fitted model the positions t < m-1, which read no neighbours and so give the new
    # weights no gradient, are never drawn. 1.0 = every position.
    loss_share: float = 1.0
    # Retro-fitted models: compute each training sequence's frozen prefix (the base's layers below
    # min(P)) once and keep it in memory (n x d per sequence; bf16 with bf16), so later epochs run the
    # layers from min(P) up only. Single process, num_workers = 0.
    cache_prefix: bool = False
    # Train on these sequences of the training split only (indices into it; None = all), e.g. the
    # sequences whose neighbours carry the most retrieval signal (retro-eval's demo picks them).
    sequences: tuple[int, ...] | None = None
    # Share of the training sequences (drawn per step, seeded) that read the neighbours of another
    # sequence of the batch instead of their own: negatives, so that CCA learns to read nothing
    # when nothing matches (RETRO-fitting from the base's induction heads; learning-curve.md).
    negative_share: float = 0.0

    def __post_init__(self) -> None:
        def err(name: str, expected: str) -> TrainError:
            return TrainError(
                f"TrainConfig.{name}: expected {expected}, got {getattr(self, name)!r}"
            )

        for name in ("steps", "batch_size", "grad_accum", "seq_chunks", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise err(name, "a positive int")
        for name in (
            "warmup_steps",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
            "num_workers",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise err(name, "an int >= 0")
        if self.keep_checkpoints < 1:
            raise err("keep_checkpoints", "an int >= 1")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise err("min_lr", f"0 <= min_lr <= lr={self.lr} and lr > 0")
        if self.weight_decay < 0:
            raise err("weight_decay", "a float >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise err("betas", "two floats in [0, 1)")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.grad_clip is not None and self.grad_clip < 0:
            raise err("grad_clip", "None or a float >= 0")
        if self.num_neighbours is not None and self.num_neighbours < 1:
            raise err("num_neighbours", "None or an int >= 1")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise err("valid_fraction", "a float in [0, 1)")
        if not 0.0 < self.loss_share <= 1.0:
            raise err("loss_share", "a float in (0, 1]")
        if not 0.0 <= self.negative_share < 1.0:
            raise err("negative_share", "a float in [0, 1)")
        if self.sequences is not None:
            seqs = tuple(self.sequences)
            if not seqs or any(
                isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in seqs
            ):
                raise err("sequences", "None or a non-empty list of sequence indices >= 0")
            object.__setattr__(self, "sequences", seqs)
        if self.cache_prefix and self.num_workers:
            raise err("num_workers", "0 with cache_prefix (the cache lives in this process)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of every field."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise a TrainError naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TrainError(
                f"TrainConfig: unknown fields {unknown}; expected some of {sorted(names)}"
            )
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        if d.get("sequences") is not None:
            d["sequences"] = tuple(d["sequences"])
        return cls(**d)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def model_config_for_dataset(
    dataset: RetroDataset, preset: str | dict[str, Any] = "tiny", **overrides: Any
) -> RetroConfig:
    """A :class:`RetroConfig` of a preset size (or a dict of fields) matched to a dataset.

    The dataset supplies vocab_size, chunk_size (m), num_neighbours (k), neighbour_len (r), pad_id
    and tokenizer_id; ``overrides`` win over both.
    """
    if isinstance(preset, str):
        if preset not in MODEL_PRESETS:
            raise TrainError(f"unknown preset {preset!r}; expected one of {sorted(MODEL_PRESETS)}")
        fields_ = dict(MODEL_PRESETS[preset])
    else:
        fields_ = dict(preset)
    fields_.update(
        vocab_size=dataset.vocab_size,
        chunk_size=dataset.chunk_size,
        num_neighbours=dataset.k,
        neighbour_len=dataset.r,
        pad_id=dataset.pad_id,
        tokenizer_id=dataset.tokenizer_id,
    )
    fields_["max_seq_len"] = max(fields_.get("max_seq_len", 0), dataset.seq_len)
    fields_.update(overrides)
    return RetroConfig.from_dict(fields_)


# ----------------------------------------------------------------------------------------------
# pieces


class _BatchSampler:
    """Infinite, seeded, resumable stream of micro-batches of sequence indices.

    The data order is a pure function of (seed, position): epoch e is ``randperm(N)`` from a
    generator seeded with (seed, e); batches run on across epoch boundaries. Starting at sample
    ``start`` continues exactly where a run that consumed ``start`` samples stopped.

    Data parallel: with ``world_size`` W > 1 every rank draws the same global micro-batches of
    ``batch_size`` B (``start`` counts global samples) and yields its contiguous slice
    ``batch[rank * B/W : (rank + 1) * B/W]``; the union over ranks is the single-process batch.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size % world_size:
            raise TrainError(
                f"TrainConfig.batch_size={batch_size}: the global micro-batch must be divisible "
                f"by the number of processes WORLD_SIZE={world_size} (each rank takes "
                f"batch_size / WORLD_SIZE sequences of it)"
            )
        if not 0 <= rank < world_size:
            raise TrainError(f"rank {rank} is outside 0..{world_size - 1}")
        self.num_items, self.batch_size, self.seed, self.start = num_items, batch_size, seed, start
        self.rank, self.world_size = rank, world_size

    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
        return torch.randperm(self.num_items, generator=g).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = divmod(self.start, self.num_items)
        perm = self._perm(epoch)
        while True:
            batch: list[int] = []
            while len(batch) < self.batch_size:
                if offset == self.num_items:
                    epoch, offset = epoch + 1, 0
                    perm = self._perm(epoch)
                take = min(self.batch_size - len(batch), self.num_items - offset)
                batch.extend(perm[offset : offset + take])
                offset += take
            if self.world_size == 1:
                yield batch
            else:
                b = self.batch_size // self.world_size
                yield batch[self.rank * b : (self.rank + 1) * b]


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices; none on norms, biases (ndim < 2) and embeddings.

    A parameter with an ``lr_scale`` attribute (e.g. the per-head gates and sinks of
    :class:`~retro_core.induction.BaseAttentionCCA`) goes to its own group, without decay, whose
    learning rate is the schedule's times that scale.
    """
    embedding_params = {
        id(p) for mod in model.modules() if isinstance(mod, nn.Embedding) for p in mod.parameters()
    }
    decay, no_decay, seen = [], [], set()
    scaled: dict[float, list[nn.Parameter]] = {}
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if getattr(p, "lr_scale", None) is not None:
            scaled.setdefault(float(p.lr_scale), []).append(p)
            continue
        (no_decay if p.ndim < 2 or id(p) in embedding_params else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
        *({"params": ps, "weight_decay": 0.0, "lr_scale": sc} for sc, ps in sorted(scaled.items())),
    ]


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _sample_positions(
    batch: dict[str, torch.Tensor], share: float, first: int, seed: int
) -> dict[str, torch.Tensor]:
    """Keep the loss at a seeded random ``share`` of the positions >= ``first`` (same for all B)."""
    n = batch["loss_mask"].shape[1]
    g = torch.Generator().manual_seed(seed % 2**63)
    cand = torch.arange(first, n)
    take = cand[torch.randperm(len(cand), generator=g)[: max(1, round(share * len(cand)))]]
    keep = torch.zeros(n, dtype=torch.bool)
    keep[take] = True
    return {**batch, "loss_mask": batch["loss_mask"] & keep.to(batch["loss_mask"].device)}


_NEIGHBOUR_KEYS = ("neighbours", "neighbour_lengths", "encoded_mask")


def _swap_neighbours(batch: dict[str, torch.Tensor], share: float, seed: int) -> dict[str, Any]:
    """A seeded random ``share`` of the B sequences read the next sequence's neighbours (negatives).

    Everything that describes neighbours moves together (tokens, lengths, cached encodings).
    Batches of one sequence are returned unchanged.
    """
    B = batch["tokens"].shape[0]
    if B < 2:
        return batch
    g = torch.Generator().manual_seed(seed % 2**63)
    swap = torch.rand(B, generator=g) < share  # (B,)
    src = torch.where(swap, (torch.arange(B) + 1) % B, torch.arange(B))
    out = dict(batch)
    for key, v in batch.items():
        if key in _NEIGHBOUR_KEYS or key.startswith("encoded."):
            out[key] = v[src.to(v.device)]
    return out


class SequenceSubset(Subset):
    """Some sequences of a :class:`RetroDataset`, keeping its metadata (``seq_len``, ``k``...)."""

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "indices"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


class PrefixCachedDataset(Dataset):
    """A training dataset whose items also carry the model's frozen prefix (computed once).

    Items are those of ``dataset`` plus ``prefix`` (n, d) in ``dtype``: the retro-fitted model's
    :meth:`~retro_core.retrofit.RetrofittedLM.frozen_prefix` of the item's tokens, computed on
    first access and kept in memory (n x d x 2 bytes per sequence in bfloat16). A model built with
    ``cca_from_base`` also gets its neighbours' encodings (they depend on no trainable weight
    either): ``encoded.<p>`` (l, k, r, d) per CCA layer p and ``encoded_mask`` (l, k, r), from
    :meth:`~retro_core.retrofit.RetrofittedLM.encode_neighbours` (l·k·r·d·|P| values a sequence).
    """

    def __init__(
        self, dataset: Dataset, model: RetrofittedLM, dtype: torch.dtype = torch.bfloat16
    ) -> None:
        self.dataset, self.model, self.dtype = dataset, model, dtype
        self.cache: dict[int, torch.Tensor] = {}
        self.encoded: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # the dataset's metadata (seq_len, k, ...)
        # Never forward protocol names: DataLoader fetches through ``__getitems__`` when the
        # dataset has one, and the wrapped Subset's would bypass the cache entirely.
        if name.startswith("__") or name in ("dataset", "model", "cache", "dtype", "encoded"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = dict(self.dataset[index])
        h = self.cache.get(int(index))
        if h is None:
            device = next(self.model.parameters()).device
            h = self.model.frozen_prefix(item["tokens"][None].to(device))[0]
            h = h.to("cpu", self.dtype)
            self.cache[int(index)] = h
        item["prefix"] = h
        if self.model.config.cca_from_base:
            enc = self.encoded.get(int(index))
            if enc is None:
                device = next(self.model.parameters()).device
                got, mask = self.model.encode_neighbours(
                    item["neighbours"][None].to(device), item["neighbour_lengths"][None].to(device)
                )
                enc = {f"encoded.{p}": e[0].to("cpu", self.dtype) for p, e in got.items()}
                enc["encoded_mask"] = mask[0].cpu()
                self.encoded[int(index)] = enc
            item.update(enc)
        return item


def _loss_sum(
    model: Retro,
    batch: dict[str, torch.Tensor],
    retrieval: bool,
    bf16: bool,
    *,
    runner: nn.Module | None = None,
    always_forward: bool = False,
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the loss mask of one micro-batch, and its token count.

    Trailing positions that no sequence of the batch predicts from are cut (causal: they cannot
    change the kept logits), rounded up to whole chunks. ``runner`` is the module called for the
    forward pass (the DistributedDataParallel wrapper of ``model``; default ``model``).
    ``always_forward``: a micro-batch without real tokens still runs the forward pass over its
    first chunk (a zero loss connected to every parameter), so that DDP's gradient hooks fire on
    every rank.
    """
    mask = batch["loss_mask"]  # (B, n) bool
    count = int(mask.sum())
    m = model.config.chunk_size
    if count == 0:
        if not always_forward:
            return torch.zeros((), device=mask.device), 0
        T = min(mask.shape[1], m)
    else:
        last = int(torch.nonzero(mask.any(0))[-1]) + 1
        T = min(mask.shape[1], -(-last // m) * m)
    tokens = batch["tokens"][:, :T]  # (B, T)
    targets = batch["targets"][:, :T].masked_fill(~mask[:, :T], -100)  # (B, T)
    neighbours = lengths = None
    if retrieval:
        u = T // m + (T % m > 0)
        neighbours = batch["neighbours"][:, :u]  # (B, l', k, r)
        lengths = batch["neighbour_lengths"][:, :u]  # (B, l', k)
    kwargs: dict[str, Any] = {}
    cols = mask[:, :T].any(0)  # (T,) positions some sequence predicts from
    if count and not bool(cols.all()):  # sampled positions (loss_share): logits there only
        keep = torch.nonzero(cols).squeeze(1)
        kwargs["logits_to_keep"] = keep
        targets = targets[:, keep]
    if "prefix" in batch:
        kwargs["prefix"] = batch["prefix"][:, :T]
    if "encoded_mask" in batch and neighbours is not None:  # cca_from_base: cached encodings
        enc = {
            int(key.split(".", 1)[1]): v[:, :u]
            for key, v in batch.items()
            if key.startswith("encoded.")
        }
        kwargs["encoded"] = (enc, batch["encoded_mask"][:, :u])
    device_type = tokens.device.type
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=bf16):
        logits = (model if runner is None else runner)(tokens, neighbours, lengths, **kwargs)
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
    )
    return loss, count


@torch.no_grad()
def _evaluate_sums(
    model: Retro,
    loader: DataLoader,
    batches: int,
    retrieval: bool,
    bf16: bool,
    device: torch.device,
) -> tuple[float, int]:
    """Summed validation loss and real-token count over the first ``batches`` micro-batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        loss, n = _loss_sum(model, _to_device(batch, device), retrieval, bf16)
        total += float(loss)
        count += n
    model.train(was_training)
    return total, count


def _evaluate(
    model: Retro,
    loader: DataLoader,
    batches: int,
    retrieval: bool,
    bf16: bool,
    device: torch.device,
) -> float:
    """Token-weighted mean validation loss over the first ``batches`` micro-batches (fixed order)."""
    total, count = _evaluate_sums(model, loader, batches, retrieval, bf16, device)
    return total / count if count else float("nan")


# ----------------------------------------------------------------------------------------------
# data parallel


@dataclass(frozen=True)
class _Dist:
    """This process's place in a torch.distributed job."""

    rank: int
    world_size: int
    created: bool  # train() initialised the process group and destroys it at the end


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise TrainError(
            f"environment variable {name}={value!r}: expected an int (torchrun sets it)"
        ) from None


def _setup_distributed(
    device: torch.device, backend: str | None
) -> tuple[_Dist | None, torch.device]:
    """Join the data-parallel job, if any: an initialised process group, or torchrun's variables.

    Returns None (single process, nothing initialised) when no process group exists and
    WORLD_SIZE is unset or 1. A device "cuda" without an index becomes cuda:LOCAL_RANK.
    Raises TrainError when WORLD_SIZE > 1 but torchrun's other variables are missing.
    """
    initialised = dist.is_available() and dist.is_initialized()
    if not initialised and _env_int("WORLD_SIZE", 1) <= 1:
        return None, device
    if not dist.is_available():
        raise TrainError(
            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')}: this torch build has no torch.distributed"
        )
    if device.type == "cuda" and device.index is None:
        local = _env_int("LOCAL_RANK", -1)  # torchrun; else the caller's torch.cuda.set_device
        device = torch.device("cuda", local if local >= 0 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if initialised:
        return _Dist(dist.get_rank(), dist.get_world_size(), created=False), device
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise TrainError(
                f"WORLD_SIZE={os.environ['WORLD_SIZE']} but environment variable {name} is not set: "
                "launch data-parallel training with torchrun"
            )
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(backend=backend)
    logger.info(
        "data parallel: rank %d of %d, backend %s, device %s",
        dist.get_rank(),
        dist.get_world_size(),
        backend,
        device,
    )
    return _Dist(dist.get_rank(), dist.get_world_size(), created=True), device


def _all_reduce(
    values: list[float | int], dtype: torch.dtype, device: torch.device, op: Any = None
) -> list[Any]:
    """Element-wise sum (or ``op``) of a short list of numbers over all ranks."""
    t = torch.tensor(values, dtype=dtype, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)
    return t.tolist()


def _wrap_ddp(model: nn.Module, device: torch.device, find_unused: bool) -> DistributedDataParallel:
    """DistributedDataParallel over the trainable parameters of ``model``.

    Frozen parameters (a retro-fitted model's base) are left out of DDP (they are loaded from the
    same files on every rank); buffers (rotary tables) are constants and not re-broadcast.
    """
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    kwargs: dict[str, Any] = {}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        kwargs["forward_sync_buffers"] = False  # torch >= 2.13
    else:  # pragma: no cover (older torch)
        kwargs["broadcast_buffers"] = False
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused,
        **kwargs,
    )


def _finite(obj: Any) -> Any:
    """``obj`` with NaN/inf floats replaced by None (strict JSON has no NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_finite(obj), f, indent=2, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_checkpoint(out_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint directory of a training run, or None."""
    ckpts = Path(out_dir) / "checkpoints"
    pointer = ckpts / "latest.json"
    if pointer.is_file():
        try:
            path = ckpts / json.loads(pointer.read_text(encoding="utf-8"))["path"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise TrainError(f"{pointer}: unreadable ({e})") from None
        if (path / STATE_JSON).is_file():
            return path
        raise TrainError(f"{pointer}: points to {path}, which is not a complete checkpoint")
    steps = sorted(p for p in ckpts.glob("step_*") if (p / STATE_JSON).is_file())
    return steps[-1] if steps else None


def _save_training_state(
    directory: Path,
    optimizer: torch.optim.Optimizer,
    scalars: dict[str, Any],
) -> None:
    """Optimizer moments + RNG states to safetensors, everything else to JSON (no pickle)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state_scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optimizer.{pid}.{name}"] = v.detach().cpu().contiguous()
            else:
                state_scalars.setdefault(str(pid), {})[name] = v
    groups = []
    for g in sd["param_groups"]:
        g = dict(g)
        g["betas"] = list(g["betas"])
        groups.append(g)
    tensors["rng.torch"] = torch.get_rng_state()
    np_state = np.random.get_state()  # noqa: NPY002 (the global RNG user code may draw from)
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    py_state = random.getstate()
    save_file(tensors, str(directory / STATE_TENSORS))
    state = {
        "version": STATE_VERSION,
        **scalars,
        "optimizer": {"param_groups": groups, "scalars": state_scalars},
        "rng": {
            "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py_state[0], list(py_state[1]), py_state[2]],
        },
    }
    if torch.cuda.is_available():
        state["rng"]["cuda_seed_note"] = "CUDA RNG state is not saved"
    _write_json(directory / STATE_JSON, state)


def _load_training_state(directory: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    path = directory / STATE_JSON
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        tensors = load_file(str(directory / STATE_TENSORS))
    except (OSError, json.JSONDecodeError) as e:
        raise TrainError(f"{path.parent}: unreadable training state ({e})") from None
    except Exception as e:  # safetensors raises its own error types
        raise TrainError(f"{directory / STATE_TENSORS}: unreadable ({e})") from None
    if state.get("version") != STATE_VERSION:
        raise TrainError(
            f"{path}: field 'version' is {state.get('version')!r}, expected {STATE_VERSION}"
        )
    opt_state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optimizer."):
            _, pid, name = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = v
    for pid, sc in state["optimizer"]["scalars"].items():
        opt_state.setdefault(int(pid), {}).update(sc)
    groups = []
    for g in state["optimizer"]["param_groups"]:
        g = dict(g)
        g["betas"] = tuple(g["betas"])
        groups.append(g)
    try:
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    except (ValueError, KeyError) as e:
        raise TrainError(f"{path}: optimizer state does not fit this model ({e})") from None
    torch.set_rng_state(tensors["rng.torch"])
    name, pos, has_gauss, cached = state["rng"]["numpy"]
    np.random.set_state(  # noqa: NPY002
        (name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached)
    )
    version, internal, gauss = state["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))
    return state


def _write_error(final: Path, tmp: Path, e: Exception) -> TrainError:
    """One line for a checkpoint that could not be written: the file, the bytes, the space left.

    The partial checkpoint (``tmp``) is removed; the previous one and ``latest.json`` stay.
    """
    written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) if tmp.is_dir() else 0
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        free = f"{shutil.disk_usage(final.parent).free} bytes free there"
    except OSError:
        free = "free space unknown"
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return TrainError(
        f"{final}: writing the checkpoint failed after {written} bytes ({reason}); {free} "
        "(the partial checkpoint is removed, the previous one kept)"
    )


def _save_checkpoint(
    out_dir: Path,
    model: Retro,
    optimizer: torch.optim.Optimizer,
    scalars: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoints/step_XXXXXXXX via a temporary directory, then point latest.json at it."""
    ckpts = out_dir / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    name = f"step_{scalars['step']:08d}"
    tmp = ckpts / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save = save_retrofitted if isinstance(model, RetrofittedLM) else save_checkpoint
    final = ckpts / name
    try:
        save(model, tmp, extra={"step": scalars["step"], "train_config": scalars["train_config"]})
        _save_training_state(tmp, optimizer, scalars)
    except (OSError, SafetensorError) as e:  # disk full, file size limit, read-only
        raise _write_error(final, tmp, e) from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_json(ckpts / "latest.json", {"step": scalars["step"], "path": name})
    for old in sorted(p for p in ckpts.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint %s", final)
    return final


def _checkpoint_config(path: Path) -> RetroConfig:
    """The model config of a checkpoint (a Retro one, or a retro-fit one)."""
    if is_retrofit_checkpoint(path):
        return read_retrofit_config(path)[0]
    return read_checkpoint_config(path)[0]


def _load_weights(model: nn.Module, path: Path) -> None:
    """Load a checkpoint's weights into the model being trained."""
    if isinstance(model, RetrofittedLM):  # the new weights only (base hash checked)
        load_new_weights(model, path)
    else:
        model.load_state_dict(load_checkpoint(path, map_location="cpu").state_dict())


def _check_compatible(cfg: RetroConfig, ds: RetroDataset, retrieval: bool, k: int) -> None:
    where = f"model config vs dataset {ds.directory}"
    if cfg.chunk_size != ds.chunk_size:
        raise TrainError(
            f"{where}: chunk_size m={cfg.chunk_size} but the dataset has m={ds.chunk_size}"
        )
    if cfg.vocab_size < ds.vocab_size:
        raise TrainError(
            f"{where}: vocab_size={cfg.vocab_size} is smaller than the dataset's {ds.vocab_size}"
        )
    if cfg.tokenizer_id is not None and cfg.tokenizer_id != ds.tokenizer_id:
        raise TrainError(
            f"{where}: tokenizer_id={cfg.tokenizer_id!r} but the dataset has {ds.tokenizer_id!r}"
        )
    if cfg.max_seq_len < ds.seq_len:
        raise TrainError(
            f"{where}: max_seq_len={cfg.max_seq_len} < n = l*m = {ds.seq_len} (seq_chunks={ds.seq_chunks})"
        )
    if retrieval:
        if cfg.neighbour_len != ds.r:
            raise TrainError(
                f"{where}: neighbour_len r={cfg.neighbour_len} but the dataset has r={ds.r}"
            )
        if k > ds.k:
            raise TrainError(f"{where}: num_neighbours k={k} but the dataset stores only k={ds.k}")


# ----------------------------------------------------------------------------------------------
# train


def train(
    model_config_or_model: RetroConfig | Retro,
    train_config: TrainConfig,
    dataset_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    valid_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    dist_backend: str | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Train a RETRO model (or its baseline) on a dataset directory; checkpoint and resume.

    Runs data parallel (DistributedDataParallel) when started by ``torchrun`` with WORLD_SIZE > 1
    or when a torch.distributed process group is already initialised (see the module docstring);
    otherwise in this process alone.

    Args:
        model_config_or_model: a :class:`RetroConfig` (a model is built from it after seeding;
            a None tokenizer_id is filled in from the dataset, whose pad_id is then adopted too)
            or a :class:`Retro` instance, or a :class:`~retro_core.retrofit.RetrofittedLM`
            (trained in place; a retro-fitted model trains and checkpoints its new weights only).
        train_config: the :class:`TrainConfig`.
        dataset_dir: a training dataset (DESIGN 2.2). Sequences of n = l*m tokens
            (l = ``train_config.seq_chunks``), batches tokens [B, n], neighbours [B, l, k, r].
        out_dir: where metrics, checkpoints and the final metrics go.
        valid_dir: a separate validation dataset; None = hold out ``valid_fraction`` of the
            documents of ``dataset_dir`` by hash (:func:`retro_core.data.document_split`).
        resume: continue from the latest checkpoint in ``out_dir`` (same data order, optimizer
            and RNG state, so the loss curve continues as if never interrupted). Without
            ``resume`` an ``out_dir`` that holds checkpoints is refused.
        stop_after: stop once this many optimizer steps are done in total (the schedule still
            runs to ``train_config.steps``); used to pause a run and resume it later.
        progress: show a tqdm progress bar (rank 0 only).
        dist_backend: torch.distributed backend when this call initialises the process group
            (default: nccl for a CUDA device, gloo otherwise).
        verify: before training, stream every file of ``dataset_dir`` (and ``valid_dir``) once
            and compare its sha256 with the dataset's manifest
            (:func:`retro_core.data.verify_dataset`), so that a corrupted dataset never yields a
            model. False skips it (the cheap checks of every open still run).

    Returns:
        Final metrics: step, loss (last step), val_loss (the latest validation, NaN without one),
        tokens_total (real tokens predicted), elapsed (s), checkpoint (path), num_parameters,
        finished (False when stopped by ``stop_after``). Data parallel: the same on every rank
        (losses and token counts are global), only rank 0 writes files.
    """
    device = torch.device(train_config.device)
    dist_, device = _setup_distributed(device, dist_backend)
    try:
        return _train(
            model_config_or_model,
            train_config,
            dataset_dir,
            out_dir,
            valid_dir=valid_dir,
            resume=resume,
            stop_after=stop_after,
            progress=progress,
            device=device,
            dist_=dist_,
            verify=verify,
        )
    finally:
        if dist_ is not None and dist_.created:
            dist.destroy_process_group()


def _train(
    model_config_or_model: RetroConfig | Retro,
    tc: TrainConfig,
    dataset_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    valid_dir: str | os.PathLike[str] | None,
    resume: bool,
    stop_after: int | None,
    progress: bool,
    device: torch.device,
    dist_: _Dist | None,
    verify: bool = True,
) -> dict[str, Any]:
    """The body of :func:`train` (``dist_`` None: a single process, exactly as before DDP)."""
    rank, world = (0, 1) if dist_ is None else (dist_.rank, dist_.world_size)
    is_main = rank == 0
    if tc.batch_size % world:
        raise TrainError(
            f"TrainConfig.batch_size={tc.batch_size}: the global micro-batch must be divisible by "
            f"the number of processes WORLD_SIZE={world} (global batch per step = batch_size x "
            f"grad_accum = {tc.batch_size * tc.grad_accum} = WORLD_SIZE x grad_accum x per-rank "
            "micro-batch)"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    random.seed(tc.seed)
    np.random.seed(tc.seed % 2**32)  # noqa: NPY002 (seed the global RNG for user code)
    torch.manual_seed(tc.seed)

    cfg = (
        model_config_or_model.config
        if isinstance(model_config_or_model, nn.Module)
        else model_config_or_model
    )
    if not isinstance(cfg, RetroConfig):
        raise TypeError(
            f"expected a RetroConfig or a Retro model, got {type(model_config_or_model).__name__}"
        )
    retrieval = tc.retrieval and cfg.is_retro
    if tc.retrieval and not cfg.is_retro:
        logger.info("the model has no CCA layers: training the decoder-only baseline")
    k = tc.num_neighbours if tc.num_neighbours is not None else cfg.num_neighbours

    # Data: verify the bytes (each file read once), peek at the metadata to resolve k, then open
    # the splits. Every rank verifies (a rank that skipped would wait forever for one that failed).
    if verify:
        for d in (dataset_dir, valid_dir):
            if d is not None:
                verify_dataset(d, progress=progress and is_main)
    else:
        logger.warning("%s: sha256 verification skipped (--no-verify)", dataset_dir)
    meta = RetroDataset(dataset_dir, tc.seq_chunks)
    if retrieval and tc.num_neighbours is None:
        k = min(k, meta.k)
    _check_compatible(cfg, meta, retrieval, k)
    if isinstance(model_config_or_model, RetroConfig) and cfg.tokenizer_id is None:
        cfg = dataclasses.replace(cfg, tokenizer_id=meta.tokenizer_id, pad_id=meta.pad_id)
    k_read = k if retrieval else 0
    if valid_dir is not None:
        train_ds = RetroDataset(dataset_dir, tc.seq_chunks, num_neighbours=k_read)
        valid_ds: RetroDataset | None = RetroDataset(
            valid_dir, tc.seq_chunks, num_neighbours=k_read
        )
        _check_compatible(cfg, valid_ds, retrieval, k)
    elif tc.valid_fraction > 0:
        split = {
            "num_neighbours": k_read,
            "valid_fraction": tc.valid_fraction,
            "split_seed": tc.split_seed,
        }
        train_ds = RetroDataset(dataset_dir, tc.seq_chunks, split="train", **split)
        valid_ds = RetroDataset(dataset_dir, tc.seq_chunks, split="valid", **split)
    else:
        train_ds, valid_ds = RetroDataset(dataset_dir, tc.seq_chunks, num_neighbours=k_read), None
    if len(train_ds) == 0:
        raise TrainError(f"{dataset_dir}: the training split has no sequences")
    if tc.sequences is not None:
        if max(tc.sequences) >= len(train_ds):
            raise TrainError(
                f"TrainConfig.sequences: index {max(tc.sequences)} is out of range for the "
                f"{len(train_ds)} training sequences of {dataset_dir}"
            )
        train_ds = SequenceSubset(train_ds, tc.sequences)  # type: ignore[assignment]
    if tc.eval_batches == 0:
        valid_ds = None
    if valid_ds is not None and len(valid_ds) == 0:
        logger.warning("%s: the validation split is empty; no validation loss", valid_ds.directory)
        valid_ds = None

    # Model and optimizer.
    model = model_config_or_model if isinstance(model_config_or_model, nn.Module) else Retro(cfg)
    model.to(device)
    model.train()
    optimizer = torch.optim.AdamW(
        _param_groups(model, tc.weight_decay), lr=tc.lr, betas=tc.betas, eps=tc.eps
    )

    # Resume.
    step, tokens_total, elapsed_before, last_loss, last_val = 0, 0, 0.0, float("nan"), float("nan")
    existing = latest_checkpoint(out)
    if existing is not None and not resume:
        raise TrainError(
            f"{out}: holds checkpoints ({existing.name}); pass resume=True or use a new out_dir"
        )
    if resume and existing is not None:
        saved_cfg = _checkpoint_config(existing)
        if saved_cfg.to_dict() != model.config.to_dict():
            diff = sorted(
                k for k, v in saved_cfg.to_dict().items() if model.config.to_dict().get(k) != v
            )
            raise TrainError(
                f"{existing}: config.json differs from the model being trained in {diff}; "
                "resume with the same model config"
            )
        _load_weights(model, existing)
        state = _load_training_state(existing, optimizer)
        saved_tc = state.get("train_config", {})
        for name in ("batch_size", "grad_accum", "seed", "seq_chunks"):
            if saved_tc.get(name) != getattr(tc, name):
                logger.warning(
                    "resuming with %s=%r but the checkpoint was trained with %r: the data order "
                    "differs from an uninterrupted run",
                    name,
                    getattr(tc, name),
                    saved_tc.get(name),
                )
        step = int(state["step"])
        tokens_total = int(state["tokens_total"])
        elapsed_before = float(state["elapsed"])
        samples_seen = int(state["samples_seen"])
        last_loss = float(state["loss"]) if state.get("loss") is not None else float("nan")
        logger.info("resumed from %s at step %d", existing, step)
    else:
        samples_seen = 0
        if resume:
            logger.info("resume requested but %s has no checkpoint: starting from scratch", out)

    ddp: DistributedDataParallel | None = None
    if dist_ is not None:
        # Every rank must start from the same point: a checkpoint seen by rank 0 only (out_dir not
        # on a shared filesystem) would silently desynchronise the data order and optimizer.
        lo = _all_reduce([step, samples_seen], torch.int64, device, dist.ReduceOp.MIN)
        hi = _all_reduce([step, samples_seen], torch.int64, device, dist.ReduceOp.MAX)
        if lo != hi:
            raise TrainError(
                f"{out}: the ranks start at different steps ({lo[0]}..{hi[0]}); every rank must "
                "see the same out_dir and checkpoint (use a shared filesystem)"
            )
        # RETRO trained without retrieval never runs its encoder and CCA layers.
        ddp = _wrap_ddp(model, device, find_unused=cfg.is_retro and not retrieval)

    metrics_path = out / "metrics.jsonl"
    if is_main:  # only rank 0 writes files
        _write_json(out / "train_config.json", tc.to_dict())
        if step == 0:
            metrics_path.write_text("", encoding="utf-8")
        elif metrics_path.exists():  # drop lines logged after the checkpoint we resume from
            kept = [
                line
                for line in metrics_path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step
            ]
            metrics_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    first_pos = model.config.chunk_size - 1 if isinstance(model, RetrofittedLM) else 0
    if tc.cache_prefix:
        if not isinstance(model, RetrofittedLM) or dist_ is not None:
            raise TrainError(
                "TrainConfig.cache_prefix: expected a retro-fitted model trained in one process"
            )
        dtype = torch.bfloat16 if tc.bf16 else next(model.parameters()).dtype
        train_ds = PrefixCachedDataset(train_ds, model, dtype)  # type: ignore[assignment]
    sampler = _BatchSampler(
        len(train_ds), tc.batch_size, tc.seed, start=samples_seen, rank=rank, world_size=world
    )
    loader_gen = torch.Generator().manual_seed(tc.seed)  # keeps DataLoader off the global RNG
    train_iter = iter(
        DataLoader(
            train_ds, batch_sampler=sampler, num_workers=tc.num_workers, generator=loader_gen
        )
    )
    if valid_ds is not None and dist_ is not None:
        # Sharded validation: the sequences a single process would evaluate, split over the ranks;
        # the loss sums and token counts are all-reduced, so the value is the single-process one.
        n_eval = min(len(valid_ds), tc.eval_batches * tc.batch_size)
        valid_ds = Subset(valid_ds, list(range(rank, n_eval, world)))  # type: ignore[assignment]
    valid_loader = (
        None
        if valid_ds is None
        else DataLoader(
            valid_ds,
            batch_size=tc.batch_size,
            shuffle=False,
            num_workers=0,
            generator=torch.Generator().manual_seed(tc.seed),
        )
    )

    def evaluate() -> float:
        assert valid_loader is not None
        if dist_ is None:
            return _evaluate(model, valid_loader, tc.eval_batches, retrieval, tc.bf16, device)
        total, count = _evaluate_sums(
            model, valid_loader, tc.eval_batches, retrieval, tc.bf16, device
        )
        total, count = _all_reduce([total, count], torch.float64, device)
        return total / count if count else float("nan")

    params = [p for g in optimizer.param_groups for p in g["params"]]
    end_step = tc.steps if stop_after is None else min(tc.steps, stop_after)
    logger.info(
        "training %s (%d parameters) on %s: %d sequences (n=%d), steps %d..%d, retrieval=%s, k=%d%s",
        "RETRO" if retrieval else "baseline",
        model.num_parameters(),
        dataset_dir,
        len(train_ds),
        train_ds.seq_len,
        step + 1,
        end_step,
        retrieval,
        k_read,
        "" if dist_ is None else f", data parallel over {world} processes",
    )

    def scalars() -> dict[str, Any]:
        return {
            "step": step,
            "samples_seen": samples_seen,
            "tokens_total": tokens_total,
            "elapsed": elapsed_before + time.perf_counter() - t0,
            "loss": last_loss,
            "train_config": tc.to_dict(),
        }

    t0 = time.perf_counter()
    bar = tqdm(
        total=end_step, initial=step, disable=not (progress and is_main), desc="train", unit="step"
    )
    checkpoint_path = existing if resume else None
    log_ctx = open(metrics_path, "a", encoding="utf-8") if is_main else contextlib.nullcontext(None)
    with log_ctx as log:
        while step < end_step:
            micro = [_to_device(next(train_iter), device) for _ in range(tc.grad_accum)]
            if tc.loss_share < 1.0:
                micro = [
                    _sample_positions(
                        b, tc.loss_share, first_pos, tc.seed * 1_000_003 + step * 131 + i
                    )
                    for i, b in enumerate(micro)
                ]
            if tc.negative_share > 0.0:
                micro = [
                    _swap_neighbours(b, tc.negative_share, tc.seed * 999_983 + step * 137 + i)
                    for i, b in enumerate(micro)
                ]
            samples_seen += tc.batch_size * tc.grad_accum  # global: every rank's share together
            step_tokens = sum(int(b["loss_mask"].sum()) for b in micro)
            if ddp is not None:  # the loss is the mean over the real tokens of ALL ranks
                step_tokens = int(_all_reduce([step_tokens], torch.int64, device)[0])
            lr = lr_at(step, tc)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            optimizer.zero_grad(set_to_none=True)
            loss_total = 0.0
            if ddp is None:
                for b in micro:  # each micro-batch's share of the mean over the step's real tokens
                    loss_sum, n = _loss_sum(model, b, retrieval, tc.bf16)
                    if n:
                        (loss_sum / step_tokens).backward()
                        loss_total += float(loss_sum.detach())
            elif step_tokens:
                # DDP averages gradients over the W ranks; scaling each rank's token sum by
                # W / (all ranks' tokens) makes that average the single-process gradient
                # sum_ranks grad(loss sum) / step_tokens. Every rank runs every micro-batch (even
                # one without real tokens) so that the gradient all-reduce sees all ranks; it
                # runs once per step, after the last micro-batch (no_sync before it).
                scale = world / step_tokens
                for i, b in enumerate(micro):
                    last_micro = i == len(micro) - 1
                    with contextlib.nullcontext() if last_micro else ddp.no_sync():
                        loss_sum, _ = _loss_sum(
                            model, b, retrieval, tc.bf16, runner=ddp, always_forward=True
                        )
                        (loss_sum * scale).backward()
                    loss_total += float(loss_sum.detach())
                loss_total = float(_all_reduce([loss_total], torch.float64, device)[0])
            max_norm = tc.grad_clip if tc.grad_clip else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            optimizer.step()
            step += 1
            tokens_total += step_tokens
            last_loss = loss_total / step_tokens if step_tokens else float("nan")

            record: dict[str, Any] | None = None
            if step % tc.log_every == 0 or step == end_step:
                record = {}
            if valid_loader is not None and (
                (tc.eval_every and step % tc.eval_every == 0) or step == tc.steps
            ):
                last_val = evaluate()
                record = {} if record is None else record
                record["val_loss"] = last_val
            if record is not None and log is not None:
                record = {
                    "step": step,
                    "loss": last_loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": step_tokens,
                    "tokens_total": tokens_total,
                    "elapsed": round(elapsed_before + time.perf_counter() - t0, 4),
                    **record,
                }
                log.write(json.dumps(_finite(record), allow_nan=False) + "\n")
                log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
            if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or step == end_step:
                if is_main:
                    checkpoint_path = _save_checkpoint(
                        out, model, optimizer, scalars(), tc.keep_checkpoints
                    )
                else:
                    checkpoint_path = out / "checkpoints" / f"step_{step:08d}"
    bar.close()

    final = {
        "step": step,
        "loss": last_loss,
        "val_loss": last_val,
        "tokens_total": tokens_total,
        "elapsed": elapsed_before + time.perf_counter() - t0,
        "checkpoint": None if checkpoint_path is None else str(checkpoint_path),
        "num_parameters": model.num_parameters(),
        "retrieval": retrieval,
        "finished": step >= tc.steps,
    }
    if is_main:
        _write_json(out / "final_metrics.json", final)
    if dist_ is not None:
        dist.barrier()  # every rank returns once rank 0's final checkpoint and metrics exist
    return final
