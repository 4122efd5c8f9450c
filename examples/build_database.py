"""Build a RETRO database from your own JSONL and query it.

    python examples/build_database.py my_docs.jsonl --text-field text --out runs/my-db \
        --query "The first railway in the country was built"

Each JSONL line is one document; ``--text-field`` names the field holding its text. The database
uses GPT-2 BPE chunks of m = 64 tokens and all-MiniLM-L6-v2 keys (``retro-db[embed]``); the same
can be done with ``retro-db build my_docs.jsonl --out runs/my-db``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from retro_db import Database, build_database, read_documents


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jsonl", type=Path)
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--out", type=Path, default=Path("runs/my-db"))
    ap.add_argument("--query", default=None, help="a text whose nearest chunks to print")
    ap.add_argument("--k", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if (args.out / "manifest.json").is_file():
        db = Database.open(args.out)  # built before: reuse it
    else:
        docs = read_documents(args.jsonl, "jsonl", text_field=args.text_field)
        db = build_database(docs, args.out)  # resumable: rerun after an interruption
    print(
        f"{args.out}: {db.num_chunks} chunks of m={db.chunk_size} from {db.num_documents} documents"
    )

    if args.query:
        tokens = db.tokenizer.encode(args.query)[: db.chunk_size]
        found = db.retrieve(
            [tokens + [db.pad_id] * (db.chunk_size - len(tokens))], k=args.k, lengths=[len(tokens)]
        )
        for rank in range(args.k):
            n = int(found.lengths[0, rank])
            text = db.tokenizer.decode(found.tokens[0, rank, :n].tolist())
            print(
                f"[{rank}] d^2={found.distances[0, rank]:.3f} chunk {found.chunk_ids[0, rank]}: "
                f"{text[:200]!r}"
            )


if __name__ == "__main__":
    main()
