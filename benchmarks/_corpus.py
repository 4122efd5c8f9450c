"""The benchmarks' real text: retro-eval's shipped packs by default, a raw-text folder with --data.

Default (a fresh clone needs nothing else): the documents of retro-eval's packs, in a fixed order:
``wikipedia`` = wikitext-mini train, validation, test (the 106 gensim Wikipedia articles and the 48
SQuAD v1.1 dev articles, Wikitext's tokenisation undone), ``books`` = pile-mini's Gutenberg (PG-19)
subset (Moby-Dick ch. 1-45, every 6th book of the King James Bible), ``speeches`` = pile-mini's US
presidential speeches (every 10th State of the Union address); about 6.9M characters, 1.5M GPT-2
tokens (provenance and licences: ``packages/retro-eval/src/retro_eval/packs/PACKS.md``).

``--data DIR``: the raw JSONL folder the packs were built from (its SOURCES.md layout, ~20 MB, not
part of the repository), read whole as the earlier measurements in README.md did.
Either way a document is one string whose paragraphs are separated by blank lines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: kind -> raw files (path under --data, text field) in the order the benchmarks read them
RAW = {
    "wikipedia": [("wikipedia/gensim_enwiki_sample.jsonl", "text")],
    "moby_dick": [("books/moby_dick.jsonl", "text")],
    "speeches": [("speeches/state_of_the_union.jsonl", "text")],
    "bible": [("books/kjv_bible.jsonl", "text")],
    "squad": [("squad/squad_dev_v1.1.articles.jsonl", "paragraphs")],
}
#: the raw kinds each pack kind stands for (a raw list maps onto the packs through this)
PACK_OF = {
    "wikipedia": "wikipedia",
    "squad": "wikipedia",
    "moby_dick": "books",
    "bible": "books",
    "speeches": "speeches",
}
PILE_SUBSET = {"books": "Gutenberg (PG-19)", "speeches": "US presidential speeches"}
SPLITS = ("train", "validation", "test")


def add_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--data",
        type=Path,
        default=None,
        help="raw real-text folder (SOURCES.md layout); default: retro-eval's shipped packs",
    )


def describe(data: Path | None) -> str:
    return f"the raw text of {data.name}/" if data is not None else "retro-eval's shipped packs"


def _paragraphs(text: str) -> str:
    return "\n\n".join(line.strip() for line in text.split("\n") if line.strip())


def _pack_documents(kind: str) -> list[str]:
    from retro_eval.benchmarks import load_benchmark

    if kind == "wikipedia":
        return [
            _paragraphs(d.text)
            for split in SPLITS
            for d in load_benchmark("wikitext-mini", split).documents
        ]
    return [
        _paragraphs(d.text)
        for split in SPLITS
        for d in load_benchmark("pile-mini", split).by_subset()[PILE_SUBSET[kind]]
    ]


def documents(data: Path | None, kinds: list[str]) -> list[str]:
    """The documents of ``kinds`` (keys of RAW), in that order.

    With ``data`` None the packs stand in: each pack kind is read once, at its first raw kind.
    """
    docs: list[str] = []
    if data is None:
        seen: list[str] = []
        for kind in kinds:
            pack = PACK_OF[kind]
            if pack not in seen:
                seen.append(pack)
                docs += _pack_documents(pack)
        return docs
    if not (data / "SOURCES.md").is_file():
        raise SystemExit(f"--data {data}: not the raw real-text folder (no SOURCES.md)")
    for kind in kinds:
        for name, field in RAW[kind]:
            with (data / name).open(encoding="utf-8") as f:
                for line in f:
                    rec = json.loads(line)
                    docs.append("\n\n".join(rec[field]) if field == "paragraphs" else rec[field])
    return docs
