"""``retro-db``: build, grow, inspect and query a retrieval database; precompute neighbours; dedup.

Thin: each subcommand parses its arguments and calls the library function tests call too. Any
error becomes one line on stderr (``retro-db: error: ...``) and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["main"]


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "jsonl", "text", "wikitext103", "pile", "parquet"],
        help="source format (auto: from the file name)",
    )
    p.add_argument("--text-field", default="text", help="JSONL/Parquet field holding the text")
    p.add_argument("--id-field", default=None, help="JSONL/Parquet field holding a document id")
    p.add_argument("--strict", action="store_true", help="a bad record is an error, not a warning")


def _add_build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=64, help="embedding batch size")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="faiss/embedder threads (--engine ray: per worker)",
    )
    p.add_argument("--shard-chunks", type=int, default=None, help="chunks per resumable shard")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine",
        default="local",
        choices=["local", "ray"],
        help="local: this process; ray: shard tasks on a Ray cluster (extra [ray])",
    )
    p.add_argument(
        "--address", default=None, help="Ray cluster address (default: start a local one)"
    )
    p.add_argument(
        "--num-cpus", type=int, default=None, help="Ray: CPUs to start with, or to use of a cluster"
    )


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="retro-db", description=__doc__.splitlines()[0])
    ap.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="build a database from documents (resumable)")
    p.add_argument("sources", nargs="+", help="files or folders of documents")
    p.add_argument("--out", required=True, help="database directory to create")
    _add_source_args(p)
    p.add_argument("--tokenizer", default=None, help="HF tokenizer directory (default GPT-2 BPE)")
    p.add_argument(
        "--embedder",
        default=None,
        help="encoder directory, 'minilm' (default all-MiniLM-L6-v2) or 'hash:D' (no model)",
    )
    p.add_argument("--chunk-size", type=int, default=64, help="m, tokens per chunk")
    p.add_argument(
        "--index-factory", default=None, help="faiss index_factory string (default by size)"
    )
    p.add_argument("--nprobe", type=int, default=None, help="IVF search parameter")
    p.add_argument("--ef-search", type=int, default=None, help="HNSW search parameter")
    _add_build_args(p)
    _add_engine_args(p)

    p = sub.add_parser("add", help="append documents to a database as a new version")
    p.add_argument("db", help="database directory")
    p.add_argument("sources", nargs="+", help="files or folders of documents")
    _add_source_args(p)
    _add_build_args(p)

    p = sub.add_parser("info", help="counts, sizes on disk, and index recall@k vs exact search")
    p.add_argument("db", help="database directory")
    p.add_argument("--verify", action="store_true", help="check the sha256 of every file")
    p.add_argument("--sample", type=int, default=200, help="chunks sampled for recall")
    p.add_argument("-k", type=int, default=10, help="k of recall@k")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("query", help="print the nearest chunks of a text")
    p.add_argument("db", help="database directory")
    p.add_argument("text", help="query text (its first m tokens are the query chunk)")
    p.add_argument("-k", type=int, default=5, help="neighbours")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("neighbours", help="write the training dataset (chunks + k neighbours)")
    p.add_argument("db", help="database directory")
    p.add_argument("--out", required=True, help="dataset directory")
    p.add_argument(
        "--corpus", nargs="*", default=None, help="training documents (default: the database's own)"
    )
    _add_source_args(p)
    p.add_argument("-k", type=int, default=2, help="neighbours per chunk")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the sha256 check of the database's files (only the cheap checks of every open)",
    )
    p.add_argument("--shard-chunks", type=int, default=16384, help="chunks per resumable part")
    p.add_argument("--batch-size", type=int, default=64, help="embedding batch size")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_engine_args(p)
    p.add_argument(
        "--threads", type=int, default=None, help="faiss/embedder threads (Ray: per worker, 1)"
    )

    p = sub.add_parser("dedup", help="remove training documents near-duplicating evaluation ones")
    p.add_argument("--train", nargs="+", required=True, help="training documents")
    p.add_argument("--eval", nargs="+", required=True, help="evaluation documents")
    p.add_argument("--report", required=True, help="JSON report of what was removed and why")
    p.add_argument("--kept-out", default=None, help="write kept training documents (JSONL)")
    _add_source_args(p)
    p.add_argument("--tokenizer", default=None, help="HF tokenizer directory (default GPT-2 BPE)")
    p.add_argument("--threshold", type=float, default=0.8, help="Jaccard threshold")
    p.add_argument("--ngram", type=int, default=13, help="shingle size in tokens")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    return ap


def _reader_kwargs(args: argparse.Namespace) -> dict:
    return {
        "format": args.format,
        "text_field": args.text_field,
        "id_field": args.id_field,
        "strict": args.strict,
    }


def _docs(paths: Sequence[str], args: argparse.Namespace, stats=None):
    """Check the paths now (before any model loads), then stream their documents."""
    from .ingest import read_documents

    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"{p}: no such file or folder")

    def stream():
        for p in paths:
            yield from read_documents(p, stats=stats, **_reader_kwargs(args))

    return stream()


def _cmd_build(args: argparse.Namespace) -> None:
    from .build import BuildStats, build_database
    from .ingest import IngestStats

    stats = IngestStats()
    bstats = BuildStats()
    params = {}
    if args.nprobe is not None:
        params["nprobe"] = args.nprobe
    if args.ef_search is not None:
        params["efSearch"] = args.ef_search
    db = build_database(
        _docs(args.sources, args, stats),
        args.out,
        tokenizer=args.tokenizer,
        embedder=args.embedder,
        chunk_size=args.chunk_size,
        index_factory=args.index_factory,
        search_params=params or None,
        batch_size=args.batch_size,
        shard_chunks=args.shard_chunks or 65536,
        threads=args.threads,
        progress=not args.no_progress,
        engine=args.engine,
        address=args.address,
        num_cpus=args.num_cpus,
        stats=bstats,
    )
    print(f"built {db}: {_report(stats, bstats)}")


def _cmd_add(args: argparse.Namespace) -> None:
    from .build import BuildStats, add_documents
    from .ingest import IngestStats

    stats = IngestStats()
    bstats = BuildStats()
    db = add_documents(
        args.db,
        _docs(args.sources, args, stats),
        batch_size=args.batch_size,
        shard_chunks=args.shard_chunks,
        threads=args.threads,
        progress=not args.no_progress,
        stats=bstats,
    )
    print(f"now {db}: {_report(stats, bstats)}")


def _report(stats, bstats) -> str:
    """The counts line of build/add: read, bad, truncated files, duplicates skipped."""
    text = f"{stats.documents} documents read, {stats.skipped} bad records skipped"
    if stats.truncated:
        text += f", {len(stats.truncated)} truncated files ({', '.join(stats.truncated)})"
    text += (
        f", {bstats.already_present} already in the database and {bstats.duplicates} "
        "duplicates skipped"
    )
    return text


def _cmd_info(args: argparse.Namespace) -> None:
    from .database import Database

    info = Database.open(args.db, verify=args.verify).info(sample=args.sample, k=args.k)
    info["verified"] = args.verify
    if args.json:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        print(f"{key:28s} {value}")


def _cmd_query(args: argparse.Namespace) -> None:
    from .database import Database

    db = Database.open(args.db)
    ids = db.tokenizer.encode(args.text)[: db.chunk_size]
    if not ids:
        raise ValueError("query text: expected at least one token")
    chunk = np.full((1, db.chunk_size), db.pad_id, dtype=np.int64)
    chunk[0, : len(ids)] = ids
    nb = db.retrieve(chunk, args.k, lengths=np.array([len(ids)]))
    out = []
    for j in range(nb.chunk_ids.shape[1]):
        cid = int(nb.chunk_ids[0, j])
        if cid < 0:
            continue
        text = db.tokenizer.decode(nb.tokens[0, j, : nb.lengths[0, j]])
        out.append(
            {
                "chunk_id": cid,
                "distance": float(nb.distances[0, j]),
                "doc": int(db.doc_ids[cid]),
                "text": text,
            }
        )
    if args.json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return
    for r in out:
        print(f"#{r['chunk_id']} doc {r['doc']} d2={r['distance']:.4f}: {r['text']!r}")


def _cmd_neighbours(args: argparse.Namespace) -> None:
    from .neighbours import write_neighbours

    corpus = _docs(args.corpus, args) if args.corpus else None
    manifest = write_neighbours(
        args.db,
        corpus,
        args.out,
        k=args.k,
        shard_chunks=args.shard_chunks,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        engine=args.engine,
        address=args.address,
        num_cpus=args.num_cpus,
        threads=args.threads,
        verify=not args.no_verify,
    )
    print(f"wrote {manifest['counts']['chunks']} chunks with k={args.k} neighbours to {args.out}")


def _cmd_dedup(args: argparse.Namespace) -> None:
    from .manifest import atomic_write_bytes, atomic_write_json
    from .minhash import dedup_documents
    from .tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    eval_ids = [tok.encode(d.text) for d in _docs(args.eval, args)]
    report = dedup_documents(
        (tok.encode(d.text) for d in _docs(args.train, args)),
        eval_ids,
        threshold=args.threshold,
        num_perm=args.num_perm,
        ngram=args.ngram,
    )
    atomic_write_json(args.report, report.to_dict())
    if args.kept_out:
        kept = set(int(i) for i in report.kept)
        lines = [
            json.dumps(
                {"doc_id": d.doc_id, "text": d.text, "meta": d.meta},
                ensure_ascii=False,
                default=str,
            )
            for i, d in enumerate(_docs(args.train, args))
            if i in kept
        ]
        atomic_write_bytes(args.kept_out, "".join(x + "\n" for x in lines).encode("utf-8"))
    print(
        f"dedup: {len(report.removed)} of {report.num_train} training documents removed "
        f"(Jaccard >= {args.threshold} with one of {report.num_eval}); report {args.report}"
    )


_COMMANDS = {
    "build": _cmd_build,
    "add": _cmd_add,
    "info": _cmd_info,
    "query": _cmd_query,
    "neighbours": _cmd_neighbours,
    "dedup": _cmd_dedup,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``retro-db``; returns the exit code (0 ok, 2 error)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        _COMMANDS[args.command](args)
    except (ValueError, OSError, KeyError, ImportError, RuntimeError) as e:  # DatabaseError too
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"retro-db: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
