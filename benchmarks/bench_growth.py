"""Growth: database build chunks/s and peak memory at 1x, 2x and 4x corpus size (issue 8, figure 5).

The corpus is real text (by default retro-eval's shipped packs, ~6.9M characters; ``--data DIR``:
the raw text folder they were built from, ~20M characters, see ``_corpus.py``) cut at paragraph
boundaries into pieces of at most ~4000 characters (pieces make fractions of the corpus possible),
in a fixed order. Size 1x is the first 1/4.4 of it by characters (``--quick``: 1/17.6), 2x and 4x
its first 2 and 4 units; each size is followed by a 10% append (the next 0.1 x size of text,
``add_documents``), so 4x + its append is the whole corpus (quick: a quarter of it).

Each size runs in a fresh child process: ``build_database`` from a JSONL file (ingest, GPT-2
tokenisation, chunking, keys, shards, index, manifest: the whole pipeline, streaming) with the
hashing embedder ``hash:384`` (so the pipeline's own cost is measured, not the encoder's), faiss
1 thread, ``--shard-chunks`` 4096 (the streaming unit, smaller than 1x so that growth is visible;
the library default is 65536), the default index for the size (Flat below 200k chunks). Peak
memory is the child's ``ru_maxrss`` (peak resident set) after the build, and after the append;
the baseline (interpreter, numpy, faiss, tokenizer loaded) is its ``ru_maxrss`` before the build.

The all-MiniLM-L6-v2 embedding rate (retro-db's ChunkEmbedder, default precision, 2 threads) is
measured separately on a sample of the same chunks; the end-to-end MiniLM build rate is
estimated as 1 / (1/pipeline + 1/encoder) (the encoder dominates by ~2 orders of magnitude).

Ratios: build chunks/s at 4x / 1x (target ~1: flat) and peak RSS 4x / 1x (target ~1: streaming).
At 1x, after the append, the child also times the sha256 verification of the database (what
``retro-db neighbours`` runs) and of a k=2 training dataset written from it (what ``retro-train``
runs); both are set against the MiniLM embedding rate measured in the same run (issue 16: the
verification must stay well under the embedding cost).

Usage: python benchmarks/bench_growth.py [--quick] [--out PATH] [--shard-chunks N] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _corpus

HERE = Path(__file__).resolve().parent
KINDS = ["wikipedia", "moby_dick", "speeches", "bible", "squad"]  # see _corpus.py
PIECE_CHARS = 4000
SIZES = (1, 2, 4)


def pieces(data: Path | None) -> list[str]:
    """The real documents cut at paragraph boundaries into <= ~4000-char pieces."""
    out: list[str] = []
    for doc in _corpus.documents(data, KINDS):
        cur: list[str] = []
        size = 0
        for p in doc.split("\n\n"):
            if cur and size + len(p) > PIECE_CHARS:
                out.append("\n\n".join(cur))
                cur, size = [], 0
            cur.append(p)
            size += len(p) + 2
        if cur:
            out.append("\n\n".join(cur))
    return [p for p in out if p.strip()]


def write_jsonl(path: Path, docs: list[str], start: int) -> None:
    with path.open("w", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"id": f"p{start + i:07d}", "text": text}) + "\n")


def split(docs: list[str], unit_chars: float, size: int) -> tuple[list[str], list[str]]:
    """The first ``size`` units of text, and the next 0.1 x size units (the append)."""
    ends, total = [], 0
    for d in docs:
        total += len(d)
        ends.append(total)
    a = next(i for i, e in enumerate(ends) if e >= size * unit_chars) + 1
    b = next((i for i, e in enumerate(ends) if e >= 1.1 * size * unit_chars), len(docs) - 1) + 1
    return docs[:a], docs[a:b]


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def child(args: argparse.Namespace) -> int:
    """One size, in its own process: build, then append; print one JSON line."""
    import faiss  # noqa: F401  (loaded before the baseline is taken, as the build loads it)

    from retro_db.build import add_documents, build_database
    from retro_db.tokenizer import load_tokenizer

    tok = load_tokenizer()
    tok.encode_batch(["warm up"])
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    db_dir = Path(args.db)
    t0 = time.perf_counter()
    db = build_database(
        str(args.corpus),
        db_dir,
        tokenizer=tok,
        embedder="hash:384",
        threads=1,
        shard_chunks=args.shard_chunks,
        progress=False,
    )
    build_s = time.perf_counter() - t0
    build_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n = db.num_chunks
    index_file = db_dir / db.manifest["index"]["file"]
    res = {
        "chunks": n,
        "documents": db.num_documents,
        "index": db.manifest["index"]["factory"],
        "build_s": build_s,
        "baseline_rss_mb": base_kb / 1024,
        "build_peak_rss_mb": build_kb / 1024,
        "index_bytes_per_chunk": index_file.stat().st_size / n,
        "db_bytes_per_chunk": dir_bytes(db_dir) / n,
    }
    del db
    t0 = time.perf_counter()
    db = add_documents(db_dir, str(args.append), embedder="hash:384", threads=1, progress=False)
    res["append_s"] = time.perf_counter() - t0
    res["append_chunks"] = db.num_chunks - n
    res["append_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.verify_cost:
        res.update(verify_cost(db, db_dir))
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def verify_cost(db, db_dir: Path) -> dict:
    """Seconds of the sha256 verification (issue 16) that ``retro-db neighbours`` runs on the
    database and ``retro-train`` on the training dataset, each file streamed once (warm page cache:
    the files were just written). Measured after the append, so the memory figures are untouched.
    """
    import shutil

    from retro_core.data import verify_dataset
    from retro_db.database import Database
    from retro_db.neighbours import write_neighbours

    t0 = time.perf_counter()
    Database.open(db_dir, verify=True)
    res = {"verify_db_s": time.perf_counter() - t0, "verify_db_bytes": dir_bytes(db_dir)}
    ds = db_dir.with_name(db_dir.name + "-dataset")
    write_neighbours(db, None, ds, k=2, threads=1, progress=False, verify=False)
    t0 = time.perf_counter()
    verify_dataset(ds)
    res["verify_dataset_s"] = time.perf_counter() - t0
    res["verify_dataset_bytes"] = dir_bytes(ds)
    shutil.rmtree(ds)
    return res


def minilm_rate(texts: list[str], threads: int) -> tuple[float, str]:
    """all-MiniLM-L6-v2 chunks/s (ChunkEmbedder, default precision) on ``texts``."""
    from retro_db.embed import ChunkEmbedder

    emb = ChunkEmbedder(threads=threads)
    emb.embed_texts(texts[:16])
    t0 = time.perf_counter()
    emb.embed_texts(texts, batch_size=64)
    return len(texts) / (time.perf_counter() - t0), emb.precision


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1x = 1/17.6 of the corpus, not 1/4.4")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "growth.json")
    ap.add_argument("--shard-chunks", type=int, default=4096)
    ap.add_argument("--embed-sample", type=int, default=None, help="chunks for the MiniLM rate")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--append", help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    ap.add_argument("--verify-cost", action="store_true", help=argparse.SUPPRESS)
    _corpus.add_argument(ap)
    args = ap.parse_args()
    if args.child:
        return child(args)

    docs = pieces(args.data)
    total = sum(len(d) for d in docs)
    unit = total / (17.6 if args.quick else 4.4)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-growth-") as tmp:
        tmp = Path(tmp)
        for size in SIZES:
            corpus, extra = split(docs, unit, size)
            write_jsonl(tmp / f"corpus{size}.jsonl", corpus, 0)
            write_jsonl(tmp / f"append{size}.jsonl", extra, len(corpus))
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--corpus",
                str(tmp / f"corpus{size}.jsonl"),
                "--append",
                str(tmp / f"append{size}.jsonl"),
                "--db",
                str(tmp / f"db{size}"),
                "--shard-chunks",
                str(args.shard_chunks),
                *(["--verify-cost"] if size == 1 else []),  # sha256 verification vs embedding
            ]
            env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                sys.stderr.write(out.stderr)
                raise SystemExit(f"size {size}x failed (exit {out.returncode})")
            line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
            r = json.loads(line.removeprefix("RESULT "))
            r["chars"] = sum(len(d) for d in corpus)
            r["chunks_per_s"] = r["chunks"] / r["build_s"]
            r["append_chunks_per_s"] = r["append_chunks"] / r["append_s"]
            runs[size] = r
            print(f"{size}x: {json.dumps(r)}", flush=True)
            import shutil

            shutil.rmtree(tmp / f"db{size}", ignore_errors=True)

        # MiniLM rate on a sample of the 1x corpus's chunks (decoded 64-token chunks).
        from retro_db.tokenizer import load_tokenizer

        tok = load_tokenizer()
        n_sample = args.embed_sample or (128 if args.quick else 512)
        chunks = []
        for d in split(docs, unit, 1)[0]:
            ids = tok.encode(d)
            chunks += [ids[i : i + 64] for i in range(0, len(ids) - 63, 64)]
            if len(chunks) >= 20 * n_sample:
                break
        step = max(1, len(chunks) // n_sample)
        texts = tok.decode_batch(chunks[::step][:n_sample])
        enc_rate, precision = minilm_rate(texts, threads=2)

    r1, r2, r4 = runs[1], runs[2], runs[4]
    pipe = r1["chunks_per_s"]
    figures: dict = {"shard_chunks": args.shard_chunks}
    for s, r in runs.items():
        for k in (
            "chunks",
            "build_s",
            "chunks_per_s",
            "baseline_rss_mb",
            "build_peak_rss_mb",
            "index_bytes_per_chunk",
            "db_bytes_per_chunk",
            "append_chunks",
            "append_s",
            "append_chunks_per_s",
            "append_peak_rss_mb",
        ):
            v = r[k]
            figures[f"{s}x {k}"] = round(v, 2) if isinstance(v, float) else v
    figures["index"] = r4["index"]
    figures[f"minilm_{precision}_chunks_per_s_2threads"] = round(enc_rate, 1)
    figures["estimated_minilm_build_chunks_per_s"] = round(1 / (1 / pipe + 1 / enc_rate), 1)
    # Verification (issue 16) against the embedding it protects, side by side in this run.
    n1 = r1["chunks"] + r1["append_chunks"]  # the 1x database after its append
    verify_db_rate = n1 / r1["verify_db_s"]
    verify_ds_rate = n1 / r1["verify_dataset_s"]
    figures["1x verify database s (sha256 of every file)"] = round(r1["verify_db_s"], 3)
    figures["1x verify database MB"] = round(r1["verify_db_bytes"] / 2**20, 1)
    figures["1x verify database chunks/s"] = round(verify_db_rate, 1)
    figures["1x verify dataset s (retro-train)"] = round(r1["verify_dataset_s"], 3)
    figures["1x verify dataset MB"] = round(r1["verify_dataset_bytes"] / 2**20, 1)
    figures["1x verify dataset chunks/s"] = round(verify_ds_rate, 1)
    thr = r4["chunks_per_s"] / r1["chunks_per_s"]
    mem = r4["build_peak_rss_mb"] / r1["build_peak_rss_mb"]
    above1 = r1["build_peak_rss_mb"] - r1["baseline_rss_mb"]
    # a small 1x (--quick on the shipped packs) may never rise above the baseline: no ratio then
    inc = (r4["build_peak_rss_mb"] - r4["baseline_rss_mb"]) / above1 if above1 > 0 else None
    index_mb = {s: r["index_bytes_per_chunk"] * r["chunks"] / 2**20 for s, r in runs.items()}
    figures["4x/1x peak RSS above baseline"] = round(inc, 3) if inc is not None else None
    figures["4x/1x peak RSS minus the in-RAM index"] = round(
        (r4["build_peak_rss_mb"] - index_mb[4]) / (r1["build_peak_rss_mb"] - index_mb[1]), 3
    )
    figures["4x index MB (in RAM during the build)"] = round(index_mb[4], 1)
    figures["1x index MB"] = round(index_mb[1], 1)
    ratios = [
        {
            "what": f"build chunks/s 4x / 1x ({r1['chunks']} -> {r4['chunks']} chunks, hash:384)",
            "ratio": round(thr, 3),
            "target": "~1 (>= 0.8: flat)",
            "met": thr >= 0.8,
        },
        {
            "what": "build peak RSS 4x / 1x",
            "ratio": round(mem, 3),
            "target": "~1 (<= 1.25: streaming)",
            "met": mem <= 1.25,
        },
        {
            "what": "append 10% chunks/s / build chunks/s, at 4x",
            "ratio": round(r4["append_chunks_per_s"] / r4["chunks_per_s"], 3),
            "target": ">= 0.5 (an append costs about its own size, no rebuild)",
            "met": r4["append_chunks_per_s"] / r4["chunks_per_s"] >= 0.5,
        },
        {
            "what": f"sha256 verification of the database / MiniLM embedding ({precision}), chunks/s",
            "ratio": round(verify_db_rate / enc_rate, 1),
            "target": ">= 10 (verification well under the embedding cost)",
            "met": verify_db_rate / enc_rate >= 10,
        },
        {
            "what": f"sha256 verification of the training dataset / MiniLM embedding ({precision}), "
            "chunks/s",
            "ratio": round(verify_ds_rate / enc_rate, 1),
            "target": ">= 10 (verification well under the embedding cost)",
            "met": verify_ds_rate / enc_rate >= 10,
        },
    ]
    notes = [
        f"{'QUICK: ' if args.quick else ''}1x = {r1['chunks']} chunks ({r1['chars']} chars of "
        f"{_corpus.describe(args.data)}), 2x = {r2['chunks']}, 4x = {r4['chunks']}; each built in a fresh child "
        f"process with embedder hash:384, faiss 1 thread, shard_chunks {args.shard_chunks}, "
        f"index {r4['index']}; append = the next 10% of text via add_documents.",
        f"all-MiniLM-L6-v2 ({precision}, 2 threads) embeds {enc_rate:.0f} chunks/s on this "
        f"machine vs the pipeline's {pipe:.0f} chunks/s without it: a MiniLM build runs at about "
        f"{figures['estimated_minilm_build_chunks_per_s']} chunks/s, encoder-bound.",
        f"The Flat index holds every float32 key in RAM while it is built and written "
        f"({index_mb[1]:.0f} MB at 1x, {index_mb[4]:.0f} MB at 4x); peak RSS above the baseline "
        + (
            f"grows {inc:.2f}x from 1x to 4x"
            if inc is not None
            else "is 0 at 1x (too little text to measure its growth)"
        )
        + " (faiss grows the Flat vector by reallocation, so the "
        "transient peak is up to ~2-3x the index).",
        f"Verification (issue 16): the sha256 of every file of the 1x database after its append "
        f"({n1} chunks, {r1['verify_db_bytes'] / 2**20:.1f} MB with hash:384 keys) takes "
        f"{r1['verify_db_s']:.2f} s ({verify_db_rate:.0f} chunks/s), of its k=2 training dataset "
        f"({r1['verify_dataset_bytes'] / 2**20:.1f} MB) {r1['verify_dataset_s']:.2f} s "
        f"({verify_ds_rate:.0f} chunks/s), against {enc_rate:.0f} chunks/s to embed them with "
        f"MiniLM: {verify_db_rate / enc_rate:.0f}x and {verify_ds_rate / enc_rate:.0f}x faster. "
        "Files read from the page cache (just written); from a cold disk, verification reads at "
        "disk speed, once per neighbours / training run.",
    ]
    result = {"name": "growth", "figures": figures, "ratios": ratios, "notes": notes}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(ratios, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
