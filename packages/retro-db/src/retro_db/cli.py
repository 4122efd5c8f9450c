"""``retro-db``: build, grow, inspect and query a retrieval database; precompute neighbours; dedup.

Thin: each subcommand parses its arguments and calls the library function tests call too. Any
error becomes one line on stderr (``retro-db: error: ...``) and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Sequence

import numpy as np

__all__ = ["main"]


class _UsageError(Exception):
    """A bad command line (argparse's error), reported in one line by :func:`main`."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``retro-db <command>: error: ...`` (no usage block)."""

    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(f"{message} (see {self.prog} --help)")


def _int(low: int):
    """argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _fraction(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def _seconds(text: str) -> float:
    """argparse type: a number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text}")
    return value


def _add_progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (including the encoder's 'Loading weights')",
    )


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "jsonl", "text", "wikitext103", "pile", "parquet"],
        help="source format (auto: from the file name)",
    )
    p.add_argument(
        "--text-field",
        default="text",
        help="JSON/Parquet field holding the text: a string or a list of strings (joined with a "
        "blank line); dots reach into objects (a.b)",
    )
    p.add_argument("--id-field", default=None, help="JSON/Parquet field holding a document id")
    p.add_argument(
        "--strict",
        action="store_true",
        help="a bad record, invalid UTF-8 or a truncated file is an error, not a warning",
    )


def _add_build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=_int(1), default=64, help="embedding batch size")
    p.add_argument(
        "--threads",
        type=_int(1),
        default=None,
        help="faiss/embedder threads (--engine ray: per worker)",
    )
    p.add_argument("--shard-chunks", type=_int(1), default=None, help="chunks per resumable shard")
    _add_progress_arg(p)


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
        "--num-cpus",
        type=_int(1),
        default=None,
        help="Ray: CPUs to start with, or to use of a cluster",
    )


# long by design: a flat list of the subcommands' options; splitting it would only scatter them
def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="retro-db", description=__doc__.splitlines()[0])
    ap.add_argument(
        "-v", "--verbose", action="store_true", help="log at INFO level and list every file read"
    )
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="build a database from documents (resumable)")
    p.add_argument("sources", nargs="+", help="files or folders of documents")
    p.add_argument("--out", required=True, help="database directory to create")
    _add_source_args(p)
    p.add_argument("--tokenizer", default=None, help="HF tokenizer directory (default GPT-2 BPE)")
    p.add_argument(
        "--keys",
        default="dense",
        choices=["dense", "bm25"],
        help="dense: frozen-BERT keys (--embedder) in a faiss index; bm25: the chunks' text "
        "indexed by bm25s (extra [bm25]; no embedder, no faiss options)",
    )
    p.add_argument(
        "--embedder",
        default=None,
        help="encoder directory, 'minilm' (default all-MiniLM-L6-v2) or 'hash:D' (no model)",
    )
    p.add_argument("--chunk-size", type=_int(1), default=64, help="m, tokens per chunk")
    p.add_argument(
        "--index-factory", default=None, help="faiss index_factory string (default by size)"
    )
    p.add_argument("--nprobe", type=_int(1), default=None, help="IVF search parameter")
    p.add_argument("--ef-search", type=_int(1), default=None, help="HNSW search parameter")
    p.add_argument(
        "--max-memory-mb",
        type=_int(1),
        default=None,
        help="memory the index may count on (default: what the machine and limits leave); an "
        "index that would not fit in half of it is built with its lists on disk",
    )
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
    p.add_argument("--sample", type=_int(1), default=200, help="chunks sampled for recall")
    p.add_argument("-k", type=_int(1), default=10, help="k of recall@k")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_progress_arg(p)

    p = sub.add_parser("query", help="print the nearest chunks of a text")
    p.add_argument("db", help="database directory")
    p.add_argument("text", help="query text (its first m tokens are the query chunk)")
    p.add_argument("-k", type=_int(1), default=5, help="neighbours")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_progress_arg(p)

    p = sub.add_parser("neighbours", help="write the training dataset (chunks + k neighbours)")
    p.add_argument("db", help="database directory")
    p.add_argument("--out", required=True, help="dataset directory")
    p.add_argument(
        "--corpus", nargs="*", default=None, help="training documents (default: the database's own)"
    )
    _add_source_args(p)
    p.add_argument("-k", type=_int(1), default=2, help="neighbours per chunk")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the sha256 check of the database's files (only the cheap checks of every open)",
    )
    p.add_argument("--shard-chunks", type=_int(1), default=16384, help="chunks per resumable part")
    p.add_argument("--batch-size", type=_int(1), default=64, help="embedding batch size")
    _add_progress_arg(p)
    _add_engine_args(p)
    p.add_argument(
        "--threads", type=_int(1), default=None, help="faiss/embedder threads (Ray: per worker, 1)"
    )

    p = sub.add_parser("dedup", help="remove training documents near-duplicating evaluation ones")
    p.add_argument("train", nargs="*", help="training documents (files or folders)")
    p.add_argument(
        "--train",
        dest="train_opt",
        nargs="+",
        default=[],
        help="training documents (as positional)",
    )
    p.add_argument("--eval", nargs="+", required=True, help="evaluation documents")
    p.add_argument(
        "--out",
        "--kept-out",
        dest="kept_out",
        default=None,
        help="write the kept training documents here (JSONL; JSON records as they were read)",
    )
    p.add_argument(
        "--report", default=None, help="JSON report of what was removed and why (default: none)"
    )
    _add_source_args(p)
    p.add_argument("--tokenizer", default=None, help="HF tokenizer directory (default GPT-2 BPE)")
    p.add_argument("--threshold", type=_fraction, default=0.8, help="Jaccard threshold")
    p.add_argument("--ngram", type=_int(1), default=13, help="shingle size in tokens")
    p.add_argument("--num-perm", type=_int(1), default=128, help="MinHash permutations")
    _add_progress_arg(p)

    p = sub.add_parser(
        "gc",
        aliases=["prune"],
        help="delete the files of old versions no reader can still open (see --grace)",
    )
    p.add_argument("db", help="database directory")
    p.add_argument(
        "--grace",
        type=_seconds,
        default=3600.0,
        help="seconds a superseded version stays openable (default 3600)",
    )
    p.add_argument(
        "--keep", type=_int(1), default=1, help="newest versions kept whatever their age"
    )
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted")
    for p in {id(x): x for x in sub.choices.values()}.values():  # -v after the command works too
        p.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,
            help="log at INFO level and list every file read",
        )
    return ap


def _reader_kwargs(args: argparse.Namespace) -> dict:
    return {
        "format": args.format,
        "text_field": args.text_field,
        "id_field": args.id_field,
        "strict": args.strict,
    }


def _docs(paths: Sequence[str], args: argparse.Namespace, stats=None, keep_records: bool = False):
    """Check the paths now (before any model loads), then stream their documents."""
    from .ingest import read_sources

    return read_sources(paths, stats=stats, keep_records=keep_records, **_reader_kwargs(args))


def _print_read(stats, args: argparse.Namespace, what: str = "read") -> None:
    """The summary of what the reader read and skipped (every file with -v)."""
    if args.verbose:
        for line in stats.details():
            print(f"  {line}")
    print(f"{what}: {stats.summary()}")


def _no_documents(err: Exception, stats) -> Exception:
    """``err`` (no documents with text) with the reader's summary, so the cause is on the line."""
    from .manifest import DatabaseError

    if stats.documents == 0:
        return DatabaseError(f"{str(err).splitlines()[0]} ({stats.summary()})")
    return err


def _check_bm25_flags(args: argparse.Namespace) -> None:
    """``--keys bm25`` refuses the options of dense keys (one line, before anything is read)."""
    if args.keys != "bm25":
        return
    dense = {
        "--embedder": args.embedder,
        "--index-factory": args.index_factory,
        "--nprobe": args.nprobe,
        "--ef-search": args.ef_search,
        "--max-memory-mb": args.max_memory_mb,
        "--engine": None if args.engine == "local" else args.engine,
    }
    wrong = [flag for flag, value in dense.items() if value is not None]
    if wrong:
        raise ValueError(f"--keys bm25: {', '.join(wrong)} apply to --keys dense only")


def _cmd_build(args: argparse.Namespace) -> None:
    from .build import BuildStats, build_database
    from .ingest import IngestStats
    from .manifest import DatabaseError

    _check_bm25_flags(args)
    stats = IngestStats()
    bstats = BuildStats()
    params = {}
    if args.nprobe is not None:
        params["nprobe"] = args.nprobe
    if args.ef_search is not None:
        params["efSearch"] = args.ef_search
    try:
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
            max_memory=None if args.max_memory_mb is None else args.max_memory_mb << 20,
            keys=args.keys,
        )
    except DatabaseError as e:
        raise _no_documents(e, stats) from None
    _print_read(stats, args)
    print(f"built {db}: {_report(stats, bstats)}")


def _cmd_add(args: argparse.Namespace) -> None:
    from .build import BuildStats, add_documents
    from .ingest import IngestStats
    from .manifest import DatabaseError

    stats = IngestStats()
    bstats = BuildStats()
    try:
        db = add_documents(
            args.db,
            _docs(args.sources, args, stats),
            batch_size=args.batch_size,
            shard_chunks=args.shard_chunks,
            threads=args.threads,
            progress=not args.no_progress,
            stats=bstats,
        )
    except DatabaseError as e:
        raise _no_documents(e, stats) from None
    _print_read(stats, args)
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
    from .ingest import IngestStats
    from .neighbours import write_neighbours

    stats = IngestStats()
    corpus = _docs(args.corpus, args, stats) if args.corpus else None
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
    if args.corpus:
        _print_read(stats, args, "corpus")
    print(f"wrote {manifest['counts']['chunks']} chunks with k={args.k} neighbours to {args.out}")


def _cmd_dedup(args: argparse.Namespace) -> None:
    from .ingest import IngestStats
    from .manifest import atomic_write_bytes, atomic_write_json
    from .minhash import dedup_documents
    from .tokenizer import load_tokenizer

    train = list(args.train) + list(args.train_opt)
    if not train:
        raise ValueError("retro-db dedup: expected training documents (TRAIN ... or --train)")
    if not args.kept_out and not args.report:
        raise ValueError("retro-db dedup: expected --out KEPT.jsonl and/or --report REPORT.json")
    ev_stats, tr_stats = IngestStats(), IngestStats()
    eval_docs = _docs(args.eval, args, ev_stats)
    train_docs = _docs(train, args, tr_stats)  # checks the paths before the tokenizer loads
    tok = load_tokenizer(args.tokenizer)
    eval_ids = [tok.encode(d.text) for d in eval_docs]
    report = dedup_documents(
        (tok.encode(d.text) for d in train_docs),
        eval_ids,
        threshold=args.threshold,
        num_perm=args.num_perm,
        ngram=args.ngram,
        progress=not args.no_progress,
    )
    if args.report:
        atomic_write_json(args.report, report.to_dict())
    if args.kept_out:
        kept = set(int(i) for i in report.kept)
        lines = []
        for i, d in enumerate(_docs(train, args, keep_records=True)):
            if i not in kept:
                continue
            # a JSON record or Parquet row is written back as it was read (the user's own id and
            # fields); a text file becomes {"id", "text"}
            rec = d.record if d.record is not None else {"id": d.doc_id, "text": d.text, **d.meta}
            lines.append(json.dumps(rec, ensure_ascii=False, default=str))
        atomic_write_bytes(args.kept_out, "".join(x + "\n" for x in lines).encode("utf-8"))
    _print_read(tr_stats, args, "train")
    _print_read(ev_stats, args, "eval")
    where = ", ".join(x for x in (args.kept_out, args.report) if x)
    print(
        f"dedup: {len(report.removed)} of {report.num_train} training documents removed "
        f"(Jaccard >= {args.threshold} with one of {report.num_eval}); wrote {where}"
    )


def _cmd_gc(args: argparse.Namespace) -> None:
    from .build import collect_garbage

    result = collect_garbage(args.db, grace=args.grace, keep=args.keep, dry_run=args.dry_run)
    if args.verbose or args.dry_run:
        for name in result.removed:
            print(f"  {'would delete' if args.dry_run else 'deleted'} {name}")
    verb = "would free" if args.dry_run else "freed"
    print(
        f"gc {args.db}: {verb} {result.bytes_freed} bytes ({len(result.removed)} files of versions "
        f"{', '.join(map(str, result.versions_removed)) or 'none'}); kept versions "
        f"{', '.join(map(str, result.versions_kept))}"
    )


_COMMANDS = {
    "build": _cmd_build,
    "add": _cmd_add,
    "info": _cmd_info,
    "query": _cmd_query,
    "neighbours": _cmd_neighbours,
    "dedup": _cmd_dedup,
    "gc": _cmd_gc,
    "prune": _cmd_gc,
}


@contextlib.contextmanager
def _quiet_progress(quiet: bool):
    """With ``quiet``, silence every progress bar, Hugging Face's (``Loading weights``) included.

    Our own bars take ``progress=False`` (no ``TQDM_DISABLE``: tqdm reads it once, at import);
    huggingface_hub's switch also governs transformers'
    bars when transformers is imported later, and transformers' own switch is flipped when it is
    already imported. Everything is switched back afterwards (in-process callers, tests).
    """
    if not quiet:
        yield
        return
    undo = []
    try:
        from huggingface_hub import utils as hub_utils
    except ImportError:  # not installed: neither is transformers
        hub_utils = None
    if hub_utils is not None and not hub_utils.are_progress_bars_disabled():
        hub_utils.disable_progress_bars()
        undo.append(hub_utils.enable_progress_bars)
    had_transformers = "transformers" in sys.modules
    if had_transformers:  # then torch is loaded too: importing embed is cheap
        with contextlib.suppress(ImportError):  # transformers without torch: no encoder to load
            from .embed import set_progress_bars

            if set_progress_bars(False):
                undo.append(lambda: set_progress_bars(True))
    try:
        yield
    finally:
        if undo and not had_transformers and "transformers" in sys.modules:
            # imported while quiet: it took the hub's switch as its own; switch it back too
            from .embed import set_progress_bars

            undo.append(lambda: set_progress_bars(True))
        for f in undo:
            f()


def _one_line(text: str) -> str:
    """The first line of a message, printable whatever bytes the user typed."""
    line = text.splitlines()[0] if text.strip() else ""
    return line.encode("utf-8", "backslashreplace").decode("utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``retro-db``; returns the exit code (0 ok, 2 error).

    Every error, a bad command line included, is one line on stderr and exit code 2.
    """
    try:
        args = _parser().parse_args(argv)
    except _UsageError as e:
        print(f"retro-db: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        with _quiet_progress(getattr(args, "no_progress", False)):
            _COMMANDS[args.command](args)
    except (ValueError, OSError, KeyError, ImportError, RuntimeError) as e:  # DatabaseError too
        msg = _one_line(str(e)) or type(e).__name__
        print(f"retro-db: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
