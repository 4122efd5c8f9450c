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

Modules: :mod:`~retro_core.train_config` (``TrainConfig``, the schedule, presets),
:mod:`~retro_core.train_data` (batch order, dataset views), :mod:`~retro_core.train_state`
(checkpoints with optimizer and RNG states, resuming), :mod:`~retro_core.parallel` (DDP). This
module holds the loss and the loop: ``_setup`` -> ``_step`` -> ``_after_step`` (evaluate, log,
checkpoint). The public names of those modules stay importable from here.

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
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .config import RetroConfig
from .data import RetroDataset, verify_dataset
from .interface import RetrievalLM
from .model import Retro
from .parallel import DistInfo, all_reduce, setup_distributed, wrap_ddp
from .retrofit import RetrofittedLM
from .train_config import (
    MODEL_PRESETS,
    TrainConfig,
    TrainError,
    check_compatible,
    lr_at,
    model_config_for_dataset,
)
from .train_data import (
    BatchSampler,
    PrefixCachedDataset,
    SequenceSubset,
    sample_positions,
    swap_neighbours,
    to_device,
)
from .train_state import (
    Progress,
    finite,
    latest_checkpoint,
    resume_point,
    save_run_checkpoint,
    write_json,
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


# ----------------------------------------------------------------------------------------------
# the loss


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


def _loss_sum(
    model: RetrievalLM,
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
    model: RetrievalLM,
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
        loss, n = _loss_sum(model, to_device(batch, device), retrieval, bf16)
        total += float(loss)
        count += n
    model.train(was_training)
    return total, count


# ----------------------------------------------------------------------------------------------
# train


def train(
    model_config_or_model: RetroConfig | RetrievalLM,
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
    dist_, device = setup_distributed(device, dist_backend)
    try:
        run = _setup(
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
        return _loop(run)
    finally:
        if dist_ is not None and dist_.created:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# the loop: setup -> step -> evaluate / log / checkpoint


@dataclass
class _Run:
    """Everything the loop reads, and its :class:`~retro_core.train_state.Progress`."""

    tc: TrainConfig
    model: RetrievalLM
    optimizer: torch.optim.Optimizer
    device: torch.device
    dist: DistInfo | None
    ddp: DistributedDataParallel | None
    retrieval: bool
    train_iter: Any  # iterator over the training micro-batches (this rank's share)
    valid_loader: DataLoader | None
    out: Path
    end_step: int  # stop after this step (stop_after or tc.steps)
    first_pos: int  # the first position whose loss can be sampled (loss_share)
    progress: bool
    at: Progress
    t0: float = field(default_factory=time.perf_counter)

    @property
    def is_main(self) -> bool:
        """Rank 0 (or the single process): the one that writes files."""
        return self.dist is None or self.dist.rank == 0

    @property
    def params(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates (their gradients are clipped together)."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]


def _setup(
    model_config_or_model: RetroConfig | RetrievalLM,
    tc: TrainConfig,
    dataset_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    valid_dir: str | os.PathLike[str] | None,
    resume: bool,
    stop_after: int | None,
    progress: bool,
    device: torch.device,
    dist_: DistInfo | None,
    verify: bool = True,
) -> _Run:
    """Seed, open the data, build (or take) the model and optimizer, resume, wrap for DDP."""
    world = 1 if dist_ is None else dist_.world_size
    is_main = dist_ is None or dist_.rank == 0
    _check_divisible(tc, world)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(tc.seed)
    np.random.seed(tc.seed % 2**32)  # noqa: NPY002 (seed the global RNG for user code)
    torch.manual_seed(tc.seed)

    cfg, retrieval, k, train_ds, valid_ds = _open_data(
        model_config_or_model, tc, dataset_dir, valid_dir, verify, progress and is_main
    )
    model = model_config_or_model if isinstance(model_config_or_model, nn.Module) else Retro(cfg)
    model.to(device)
    model.train()
    optimizer = torch.optim.AdamW(
        _param_groups(model, tc.weight_decay), lr=tc.lr, betas=tc.betas, eps=tc.eps
    )
    at = resume_point(out, model, optimizer, tc.to_dict(), resume)
    ddp = None
    if dist_ is not None:
        _check_same_start(out, at, device)
        # RETRO trained without retrieval never runs its encoder and CCA layers.
        ddp = wrap_ddp(model, device, find_unused=cfg.is_retro and not retrieval)
    if is_main:  # only rank 0 writes files
        _start_metrics(out, tc, at.step)

    first_pos = model.config.chunk_size - 1 if isinstance(model, RetrofittedLM) else 0
    if tc.cache_prefix:
        train_ds = _with_prefix_cache(train_ds, model, tc, dist_)
    run = _Run(
        tc=tc,
        model=model,
        optimizer=optimizer,
        device=device,
        dist=dist_,
        ddp=ddp,
        retrieval=retrieval,
        train_iter=_train_batches(train_ds, tc, at.samples_seen, dist_),
        valid_loader=_valid_loader(valid_ds, tc, dist_),
        out=out,
        end_step=tc.steps if stop_after is None else min(tc.steps, stop_after),
        first_pos=first_pos,
        progress=progress,
        at=at,
    )
    logger.info(
        "training %s (%d parameters) on %s: %d sequences (n=%d), steps %d..%d, retrieval=%s, k=%d%s",
        "RETRO" if retrieval else "baseline",
        model.num_parameters(),
        dataset_dir,
        len(train_ds),
        train_ds.seq_len,
        at.step + 1,
        run.end_step,
        retrieval,
        k if retrieval else 0,
        "" if dist_ is None else f", data parallel over {world} processes",
    )
    return run


def _with_prefix_cache(
    train_ds: Dataset, model: RetrievalLM, tc: TrainConfig, dist_: DistInfo | None
) -> PrefixCachedDataset:
    """``train_ds`` with each sequence's frozen prefix cached (``TrainConfig.cache_prefix``)."""
    if not isinstance(model, RetrofittedLM) or dist_ is not None:
        raise TrainError(
            "TrainConfig.cache_prefix: expected a retro-fitted model trained in one process"
        )
    dtype = torch.bfloat16 if tc.bf16 else next(model.parameters()).dtype
    return PrefixCachedDataset(train_ds, model, dtype)


def _check_divisible(tc: TrainConfig, world: int) -> None:
    """Refuse a global micro-batch that the W processes cannot share equally."""
    if tc.batch_size % world:
        raise TrainError(
            f"TrainConfig.batch_size={tc.batch_size}: the global micro-batch must be divisible by "
            f"the number of processes WORLD_SIZE={world} (global batch per step = batch_size x "
            f"grad_accum = {tc.batch_size * tc.grad_accum} = WORLD_SIZE x grad_accum x per-rank "
            "micro-batch)"
        )


def _open_data(
    model_config_or_model: RetroConfig | RetrievalLM,
    tc: TrainConfig,
    dataset_dir: str | os.PathLike[str],
    valid_dir: str | os.PathLike[str] | None,
    verify: bool,
    progress: bool,
) -> tuple[RetroConfig, bool, int, Dataset, RetroDataset | None]:
    """The model config (tokenizer filled in), retrieval on/off, k, and the two splits.

    Verifies the bytes first (each file read once), peeks at the metadata to resolve k, then opens
    the splits. Every rank verifies (a rank that skipped would wait forever for one that failed).
    """
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
    if verify:
        for d in (dataset_dir, valid_dir):
            if d is not None:
                verify_dataset(d, progress=progress)
    else:
        logger.warning("%s: sha256 verification skipped (--no-verify)", dataset_dir)
    meta = RetroDataset(dataset_dir, tc.seq_chunks)
    if retrieval and tc.num_neighbours is None:
        k = min(k, meta.k)
    check_compatible(cfg, meta, retrieval, k)
    if isinstance(model_config_or_model, RetroConfig) and cfg.tokenizer_id is None:
        cfg = dataclasses.replace(cfg, tokenizer_id=meta.tokenizer_id, pad_id=meta.pad_id)
    train_ds, valid_ds = _splits(cfg, tc, dataset_dir, valid_dir, retrieval, k)
    return cfg, retrieval, k, train_ds, valid_ds


def _splits(
    cfg: RetroConfig,
    tc: TrainConfig,
    dataset_dir: str | os.PathLike[str],
    valid_dir: str | os.PathLike[str] | None,
    retrieval: bool,
    k: int,
) -> tuple[Dataset, RetroDataset | None]:
    """The training split (``tc.sequences`` of it, if given) and the validation split or None."""
    k_read = k if retrieval else 0
    if valid_dir is not None:
        train_ds = RetroDataset(dataset_dir, tc.seq_chunks, num_neighbours=k_read)
        valid_ds: RetroDataset | None = RetroDataset(
            valid_dir, tc.seq_chunks, num_neighbours=k_read
        )
        check_compatible(cfg, valid_ds, retrieval, k)
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
    return train_ds, valid_ds


def _check_same_start(out: Path, at: Progress, device: torch.device) -> None:
    """Every rank must start from the same point: a checkpoint seen by rank 0 only (out_dir not
    on a shared filesystem) would silently desynchronise the data order and optimizer."""
    lo = all_reduce([at.step, at.samples_seen], torch.int64, device, dist.ReduceOp.MIN)
    hi = all_reduce([at.step, at.samples_seen], torch.int64, device, dist.ReduceOp.MAX)
    if lo != hi:
        raise TrainError(
            f"{out}: the ranks start at different steps ({lo[0]}..{hi[0]}); every rank must "
            "see the same out_dir and checkpoint (use a shared filesystem)"
        )


def _start_metrics(out: Path, tc: TrainConfig, step: int) -> None:
    """Write train_config.json; start metrics.jsonl, or cut it back to the resumed step."""
    metrics_path = out / "metrics.jsonl"
    write_json(out / "train_config.json", tc.to_dict())
    if step == 0:
        metrics_path.write_text("", encoding="utf-8")
    elif metrics_path.exists():  # drop lines logged after the checkpoint we resume from
        kept = [
            line
            for line in metrics_path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        metrics_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _train_batches(
    train_ds: Dataset, tc: TrainConfig, samples_seen: int, dist_: DistInfo | None
) -> Any:
    """The endless iterator of this rank's training micro-batches, from sample ``samples_seen``."""
    rank, world = (0, 1) if dist_ is None else (dist_.rank, dist_.world_size)
    sampler = BatchSampler(
        len(train_ds), tc.batch_size, tc.seed, start=samples_seen, rank=rank, world_size=world
    )
    loader_gen = torch.Generator().manual_seed(tc.seed)  # keeps DataLoader off the global RNG
    return iter(
        DataLoader(
            train_ds, batch_sampler=sampler, num_workers=tc.num_workers, generator=loader_gen
        )
    )


def _valid_loader(
    valid_ds: RetroDataset | None, tc: TrainConfig, dist_: DistInfo | None
) -> DataLoader | None:
    """The validation batches in a fixed order (this rank's shard of them), or None."""
    if valid_ds is None:
        return None
    if dist_ is not None:
        # Sharded validation: the sequences a single process would evaluate, split over the ranks;
        # the loss sums and token counts are all-reduced, so the value is the single-process one.
        n_eval = min(len(valid_ds), tc.eval_batches * tc.batch_size)
        valid_ds = Subset(  # type: ignore[assignment]
            valid_ds, list(range(dist_.rank, n_eval, dist_.world_size))
        )
    return DataLoader(
        valid_ds,
        batch_size=tc.batch_size,
        shuffle=False,
        num_workers=0,
        generator=torch.Generator().manual_seed(tc.seed),
    )


def _loop(run: _Run) -> dict[str, Any]:
    """Steps until ``run.end_step``, evaluating, logging and checkpointing; the final metrics."""
    at, tc = run.at, run.tc
    run.t0 = time.perf_counter()
    bar = tqdm(
        total=run.end_step,
        initial=at.step,
        disable=not (run.progress and run.is_main),
        desc="train",
        unit="step",
    )
    metrics = run.out / "metrics.jsonl"
    log_ctx = open(metrics, "a", encoding="utf-8") if run.is_main else contextlib.nullcontext(None)
    with log_ctx as log:
        while at.step < run.end_step:
            lr, grad_norm, step_tokens = _step(run)
            _after_step(run, log, lr, grad_norm, step_tokens)
            bar.update(1)
            bar.set_postfix(loss=f"{at.last_loss:.4f}", lr=f"{lr:.2e}")
    bar.close()
    final = {
        "step": at.step,
        "loss": at.last_loss,
        "val_loss": at.last_val,
        "tokens_total": at.tokens_total,
        "elapsed": at.elapsed_before + time.perf_counter() - run.t0,
        "checkpoint": None if at.checkpoint is None else str(at.checkpoint),
        "num_parameters": run.model.num_parameters(),
        "retrieval": run.retrieval,
        "finished": at.step >= tc.steps,
    }
    if run.is_main:
        write_json(run.out / "final_metrics.json", final)
    if run.dist is not None:
        dist.barrier()  # every rank returns once rank 0's final checkpoint and metrics exist
    return final


def _step(run: _Run) -> tuple[float, float, int]:
    """One optimizer step over ``grad_accum`` micro-batches: (lr, grad norm, real tokens)."""
    at, tc = run.at, run.tc
    micro = [to_device(next(run.train_iter), run.device) for _ in range(tc.grad_accum)]
    if tc.loss_share < 1.0:
        micro = [
            sample_positions(
                b, tc.loss_share, run.first_pos, tc.seed * 1_000_003 + at.step * 131 + i
            )
            for i, b in enumerate(micro)
        ]
    if tc.negative_share > 0.0:
        micro = [
            swap_neighbours(b, tc.negative_share, tc.seed * 999_983 + at.step * 137 + i)
            for i, b in enumerate(micro)
        ]
    at.samples_seen += tc.batch_size * tc.grad_accum  # global: every rank's share together
    step_tokens = sum(int(b["loss_mask"].sum()) for b in micro)
    if run.ddp is not None:  # the loss is the mean over the real tokens of ALL ranks
        step_tokens = int(all_reduce([step_tokens], torch.int64, run.device)[0])
    lr = lr_at(at.step, tc)
    for g in run.optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    run.optimizer.zero_grad(set_to_none=True)
    loss_total = _backward(run, micro, step_tokens)
    max_norm = tc.grad_clip if tc.grad_clip else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, max_norm))
    run.optimizer.step()
    at.step += 1
    at.tokens_total += step_tokens
    at.last_loss = loss_total / step_tokens if step_tokens else float("nan")
    return lr, grad_norm, step_tokens


def _backward(run: _Run, micro: list[dict[str, torch.Tensor]], step_tokens: int) -> float:
    """Gradients of the mean loss over the step's real tokens; returns the summed loss."""
    tc, loss_total = run.tc, 0.0
    if run.ddp is None:
        for b in micro:  # each micro-batch's share of the mean over the step's real tokens
            loss_sum, n = _loss_sum(run.model, b, run.retrieval, tc.bf16)
            if n:
                (loss_sum / step_tokens).backward()
                loss_total += float(loss_sum.detach())
        return loss_total
    if not step_tokens:
        return loss_total
    # DDP averages gradients over the W ranks; scaling each rank's token sum by W / (all ranks'
    # tokens) makes that average the single-process gradient sum_ranks grad(loss sum) /
    # step_tokens. Every rank runs every micro-batch (even one without real tokens) so that the
    # gradient all-reduce sees all ranks; it runs once per step, after the last micro-batch
    # (no_sync before it).
    scale = run.dist.world_size / step_tokens
    for i, b in enumerate(micro):
        last_micro = i == len(micro) - 1
        with contextlib.nullcontext() if last_micro else run.ddp.no_sync():
            loss_sum, _ = _loss_sum(
                run.model, b, run.retrieval, tc.bf16, runner=run.ddp, always_forward=True
            )
            (loss_sum * scale).backward()
        loss_total += float(loss_sum.detach())
    return float(all_reduce([loss_total], torch.float64, run.device)[0])


def _after_step(
    run: _Run, log: IO[str] | None, lr: float, grad_norm: float, step_tokens: int
) -> None:
    """Evaluate, log a metrics line and checkpoint, each when this step is due."""
    at, tc = run.at, run.tc
    record: dict[str, Any] | None = None
    if at.step % tc.log_every == 0 or at.step == run.end_step:
        record = {}
    if run.valid_loader is not None and (
        (tc.eval_every and at.step % tc.eval_every == 0) or at.step == tc.steps
    ):
        at.last_val = _validate(run)
        record = {} if record is None else record
        record["val_loss"] = at.last_val
    if record is not None and log is not None:
        record = {
            "step": at.step,
            "loss": at.last_loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": step_tokens,
            "tokens_total": at.tokens_total,
            "elapsed": round(at.elapsed_before + time.perf_counter() - run.t0, 4),
            **record,
        }
        log.write(json.dumps(finite(record), allow_nan=False) + "\n")
        log.flush()
    if (tc.checkpoint_every and at.step % tc.checkpoint_every == 0) or at.step == run.end_step:
        if run.is_main:
            at.checkpoint = save_run_checkpoint(
                run.out, run.model, run.optimizer, _scalars(run), tc.keep_checkpoints
            )
        else:
            at.checkpoint = run.out / "checkpoints" / f"step_{at.step:08d}"


def _validate(run: _Run) -> float:
    """Token-weighted mean validation loss (over all ranks' shards), NaN without tokens."""
    tc = run.tc
    total, count = _evaluate_sums(
        run.model, run.valid_loader, tc.eval_batches, run.retrieval, tc.bf16, run.device
    )
    if run.dist is not None:
        total, count = all_reduce([total, count], torch.float64, run.device)
    return total / count if count else float("nan")


def _scalars(run: _Run) -> dict[str, Any]:
    """What a checkpoint's training_state.json records of the run."""
    at = run.at
    return {
        "step": at.step,
        "samples_seen": at.samples_seen,
        "tokens_total": at.tokens_total,
        "elapsed": at.elapsed_before + time.perf_counter() - run.t0,
        "loss": at.last_loss,
        "val_loss": at.last_val,
        "train_config": run.tc.to_dict(),
    }
