"""Model arguments of every retro-eval command: a training run directory, a checkpoint directory or
a retro-fitted checkpoint, all opened by ``retro_core.load_model``.

A training run directory (what ``retro-train --out RUN`` writes: ``RUN/checkpoints/...``) resolves
to its latest complete checkpoint, and the one chosen is logged, so a report always says which
weights it scored.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["load_eval_model", "resolve_checkpoint"]


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The checkpoint directory ``retro_core.load_model(path)`` opens (logged when ``path`` is a
    training run directory and resolves to its latest checkpoint).

    Raises:
        CheckpointError: no such directory, or a run directory without a complete checkpoint.
    """
    from retro_core.checkpoint import CheckpointError
    from retro_core.retrofit import is_retrofit_checkpoint
    from retro_core.train import latest_checkpoint

    d = Path(path)
    if not d.exists():
        raise CheckpointError(
            f"{d}: no such checkpoint (expected a training run directory, a checkpoint directory "
            "or a retro-fitted checkpoint)"
        )
    if (d / "checkpoints").is_dir() and not (d / "config.json").is_file():
        if not is_retrofit_checkpoint(d):
            found = latest_checkpoint(d)
            if found is None:
                raise CheckpointError(f"{d}: a training run without a complete checkpoint")
            logger.info("%s: a training run directory; using its latest checkpoint %s", d, found)
            return found
    return d


def load_eval_model(path: str | os.PathLike[str], map_location: Any = "cpu") -> Any:
    """Load a model for evaluation (eval mode) from a run directory, a checkpoint or a
    retro-fitted checkpoint (``retro_core.load_model``), logging which checkpoint it is."""
    from retro_core.loading import load_model

    ckpt = resolve_checkpoint(path)
    model = load_model(ckpt, map_location=map_location).eval()
    logger.info("loaded %s from %s", type(model).__name__, ckpt)
    return model
