"""Model checkpoints: a directory with ``config.json`` and ``model.safetensors`` (no pickle).

Layout::

    directory/
      config.json        {"format": "retro-checkpoint", "version": 1, "config": {RetroConfig},
                          "extra": {...} | null}
      model.safetensors  the state dict (the tied output projection is not stored separately)

Both files are written to temporary names, fsynced and renamed into place (``model.safetensors``
first, ``config.json`` last), so a reader never sees a half-written file under the final name.

``config.json`` also holds ``"integrity": {"weights_sha256", "meta_sha256"}``: the sha256 of the
weights file's bytes and of the canonical JSON of the rest of ``config.json``. Loading verifies
both (``verify=False`` skips it), so a flipped byte in the weights or an edited config is refused
with one line naming the file. Checkpoints written before this field existed load with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_path, atomic_write_text, sha256_file
from .config import RetroConfig
from .model import Retro

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "check_integrity",
    "integrity_record",
    "load_checkpoint",
    "read_checkpoint_config",
    "save_checkpoint",
    "write_weights_and_meta",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "retro-checkpoint"
CHECKPOINT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, corrupt, or does not match its config."""


def _meta_sha256(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "integrity"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def integrity_record(meta: dict[str, Any], weights: str | os.PathLike) -> dict[str, str]:
    """``{"weights_sha256", "meta_sha256"}`` of a weights file and its JSON metadata (sans this)."""
    return {"weights_sha256": sha256_file(Path(weights)), "meta_sha256": _meta_sha256(meta)}


def check_integrity(
    meta: dict[str, Any],
    meta_path: str | os.PathLike,
    weights: str | os.PathLike,
    error: type[ValueError],
) -> None:
    """Raise ``error`` unless the metadata and weights match ``meta["integrity"]``.

    A checkpoint without the record (written before it existed) is accepted with a warning.
    """
    rec = meta.get("integrity")
    if rec is None:
        logger.warning("%s: no integrity record (an older checkpoint); not verified", meta_path)
        return
    if not isinstance(rec, dict) or not all(
        isinstance(rec.get(k), str) for k in ("weights_sha256", "meta_sha256")
    ):
        raise error(f'{meta_path}: "integrity" must hold "weights_sha256" and "meta_sha256"')
    if _meta_sha256(meta) != rec["meta_sha256"]:
        raise error(
            f"{meta_path}: contents differ from the recorded meta_sha256 "
            f"{rec['meta_sha256'][:12]} (the config was edited or corrupted)"
        )
    got = sha256_file(Path(weights))
    if got != rec["weights_sha256"]:
        raise error(
            f"{weights}: sha256 {got[:12]} differs from {rec['weights_sha256'][:12]} recorded in "
            f"{meta_path} (corrupted or replaced weights)"
        )


def write_weights_and_meta(
    weights: Path,
    meta_path: Path,
    state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    not_json: ValueError,
) -> None:
    """The writer of both checkpoint kinds: the weights (safetensors, ``meta["format"]`` in its
    header), then the JSON metadata with their :func:`integrity_record`, each atomically.

    Raises ``not_json`` (its message, then the reason) before writing anything when ``meta`` is
    not JSON-serialisable.
    """
    try:
        json.dumps(meta, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise type(not_json)(f"{not_json}: {e}") from e
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": meta["format"]})
        meta["integrity"] = integrity_record(meta, tmp)
    text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False)
    atomic_write_text(meta_path, text + "\n")


def save_checkpoint(
    model: Retro, directory: str | os.PathLike, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` (its config and weights) to ``directory`` (created if needed).

    Args:
        model: the model to save.
        directory: the checkpoint directory; existing checkpoint files there are replaced.
        extra: optional JSON-serialisable metadata (e.g. training step, metrics).

    Returns:
        The directory as a Path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": model.config.to_dict(),
        "extra": extra,
    }
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_weights_and_meta(
        directory / WEIGHTS_FILE,
        directory / CONFIG_FILE,
        state,
        meta,
        CheckpointError("save_checkpoint: extra metadata is not JSON-serialisable"),
    )
    logger.info("saved checkpoint to %s (%d tensors)", directory, len(state))
    return directory


def read_versioned_config(
    path: Path, fmt: str, version: int, writer: str, error: type[ValueError]
) -> tuple[dict[str, Any], RetroConfig]:
    """Read a checkpoint's JSON metadata and its ``config``: (metadata, RetroConfig).

    Checks that the file exists, is a JSON object with ``"format": fmt`` and ``"version": version``,
    and holds a valid RetroConfig; otherwise raises ``error`` with one line naming the file.
    """
    if not path.is_file():
        raise error(f"{path}: missing (expected a checkpoint written by {writer})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise error(f'{path}: expected an object with "format": "{fmt}"')
    if meta.get("version") != version:
        raise error(f"{path}: unsupported version {meta.get('version')!r} (expected {version})")
    try:
        config = RetroConfig.from_dict(meta.get("config"))
    except (TypeError, ValueError) as e:
        raise error(f'{path}: invalid "config": {e}') from e
    return meta, config


def read_checkpoint_config(
    directory: str | os.PathLike, verify: bool = False
) -> tuple[RetroConfig, dict[str, Any] | None]:
    """Read and validate ``config.json``; returns (config, extra metadata).

    With ``verify``, also check the integrity record (config and weights sha256).
    """
    path = Path(directory) / CONFIG_FILE
    meta, config = read_versioned_config(
        path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "save_checkpoint", CheckpointError
    )
    if verify:
        weights = Path(directory) / WEIGHTS_FILE
        if not weights.is_file():
            raise CheckpointError(f"{weights}: missing (expected the weights beside {CONFIG_FILE})")
        check_integrity(meta, path, weights, CheckpointError)
    extra = meta.get("extra")
    if extra is not None and not isinstance(extra, dict):
        raise CheckpointError(
            f'{path}: "extra" must be an object or null, got {type(extra).__name__}'
        )
    return config, extra


def load_checkpoint(
    directory: str | os.PathLike, map_location: str | torch.device = "cpu", verify: bool = True
) -> Retro:
    """Load a model saved by :func:`save_checkpoint`; the returned model is in eval mode.

    The extra metadata is available as ``model.checkpoint_extra``.

    Args:
        directory: the checkpoint directory.
        map_location: device of the loaded tensors.
        verify: check the recorded sha256 of the weights file and of ``config.json`` first.

    Raises:
        CheckpointError: missing files, bad JSON, a weights file or config whose sha256 differs
            from the record, or tensors whose names/shapes do not match the config, with a
            one-line message naming the file and what was expected.
    """
    directory = Path(directory)
    config, extra = read_checkpoint_config(directory, verify=verify)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (expected the weights beside {CONFIG_FILE})")
    try:
        state = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    model = Retro(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: tensors do not match {CONFIG_FILE} (cca_layers={config.cca_layers}): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, want in expected.items():
        got = state[name]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(got.shape)}, expected "
                f"{tuple(want.shape)} from {CONFIG_FILE}"
            )
        if not got.is_floating_point():
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {got.dtype}, expected a float"
            )
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())
    model.load_state_dict(state, strict=True)
    model.to(map_location)
    model.checkpoint_extra = extra
    model.eval()
    logger.info("loaded checkpoint %s", directory)
    return model
