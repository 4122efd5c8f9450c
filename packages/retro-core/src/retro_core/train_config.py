"""What a training run is asked to do: :class:`TrainConfig`, the learning-rate schedule, model presets.

Also the checks that a model config fits a dataset (:func:`check_compatible`). Nothing here runs
a model; :mod:`retro_core.train` does.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .config import RetroConfig
from .data import RetroDataset

__all__ = [
    "MODEL_PRESETS",
    "TrainConfig",
    "TrainError",
    "check_compatible",
    "lr_at",
    "model_config_for_dataset",
]

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
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise err("lr", "a finite float > 0")
        if not (0 <= self.min_lr <= self.lr):
            raise err("min_lr", f"0 <= min_lr <= lr={self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise err("weight_decay", "a finite float >= 0")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise err("eps", "a finite float > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise err("betas", "two floats in [0, 1)")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.grad_clip is not None and not (
            math.isfinite(self.grad_clip) and self.grad_clip >= 0
        ):
            raise err("grad_clip", "None or a finite float >= 0")
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


def check_compatible(cfg: RetroConfig, ds: RetroDataset, retrieval: bool, k: int) -> None:
    """Raise TrainError (one line) when a model config cannot train on dataset ``ds`` with k."""
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
