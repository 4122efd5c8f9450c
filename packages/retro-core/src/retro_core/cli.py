"""``retro-train``: train RETRO (or its matched baseline) on a training dataset directory.

A thin argparse layer over :func:`retro_core.train.train`; every option maps to a
:class:`~retro_core.train.TrainConfig` field or to the model config. Examples::

    retro-train --data runs/wiki-ds --out runs/retro-tiny --preset tiny --steps 2000
    retro-train --data runs/wiki-ds --out runs/base-tiny --preset tiny --baseline --steps 2000
    retro-train --data runs/wiki-ds --out runs/retro-tiny --resume          # continue a run
    retro-train --data runs/gpt2-ds --out runs/gpt2-retrofit --retrofit models/gpt2 --steps 500

Data parallel (DistributedDataParallel; --batch-size is the GLOBAL micro-batch, split over the
processes)::

    torchrun --standalone --nproc_per_node 2 $(which retro-train) --data ... --out ... --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .cliutil import OneLineParser as _Parser
from .cliutil import UsageError as _UsageError
from .cliutil import int_arg as _int
from .cliutil import one_line as _one_line

__all__ = ["build_parser", "main"]


# CLI flag -> TrainConfig field (flags default to None so that only given ones override).
_TRAIN_FLAGS: dict[str, str] = {
    "steps": "steps",
    "batch_size": "batch_size",
    "grad_accum": "grad_accum",
    "lr": "lr",
    "min_lr": "min_lr",
    "warmup_steps": "warmup_steps",
    "weight_decay": "weight_decay",
    "grad_clip": "grad_clip",
    "seed": "seed",
    "seq_chunks": "seq_chunks",
    "k": "num_neighbours",
    "eval_every": "eval_every",
    "eval_batches": "eval_batches",
    "valid_fraction": "valid_fraction",
    "checkpoint_every": "checkpoint_every",
    "keep_checkpoints": "keep_checkpoints",
    "log_every": "log_every",
    "num_workers": "num_workers",
    "device": "device",
}


# Over 80 lines: one flat add_argument per option (the --help text); nothing to factor out.
def build_parser() -> argparse.ArgumentParser:
    """The ``retro-train`` argument parser."""
    p = _Parser(
        prog="retro-train",
        description=(
            "Train a RETRO model (Borgeaud et al., 2021) or its matched decoder-only baseline on a "
            "training dataset directory (manifest.json + .npy arrays, written by `retro-db "
            "neighbours`). Writes metrics.jsonl, checkpoints/ and final_metrics.json to --out."
        ),
        epilog=(
            "The model size comes from --preset or --config; vocabulary, chunk size m, k, r, pad id "
            "and tokenizer id always come from the dataset. --retrofit DIR instead freezes a "
            "pretrained Hugging Face causal LM (GPT-2 or Llama family; needs retro-core[hf]) and "
            "trains only new CCA layers and a neighbour encoder; the dataset must be built with "
            "that model's tokenizer."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = p.add_argument_group("data and output")
    io.add_argument("--data", required=True, type=Path, help="training dataset directory")
    io.add_argument(
        "--valid-data",
        type=Path,
        default=None,
        help="separate validation dataset (default: hold out --valid-fraction of --data's documents)",
    )
    io.add_argument("--out", required=True, type=Path, help="run directory (metrics, checkpoints)")
    io.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in --out (model and training config default to "
        "the run's own)",
    )

    model = p.add_argument_group("model")
    size = model.add_mutually_exclusive_group()
    size.add_argument(
        "--preset",
        choices=["tiny", "small", "base"],
        default=None,
        help="model size preset (tiny: d=64, 4 layers; small: d=256, 6 layers; base: d=512, 12 "
        "layers, the paper's 12-layer shape). Default: tiny",
    )
    size.add_argument(
        "--config",
        type=Path,
        default=None,
        help="model config JSON: a full RetroConfig (with vocab_size) or some of its fields, the "
        "rest from the dataset",
    )
    model.add_argument(
        "--baseline",
        action="store_true",
        help="train the matched decoder-only baseline (no CCA layers, neighbours ignored)",
    )
    model.add_argument(
        "--no-retrieval",
        action="store_true",
        help="keep the RETRO architecture but train without neighbours (RETRO[OFF] training)",
    )

    rf = p.add_argument_group("RETRO-fitting a pretrained Hugging Face causal LM")
    rf.add_argument(
        "--retrofit",
        type=Path,
        default=None,
        metavar="HF_MODEL_DIR",
        help="freeze this model and train only new CCA layers + encoder (checkpoints hold the new "
        "weights and a hashed reference to the base)",
    )
    rf.add_argument("--gguf-file", default=None, help="GGUF file inside --retrofit (needs gguf)")
    rf.add_argument(
        "--tokenizer-dir",
        type=Path,
        default=None,
        help="HF tokenizer directory of the base model; its id must equal the dataset's "
        "(default: --retrofit when it holds tokenizer files, else the dataset's id is trusted)",
    )
    rf.add_argument(
        "--cca-layers",
        default=None,
        help="comma-separated 1-indexed base layers followed by CCA (default: 6, 9, 12, ...)",
    )
    rf.add_argument("--enc-layers", type=int, default=2, help="layers of the new encoder")
    rf.add_argument("--enc-d-model", type=int, default=None, help="encoder width (default: d)")
    rf.add_argument(
        "--enc-n-heads", type=int, default=None, help="encoder heads (default: d' / head size)"
    )
    rf.add_argument(
        "--cca-from-base",
        action="store_true",
        help="CCA starts as copies of the base's own induction-head layers and reads the "
        "neighbours as the frozen base encodes them (Llama family; default P from the heads)",
    )
    rf.add_argument(
        "--induction-threshold",
        type=float,
        default=0.4,
        help="with --cca-from-base: the induction score a head needs to start open",
    )

    t = p.add_argument_group("training (defaults: TrainConfig)")
    t.add_argument("--train-config", type=Path, default=None, help="TrainConfig JSON; flags win")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (cosine ends here)")
    t.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="B, sequences per micro-batch; under torchrun the GLOBAL micro-batch, split evenly "
        "over the WORLD_SIZE processes (so it must be divisible by WORLD_SIZE)",
    )
    t.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate")
    t.add_argument("--min-lr", type=float, default=None, help="final learning rate")
    t.add_argument("--warmup-steps", type=int, default=None)
    t.add_argument("--weight-decay", type=float, default=None)
    t.add_argument("--grad-clip", type=float, default=None, help="max grad norm (0 = off)")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--seq-chunks", type=int, default=None, help="l, chunks per sequence (n = l*m)")
    t.add_argument("--k", type=int, default=None, help="neighbours per chunk (<= the dataset's k)")
    t.add_argument("--eval-every", type=int, default=None, help="steps between validations")
    t.add_argument("--eval-batches", type=int, default=None, help="micro-batches per validation")
    t.add_argument("--valid-fraction", type=float, default=None)
    t.add_argument("--checkpoint-every", type=int, default=None)
    t.add_argument("--keep-checkpoints", type=int, default=None)
    t.add_argument("--log-every", type=int, default=None, help="steps between metrics.jsonl lines")
    t.add_argument("--bf16", action="store_true", default=None, help="bfloat16 autocast")
    t.add_argument("--num-workers", type=int, default=None, help="DataLoader workers")
    t.add_argument("--device", default=None, help="torch device (cpu, cuda)")
    t.add_argument(
        "--stop-after",
        type=_int(1),
        default=None,
        help="pause after this many steps (resume later)",
    )
    t.add_argument("--threads", type=_int(1, 1024), default=None, help="torch CPU threads")
    t.add_argument(
        "--dist-backend",
        default=None,
        help="torch.distributed backend under torchrun (default: nccl on CUDA, gloo on CPU)",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the sha256 verification of --data and --valid-data before training (each file "
        "is read once; the cheap checks of every open, token ids in the vocabulary, still run)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read {what} ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object ({what})")
    return obj


def _is_retrofit(checkpoint: Path) -> bool:
    from .retrofit import is_retrofit_checkpoint

    return is_retrofit_checkpoint(checkpoint)


def _retrofit_model(args: argparse.Namespace, tc: Any, existing: Path | None) -> Any:
    """The RetrofittedLM to train: from the flags and the dataset, or as the resumed run built it."""
    from .data import RetroDataset
    from .retrofit import hf_tokenizer_id, read_retrofit_config, retrofit

    log = logging.getLogger("retro_core.cli")
    if existing is not None and _is_retrofit(existing):  # rebuild exactly the resumed model
        c, base, _ = read_retrofit_config(existing)
        path = args.retrofit or Path(base["path"])
        gguf = args.gguf_file or base.get("gguf_file")
        kw: dict[str, Any] = dict(
            cca_layers=c.cca_layers,
            k=c.num_neighbours,
            chunk_size=c.chunk_size,
            neighbour_len=c.neighbour_len,
            enc_layers=c.enc_layers,
            enc_d_model=c.enc_d_model,
            enc_n_heads=c.enc_n_heads,
            dropout=c.dropout,
            pad_id=c.pad_id,
            tokenizer_id=c.tokenizer_id,
            cca_from_base=c.cca_from_base,
            cca_heads=c.cca_heads,
        )
    else:
        ds = RetroDataset(args.data, tc.seq_chunks)
        path, gguf = args.retrofit, args.gguf_file
        tok_id = hf_tokenizer_id(args.tokenizer_dir or path)
        if tok_id is None and args.tokenizer_dir is not None:
            raise ValueError(f"--tokenizer-dir {args.tokenizer_dir}: no tokenizer files found")
        if tok_id is None:
            log.warning(
                "%s has no tokenizer files: trusting the dataset's tokenizer id %r (pass "
                "--tokenizer-dir to check it)",
                path,
                ds.tokenizer_id,
            )
            tok_id = ds.tokenizer_id
        cca = None
        if args.cca_layers:
            try:
                cca = tuple(int(x) for x in args.cca_layers.split(","))
            except ValueError:
                raise ValueError(
                    f"--cca-layers: expected comma-separated ints, got {args.cca_layers!r}"
                ) from None
        kw = dict(
            cca_layers=cca,
            k=ds.k,
            chunk_size=ds.chunk_size,
            neighbour_len=ds.r,
            enc_layers=args.enc_layers,
            enc_d_model=args.enc_d_model,
            enc_n_heads=args.enc_n_heads,
            pad_id=ds.pad_id,
            tokenizer_id=tok_id,
            cca_from_base=args.cca_from_base,
            induction_threshold=args.induction_threshold,
        )
    return retrofit(path, gguf_file=gguf, seed=tc.seed, **kw)


def _unusable_device(device: str) -> str | None:
    """One line when ``--device`` cannot be used here (e.g. cuda on a CPU-only build), else None."""
    import torch

    try:
        dev = torch.device(device)
        if dev.type not in ("cpu", "cuda"):
            raise ValueError("expected cpu or cuda[:N]")
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, ValueError) as e:
        return _one_line(f"--device {device}: not usable here ({e})")
    return None


def _train_config(args: argparse.Namespace, existing: Path | None) -> Any:
    """The TrainConfig: defaults <- the run's own (when resuming) <- --train-config <- flags."""
    from .train import TrainConfig

    tc_fields: dict[str, Any] = {}
    if existing is not None and (args.out / "train_config.json").is_file():
        tc_fields.update(_read_json(args.out / "train_config.json", "the run's TrainConfig"))
    if args.train_config is not None:
        tc_fields.update(_read_json(args.train_config, "a TrainConfig"))
    for flag, name in _TRAIN_FLAGS.items():
        v = getattr(args, flag)
        if v is not None:
            tc_fields[name] = v
    if args.bf16:
        tc_fields["bf16"] = True
    if args.grad_clip == 0:
        tc_fields["grad_clip"] = None
    if args.no_retrieval or args.baseline:
        tc_fields["retrieval"] = False
    return TrainConfig.from_dict(tc_fields)


def _model_config(args: argparse.Namespace, tc: Any, existing: Path | None) -> Any:
    """The model: --retrofit, --config / --preset, or the checkpoint's when resuming without."""
    from .checkpoint import read_checkpoint_config
    from .config import RetroConfig
    from .data import RetroDataset
    from .train import model_config_for_dataset

    if args.retrofit is not None or (existing is not None and _is_retrofit(existing)):
        if args.preset or args.config or args.baseline:
            raise ValueError("--retrofit cannot be combined with --preset, --config, --baseline")
        return _retrofit_model(args, tc, existing)
    elif existing is not None and args.config is None and args.preset is None:
        return read_checkpoint_config(existing)[0]
    else:
        ds = RetroDataset(args.data, tc.seq_chunks)
        if args.config is not None:
            fields = _read_json(args.config, "a model config")
            cfg = (
                RetroConfig.from_dict(fields)
                if "vocab_size" in fields
                else model_config_for_dataset(ds, fields)
            )
        else:
            cfg = model_config_for_dataset(ds, args.preset or "tiny")
        return cfg.baseline() if args.baseline else cfg


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``retro-train`` console script; returns the exit code (0 ok, 2 error).

    Every error, a bad command line included, is one line ``retro-train: error: ...`` on stderr
    and exit code 2.
    """
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as e:
        print(f"retro-train: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    if args.device is not None and (msg := _unusable_device(args.device)):
        print(f"retro-train: error: {msg}", file=sys.stderr)
        return 2
    # Under torchrun only rank 0 logs at INFO, prints and shows the progress bar.
    rank = int(os.environ.get("RANK", "0") or 0)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(
        level=level if rank == 0 else max(level, logging.WARNING),
        format=(f"[rank {rank}] " if world > 1 else "")
        + "%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    import torch

    from .checkpoint import CheckpointError
    from .data import DatasetFormatError
    from .train import TrainError, latest_checkpoint, train

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        existing = latest_checkpoint(args.out) if args.resume else None
        tc = _train_config(args, existing)
        cfg = _model_config(args, tc, existing)
        final = train(
            cfg,
            tc,
            args.data,
            args.out,
            valid_dir=args.valid_data,
            resume=args.resume,
            stop_after=args.stop_after,
            progress=not args.no_progress,
            dist_backend=args.dist_backend,
            verify=not args.no_verify,
        )
    except (DatasetFormatError, TrainError, CheckpointError, ValueError, OSError) as e:
        where = f" (rank {rank})" if world > 1 else ""
        msg = _one_line(str(e)) or type(e).__name__
        print(f"retro-train: error{where}: {msg}", file=sys.stderr)
        return 2
    del final  # printed from the file, where NaN is written as null
    if rank != 0:
        return 0
    print((args.out / "final_metrics.json").read_text(encoding="utf-8"), end="")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
