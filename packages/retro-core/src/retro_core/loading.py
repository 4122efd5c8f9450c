"""One loader for both checkpoint kinds: a native :class:`~retro_core.model.Retro` checkpoint
(:func:`~retro_core.checkpoint.save_checkpoint`) or a retro-fitted one
(:func:`~retro_core.retrofit.save_retrofitted`). Evaluation code calls :func:`load_model` and
needs no branch of its own.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CONFIG_FILE, CheckpointError, load_checkpoint
from .retrofit import is_retrofit_checkpoint, load_retrofitted
from .train import latest_checkpoint

__all__ = ["load_model"]


def load_model(
    directory: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> nn.Module:
    """Load a checkpoint of either kind, in eval mode.

    A training run directory (holding ``checkpoints/latest.json``) resolves to its latest
    checkpoint. Returns a ``Retro`` or a ``RetrofittedLM`` (both take ``forward(tokens [B, n],
    neighbours [B, l, k, r], neighbour_lengths [B, l, k])``).

    Raises:
        CheckpointError / RetrofitError: one-line errors naming the file.
    """
    d = Path(directory)
    if (d / "checkpoints").is_dir() and not (d / CONFIG_FILE).is_file():
        if not is_retrofit_checkpoint(d):
            found = latest_checkpoint(d)
            if found is None:
                raise CheckpointError(f"{d}: a training run without a complete checkpoint")
            d = found
    if is_retrofit_checkpoint(d):
        return load_retrofitted(d, map_location=map_location)
    return load_checkpoint(d, map_location=map_location)
