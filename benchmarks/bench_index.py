"""The faiss index of retro-db: queries/s and recall@10 against exact search (issue 4).

Real text from ../shared/data is cut into m-token GPT-2 chunks (retro-db's tokenizer) and decoded
back to text, then embedded with retro-db's ChunkEmbedder (all-MiniLM-L6-v2, as a database build
does). The last 1000 chunks are held out as queries; the others form the database. Every index is
built through retro_db.index (the code a build uses), and compared to exact search (faiss
IndexFlatL2 over the same keys, the ground truth): recall@10, queries/s (batch of all queries,
fixed faiss threads), training and add time, bytes per key. Figures include the index that
`default_factory` picks for this N and for the sizes where its thresholds switch.

Keys are cached (``$RETRO_BENCH_CACHE``, default /tmp/retro-bench-cache) because embedding 100k
chunks on a CPU takes minutes. Without torch the hashing embedder stands in (noted in the output;
its recall figures say nothing about BERT keys).

Usage: python benchmarks/bench_index.py [--quick] [--out PATH] [--chunks N] [--threads T]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
if not DATA.exists():
    DATA = Path("/work/shared/data")
FILES = [
    "wikipedia/gensim_enwiki_sample.jsonl",
    "books/moby_dick.jsonl",
    "speeches/state_of_the_union.jsonl",
    "books/kjv_bible.jsonl",
    "squad/squad_dev_v1.1.articles.jsonl",
]
N_QUERIES = 1000


def chunk_texts(n: int, m: int) -> list[str]:
    """Up to n texts: the decodings of consecutive m-token GPT-2 chunks of real documents."""
    from retro_db.ingest import read_jsonl
    from retro_db.tokenizer import load_tokenizer

    tok = load_tokenizer()
    out: list[list[int]] = []
    for name in FILES:
        field = "paragraphs" if "squad" in name else "text"
        for doc in _texts(DATA / name, field, read_jsonl):
            ids = tok.encode(doc)
            out += [ids[i : i + m] for i in range(0, len(ids) - m + 1, m)]
            if len(out) >= n:
                return tok.decode_batch(out[:n])
    return tok.decode_batch(out)


def _texts(path: Path, field: str, read_jsonl):
    if field == "paragraphs":
        with path.open(encoding="utf-8") as f:
            for line in f:
                yield "\n\n".join(json.loads(line)["paragraphs"])
    else:
        for d in read_jsonl(path, field):
            yield d.text


def embed(texts: list[str], threads: int) -> tuple[np.ndarray, str]:
    cache = Path(os.environ.get("RETRO_BENCH_CACHE", "/tmp/retro-bench-cache"))
    cache.mkdir(parents=True, exist_ok=True)
    try:
        from retro_db.embed import ChunkEmbedder

        emb = ChunkEmbedder(threads=threads)
    except ImportError:
        from retro_db.embedders import HashingEmbedder

        emb = HashingEmbedder(384)
    key = hashlib.sha256(("\0".join(texts) + emb.id).encode()).hexdigest()[:16]
    path = cache / f"keys-{key}.npy"
    if path.exists():
        return np.load(path, allow_pickle=False), emb.id
    t0 = time.perf_counter()
    keys = emb.embed_texts(texts, batch_size=128, progress=True).astype(np.float16)
    print(f"embedded {len(texts)} chunks in {time.perf_counter() - t0:.1f}s with {emb.id}")
    np.save(path, keys, allow_pickle=False)
    return keys, emb.id


def measure(factory: str, params: dict, base: np.ndarray, queries: np.ndarray, truth: np.ndarray):
    import faiss

    from retro_db.index import apply_search_params, train_index, training_size

    rng = np.random.default_rng(0)
    s = training_size(factory, len(base))
    sample = base[np.sort(rng.choice(len(base), size=s, replace=False))]
    t0 = time.perf_counter()
    index = train_index(factory, sample)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    index.add(base)
    t_add = time.perf_counter() - t0
    rows = []
    for p in params or [{}]:
        apply_search_params(index, p)
        index.search(queries[:50], 10)  # warm up
        t0 = time.perf_counter()
        _, got = index.search(queries, 10)
        dt = time.perf_counter() - t0
        recall = float(
            np.mean([len(set(t) & set(g)) / 10 for t, g in zip(truth, got, strict=True)])
        )
        rows.append(
            {
                "factory": factory,
                "params": p,
                "recall@10": round(recall, 4),
                "queries_per_s": round(len(queries) / dt, 1),
                "train_s": round(t_train, 3),
                "add_s": round(t_add, 3),
                "bytes_per_key": round(len(faiss.serialize_index(index)) / max(1, index.ntotal), 1),
            }
        )
        print(json.dumps(rows[-1]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="12k chunks instead of 120k")
    ap.add_argument("--out", default=str(HERE / "results" / "index.json"))
    ap.add_argument("--chunks", type=int, default=None)
    ap.add_argument("--chunk-size", type=int, default=32, help="m (32 gives >100k chunks here)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = ap.parse_args()

    import faiss

    from retro_db.index import default_factory, exact_search, set_threads

    n = args.chunks or (12_000 if args.quick else 120_000)
    set_threads(args.threads)
    texts = chunk_texts(n + N_QUERIES, args.chunk_size)
    keys, emb_id = embed(texts, args.threads)
    keys = keys.astype(np.float32)
    base, queries = keys[:-N_QUERIES], keys[-N_QUERIES:]
    n, d = base.shape
    t0 = time.perf_counter()
    _, truth = exact_search(base, queries, 10)
    exact_qps = len(queries) / (time.perf_counter() - t0)

    nlist = 2 ** round(np.log2(4 * np.sqrt(n)))
    configs = [
        ("Flat", []),
        ("HNSW32,Flat", [{"efSearch": 32}, {"efSearch": 64}, {"efSearch": 128}]),
        (f"IVF{nlist},Flat", [{"nprobe": 8}, {"nprobe": 32}]),
        (f"IVF{nlist},PQ{d // 2}x4fs", [{"nprobe": 8}, {"nprobe": 32}]),
    ]
    rows = []
    for factory, params in configs:
        rows += measure(factory, params, base, queries, truth)
    chosen, chosen_params = default_factory(n, d)
    flat = next(r for r in rows if r["factory"] == "Flat")
    hnsw = max(
        (r for r in rows if r["factory"].startswith("HNSW") and r["recall@10"] >= 0.9),
        key=lambda r: r["queries_per_s"],
        default=None,
    )
    pq = max((r for r in rows if ",PQ" in r["factory"]), key=lambda r: r["recall@10"], default=None)
    ratios = []
    if hnsw:
        ratios.append(
            {
                "what": f"HNSW32 queries/s vs exact Flat at recall@10 {hnsw['recall@10']} "
                f"(efSearch={hnsw['params'].get('efSearch')}), N={n}",
                "ratio": round(hnsw["queries_per_s"] / flat["queries_per_s"], 2),
                "target": ">= 3 (the reason to leave Flat above FLAT_THRESHOLD)",
                "met": hnsw["queries_per_s"] / flat["queries_per_s"] >= 3,
            }
        )
    if pq:
        ratios.append(
            {
                "what": f"IVF-PQ bytes/key vs Flat (recall@10 {pq['recall@10']})",
                "ratio": round(pq["bytes_per_key"] / flat["bytes_per_key"], 3),
                "target": "<= 0.1 (compression for billions of chunks)",
                "met": pq["bytes_per_key"] / flat["bytes_per_key"] <= 0.1,
            }
        )
    result = {
        "name": "index",
        "figures": {
            "chunks": n,
            "dim": d,
            "queries": len(queries),
            "faiss_threads": args.threads,
            "exact_queries_per_s": round(exact_qps, 1),
            "default_factory_for_n": chosen,
            "default_params_for_n": chosen_params,
            "embedder": emb_id,
            "rows": rows,
        },
        "ratios": ratios,
        "notes": [
            f"keys: {emb_id} on {n} real {args.chunk_size}-token chunks from shared/data; "
            f"queries: {N_QUERIES} held-out chunks; truth: exact IndexFlatL2",
            f"faiss {faiss.__version__}, threads {args.threads}",
        ],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result["ratios"], indent=2))


if __name__ == "__main__":
    main()
