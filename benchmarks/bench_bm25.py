"""BM25 database keys against MiniLM keys (issue 17): ``build_database`` chunks/s, side by side.

The same real documents (retro-eval's shipped packs by default, ``--data DIR`` for the raw text
folder; see ``_corpus.py``) are built twice, in this process, one after the other: with
``keys="bm25"`` (chunks detokenised and indexed by ``bm25s``, no encoder) and with the default
frozen-BERT keys (all-MiniLM-L6-v2 through ``ChunkEmbedder``, loaded and warmed up before the clock
starts, faiss and torch on ``--threads`` threads). Both builds tokenise and chunk the same way (the
GPT-2 tokenizer, m = 64), so the difference is the keys: BM25 terms + a sparse index against
encoder forward passes + a faiss index. Also reported: bytes per chunk of each database's keys and
index files, and retrieval queries/s (k = 2, the database's own chunks as queries, detokenised and
keyed the way ``Database.retrieve`` keys them).

Usage: python benchmarks/bench_bm25.py [--quick] [--out PATH] [--chunks N] [--threads T] [--data DIR]
(``--quick``: 300 chunks, for a smoke run on a shared machine; default 4000.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import _corpus
import numpy as np

HERE = Path(__file__).resolve().parent
KINDS = ["wikipedia", "moby_dick", "speeches"]
M = 64


def select_documents(data: Path | None, tok, n_chunks: int) -> tuple[list, int]:
    """Whole documents, in the corpus's order, until they hold at least n_chunks chunks of m
    tokens (a long document is cut to what is still needed)."""
    from retro_db.ingest import Document

    docs, chunks = [], 0
    for i, text in enumerate(_corpus.documents(data, KINDS)):
        ids = tok.encode(text)
        need = (n_chunks - chunks) * M
        if len(ids) > need:
            text = tok.decode(ids[:need])
            ids = ids[:need]
        docs.append(Document(doc_id=f"d{i}", text=text, meta={}))
        chunks += -(-len(ids) // M)
        if chunks >= n_chunks:
            break
    return docs, chunks


def timed_build(docs, out: Path, tok, **kwargs) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, the database) of one build."""
    from retro_db.build import build_database

    t0, c0 = time.perf_counter(), time.process_time()
    db = build_database(docs, out, tokenizer=tok, chunk_size=M, progress=False, **kwargs)
    return time.perf_counter() - t0, time.process_time() - c0, db


def key_bytes(db) -> int:
    """Bytes of the files that hold keys and index (shard keys.npy, everything under index/)."""
    return sum(
        int(e["size"])
        for name, e in db.manifest["files"].items()
        if name.endswith("keys.npy") or name.startswith("index/")
    )


def queries_per_s(db, n: int) -> float:
    ids = np.arange(min(n, db.num_chunks))
    tokens, lengths = db.chunk_tokens(ids)
    t0 = time.perf_counter()
    db.retrieve(tokens, 2, lengths=lengths)
    return len(ids) / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="300 chunks (a smoke run)")
    ap.add_argument("--chunks", type=int, default=None, help="chunks to build (default 4000)")
    ap.add_argument("--threads", type=int, default=1, help="torch/faiss threads (default 1)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bm25.json")
    _corpus.add_argument(ap)
    args = ap.parse_args()
    n_chunks = args.chunks or (300 if args.quick else 4000)

    import torch

    from retro_db.embedders import load_embedder
    from retro_db.index import set_threads
    from retro_db.tokenizer import load_tokenizer

    torch.set_num_threads(args.threads)
    set_threads(args.threads)
    tok = load_tokenizer()
    docs, chunks = select_documents(args.data, tok, n_chunks)
    emb = load_embedder(None, threads=args.threads)
    emb.embed_texts(["warm up the encoder"] * 8, batch_size=8)
    tmp = Path(tempfile.mkdtemp(prefix="bench-bm25-"))
    try:
        bm25_s, bm25_cpu, bm25_db = timed_build(docs, tmp / "bm25", tok, keys="bm25")
        dense_s, dense_cpu, dense_db = timed_build(
            docs, tmp / "minilm", tok, embedder=emb, threads=args.threads
        )
        n = bm25_db.num_chunks
        assert n == dense_db.num_chunks
        q = min(200, n)
        figures = {
            "documents": len(docs),
            "chunks": n,
            "bm25_build_s": round(bm25_s, 3),
            "minilm_build_s": round(dense_s, 3),
            "bm25_build_chunks_per_s": n / bm25_s,
            "minilm_build_chunks_per_s": n / dense_s,
            "bm25_build_cpu_s": round(bm25_cpu, 3),
            "minilm_build_cpu_s": round(dense_cpu, 3),
            "bm25_key_bytes_per_chunk": key_bytes(bm25_db) / n,
            "minilm_key_bytes_per_chunk": key_bytes(dense_db) / n,
            "bm25_queries_per_s": queries_per_s(bm25_db, q),
            "minilm_queries_per_s": queries_per_s(dense_db, q),
            "minilm_index": dense_db.manifest["index"]["factory"],
            "threads": args.threads,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = figures["bm25_build_chunks_per_s"] / figures["minilm_build_chunks_per_s"]
    bm25_cpu, dense_cpu = figures["bm25_build_cpu_s"], figures["minilm_build_cpu_s"]
    result = {
        "name": "bm25",
        "figures": figures,
        "ratios": [
            {
                "what": "BM25 build chunks/s / MiniLM build chunks/s (same documents, one run)",
                "ratio": ratio,
                "target": ">= 10 (no encoder: building BM25 keys is not the bottleneck)",
                "met": ratio >= 10,
            },
            {
                "what": "the same on CPU time of the process (steadier on a shared machine)",
                "ratio": dense_cpu / bm25_cpu,
                "target": ">= 10",
                "met": dense_cpu / bm25_cpu >= 10,
            },
        ],
        "notes": [
            f"{_corpus.describe(args.data)}; {n_chunks} chunks asked, m = {M}, GPT-2 tokenizer, "
            f"{args.threads} thread(s); MiniLM loaded and warmed up before its build is timed.",
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
