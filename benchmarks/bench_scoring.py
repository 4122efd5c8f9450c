"""Scoring speed of each row of the comparison table (issue 17): tokens/s side by side.

On the same evaluation tokens (Wikitext-mini test articles, GPT-2 BPE, m = 64), one run times:

- ``baseline``: the decoder-only model (``score_token_documents``, strided windows n, stride n/2);
- ``RETRO[OFF]`` and ``RETRO[ON]`` (k = 2 neighbours per chunk): RETRO of the demo's ``small``
  scale (d = 256, 6 layers, CCA at 3 and 6, a 2-layer encoder), n = 256 (4 chunks);
- ``kNN-LM`` on the baseline (``retro_eval.knnlm``): the paper's k = 1024 and lambda = 0.25, an
  exact faiss L2 index over a datastore of the database's text (its build rate is a separate
  figure: one LM pass over the database plus the index);
- ``in-context retrieval`` on the baseline (``retro_eval.incontext``): the nearest neighbour of
  the previous chunk prepended at every chunk boundary (one forward pass per chunk).

The weights are random (speed does not depend on their values); RETRO[ON], in-context retrieval
and kNN-LM's exclusion read the same neighbours, retrieved once beforehand from an in-memory
database of Wikitext-mini train text (retrieval is not timed: it is shared and measured by
``bench_search.py``). Each method is timed ``--repeats`` times (default 2) after a warm-up pass on
one document, in turns (all methods, then all again), and its best rate is kept: on a shared
machine the load moves between passes.

Usage: python benchmarks/bench_scoring.py --out results/scoring.json [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

M, N, K = 64, 256, 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if args.threads:
        import faiss

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)

    from retro_core import Retro, RetroConfig
    from retro_db.tokenizer import load_tokenizer
    from retro_eval.benchmarks import load_benchmark
    from retro_eval.incontext import score_incontext
    from retro_eval.knnlm import build_datastore, score_knnlm
    from retro_eval.perplexity import retrieve_document_neighbours, score_token_documents
    from retro_eval.testing import InMemoryRetriever

    tok = load_tokenizer(None)
    eval_docs, eval_chars = (3, 3000) if args.quick else (8, 6000)
    db_tokens = 30_000 if args.quick else 150_000
    test = load_benchmark("wikitext-mini", "test").documents[:eval_docs]
    docs = [tok.encode(d.text[:eval_chars]) for d in test]
    train, total = [], 0
    for d in load_benchmark("wikitext-mini", "train").documents:
        t = tok.encode(d.text)[: db_tokens - total]
        if not t:
            break
        train.append(t)
        total += len(t)
    db = InMemoryRetriever(train, chunk_size=M, tokenizer_id=tok.id, pad_id=tok.pad_id)
    neighbours = retrieve_document_neighbours(
        db, docs, chunk_size=M, k=K, pad_id=tok.pad_id, progress=False
    )
    cfg = dict(
        vocab_size=tok.vocab_size, d_model=256, n_heads=4, n_layers=6, enc_layers=2,
        chunk_size=M, max_seq_len=N, pad_id=tok.pad_id, tokenizer_id=tok.id,
    )  # fmt: skip
    torch.manual_seed(0)
    retro = Retro(RetroConfig(**cfg, cca_layers=(3, 6))).eval()
    baseline = Retro(RetroConfig(**cfg, cca_layers=())).eval()
    common = dict(decode=tok.decode, prefix_id=tok.eos_id, batch_size=4, progress=False)
    tokens = sum(len(d) for d in docs)

    t0 = time.perf_counter()
    store = build_datastore(baseline, train, prefix_id=tok.eos_id, batch_size=4, progress=False)
    build_s = time.perf_counter() - t0

    methods = {
        "baseline": lambda d, nb: score_token_documents(baseline, d, **common),
        "RETRO[OFF]": lambda d, nb: score_token_documents(retro, d, **common),
        "RETRO[ON]": lambda d, nb: score_token_documents(retro, d, neighbours=nb, **common),
        "kNN-LM": lambda d, nb: score_knnlm(baseline, d, store, ks=(1024,), **common),
        "in-context retrieval": lambda d, nb: score_incontext(baseline, d, nb, **common),
    }
    figures: dict[str, float] = {
        "evaluation tokens": tokens,
        "datastore entries": store.size,
        "kNN-LM datastore build (tokens/s)": store.size / build_s,
    }
    rates: dict[str, float] = {}
    for fn in methods.values():
        fn(docs[:1], neighbours[:1])  # warm-up
    for _ in range(max(1, args.repeats)):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn(docs, neighbours)
            rate = tokens / (time.perf_counter() - t0)
            rates[name] = max(rates.get(name, 0.0), rate)
            print(f"{name}: {rate:.0f} tokens/s", flush=True)
    for name, rate in rates.items():
        figures[f"{name} (tokens/s)"] = rate
    for name, r in rates.items():
        if name != "baseline":
            figures[f"{name} / baseline speed"] = r / rates["baseline"]
    notes = [
        f"{tokens} Wikitext-mini test tokens ({eval_docs} articles, first {eval_chars} "
        f"characters), windows n = {N}, stride {N // 2}, m = {M}; datastore over {store.size} "
        "Wikitext-mini train tokens (hidden state before the read-out -> next token, exact L2); "
        f"k = 1024 for kNN-LM, k = {K} for RETRO[ON], the nearest neighbour for in-context "
        "retrieval. Random weights of the demo's small scale; threads: "
        f"{torch.get_num_threads()}. No target: the figures are for the comparison table."
    ]
    out = {"name": "scoring", "figures": figures, "ratios": [], "notes": notes}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
