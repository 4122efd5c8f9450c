"""Data parallel training: joining a torch.distributed job, all-reducing numbers, wrapping in DDP.

:func:`~retro_core.train.train` runs data parallel under ``torchrun`` (or inside an initialised
process group); see the module docstring of :mod:`retro_core.train` for how batches, losses and
validation are shared over the ranks.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .train_config import TrainError

__all__ = ["DistInfo", "all_reduce", "env_int", "setup_distributed", "wrap_ddp"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torch.distributed job."""

    rank: int
    world_size: int
    created: bool  # train() initialised the process group and destroys it at the end


def env_int(name: str, default: int) -> int:
    """An int environment variable (torchrun's RANK, WORLD_SIZE ...), ``default`` when unset."""
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise TrainError(
            f"environment variable {name}={value!r}: expected an int (torchrun sets it)"
        ) from None


def setup_distributed(
    device: torch.device, backend: str | None
) -> tuple[DistInfo | None, torch.device]:
    """Join the data-parallel job, if any: an initialised process group, or torchrun's variables.

    Returns None (single process, nothing initialised) when no process group exists and
    WORLD_SIZE is unset or 1. A device "cuda" without an index becomes cuda:LOCAL_RANK.
    Raises TrainError when WORLD_SIZE > 1 but torchrun's other variables are missing.
    """
    initialised = dist.is_available() and dist.is_initialized()
    if not initialised and env_int("WORLD_SIZE", 1) <= 1:
        return None, device
    if not dist.is_available():
        raise TrainError(
            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')}: this torch build has no torch.distributed"
        )
    if device.type == "cuda" and device.index is None:
        local = env_int("LOCAL_RANK", -1)  # torchrun; else the caller's torch.cuda.set_device
        device = torch.device("cuda", local if local >= 0 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if initialised:
        return DistInfo(dist.get_rank(), dist.get_world_size(), created=False), device
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
    return DistInfo(dist.get_rank(), dist.get_world_size(), created=True), device


def all_reduce(
    values: list[float | int], dtype: torch.dtype, device: torch.device, op: Any = None
) -> list[Any]:
    """Element-wise sum (or ``op``) of a short list of numbers over all ranks."""
    t = torch.tensor(values, dtype=dtype, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)
    return t.tolist()


def wrap_ddp(model: nn.Module, device: torch.device, find_unused: bool) -> DistributedDataParallel:
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
