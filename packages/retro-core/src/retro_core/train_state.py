"""A training run's state on disk: checkpoints with the optimizer and RNG states, and resuming.

Layout of one checkpoint, ``out_dir/checkpoints/step_XXXXXXXX/``: the model's own files
(``config.json`` + ``model.safetensors`` from :mod:`retro_core.checkpoint`, or the retro-fit
files), ``training_state.safetensors`` (optimizer moments, RNG states) and
``training_state.json`` (step, sampler position, losses, optimizer scalars). Each checkpoint is
written to a temporary directory and renamed into place; ``checkpoints/latest.json`` then points
at it. Nothing is pickled.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_write_json
from .checkpoint import load_checkpoint, read_checkpoint_config, save_checkpoint
from .config import RetroConfig
from .interface import RetrievalLM
from .retrofit import (
    RetrofittedLM,
    is_retrofit_checkpoint,
    load_new_weights,
    read_retrofit_config,
    save_retrofitted,
)
from .train_config import TrainError

__all__ = [
    "STATE_JSON",
    "STATE_TENSORS",
    "STATE_VERSION",
    "Progress",
    "checkpoint_config",
    "finite",
    "latest_checkpoint",
    "load_training_state",
    "load_weights",
    "resume_point",
    "save_run_checkpoint",
    "save_training_state",
    "write_json",
]

logger = logging.getLogger(__name__)

STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
STATE_VERSION = 1


def finite(obj: Any) -> Any:
    """``obj`` with NaN/inf floats replaced by None (strict JSON has no NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as strict JSON (NaN/inf as null) to ``path``, atomically."""
    atomic_write_json(path, finite(obj), indent=2, allow_nan=False)


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


def save_training_state(
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
    write_json(directory / STATE_JSON, state)


def load_training_state(directory: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore the optimizer and the RNG states saved by :func:`save_training_state`; its JSON."""
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


def save_run_checkpoint(
    out_dir: Path,
    model: RetrievalLM,
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
        save_training_state(tmp, optimizer, scalars)
    except (OSError, SafetensorError) as e:  # disk full, file size limit, read-only
        raise _write_error(final, tmp, e) from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_json(ckpts / "latest.json", {"step": scalars["step"], "path": name})
    for old in sorted(p for p in ckpts.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint %s", final)
    return final


def checkpoint_config(path: Path) -> RetroConfig:
    """The model config of a checkpoint (a Retro one, or a retro-fit one)."""
    if is_retrofit_checkpoint(path):
        return read_retrofit_config(path)[0]
    return read_checkpoint_config(path)[0]


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a checkpoint's weights into the model being trained."""
    if isinstance(model, RetrofittedLM):  # the new weights only (base hash checked)
        load_new_weights(model, path)
    else:
        model.load_state_dict(load_checkpoint(path, map_location="cpu").state_dict())


@dataclass
class Progress:
    """Where a run stands: what :func:`resume_point` restores and each checkpoint records."""

    step: int = 0  # optimizer steps done
    samples_seen: int = 0  # global sequences drawn (the sampler's position)
    tokens_total: int = 0  # real tokens predicted so far
    elapsed_before: float = 0.0  # seconds spent before this process started
    last_loss: float = float("nan")  # the last step's training loss
    last_val: float = float("nan")  # the latest validation loss
    checkpoint: Path | None = None  # the latest checkpoint written or resumed from


def resume_point(
    out: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_config: dict[str, Any],
    resume: bool,
) -> Progress:
    """The :class:`Progress` to start from: the latest checkpoint in ``out`` when ``resume``.

    Loads the checkpoint's weights into ``model`` and its optimizer and RNG states. Refuses an
    ``out`` that holds checkpoints without ``resume``, and a checkpoint of another model config;
    warns when ``train_config`` changes the data order (batch_size, grad_accum, seed, seq_chunks).
    """
    existing = latest_checkpoint(out)
    if existing is not None and not resume:
        raise TrainError(
            f"{out}: holds checkpoints ({existing.name}); pass resume=True or use a new out_dir"
        )
    if existing is None:
        if resume:
            logger.info("resume requested but %s has no checkpoint: starting from scratch", out)
        return Progress()
    saved_cfg = checkpoint_config(existing)
    if saved_cfg.to_dict() != model.config.to_dict():
        diff = sorted(
            k for k, v in saved_cfg.to_dict().items() if model.config.to_dict().get(k) != v
        )
        raise TrainError(
            f"{existing}: config.json differs from the model being trained in {diff}; "
            "resume with the same model config"
        )
    load_weights(model, existing)
    state = load_training_state(existing, optimizer)
    saved_tc = state.get("train_config", {})
    for name in ("batch_size", "grad_accum", "seed", "seq_chunks"):
        if saved_tc.get(name) != train_config.get(name):
            logger.warning(
                "resuming with %s=%r but the checkpoint was trained with %r: the data order "
                "differs from an uninterrupted run",
                name,
                train_config.get(name),
                saved_tc.get(name),
            )
    logger.info("resumed from %s at step %d", existing, int(state["step"]))

    def number(key: str) -> float:  # NaN was written as null
        return float(state[key]) if state.get(key) is not None else float("nan")

    return Progress(
        step=int(state["step"]),
        samples_seen=int(state["samples_seen"]),
        tokens_total=int(state["tokens_total"]),
        elapsed_before=float(state["elapsed"]),
        last_loss=number("loss"),
        last_val=number("val_loss"),  # absent before the fix of issue 15: NaN, as then
        checkpoint=existing,
    )
