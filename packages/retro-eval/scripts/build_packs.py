#!/usr/bin/env python
"""Rebuild the mini benchmark packs of retro-eval from the project's shared real text.

Reads ``--data DIR`` (required: the project's raw real-text folder, ~20 MB, described by its
SOURCES.md; it is not part of the repository) and writes
``packages/retro-eval/src/retro_eval/packs/{wikitext-mini,pile-mini,squad-open-mini}``. The output is
deterministic: same inputs -> byte-identical files (sorted hashes pick the splits, gzip/zstd headers carry
no time stamps, the DM Mathematics generator is seeded).

Build-only dependencies (not needed to *read* the packs): ``sacremoses`` (the Moses tokeniser that
Wikitext-103 was made with) and ``mathematics-dataset`` (DeepMind's generator of the Pile's DM
Mathematics subset; without it that subset is left out and the script says so).

Usage::

    python packages/retro-eval/scripts/build_packs.py --data DIR [--out DIR] [--check]
    nox -s packs_check -- --data DIR      # the same --check in a venv with the [packs] extra

``--check`` rebuilds into a temporary directory and fails if any file differs from the committed one.
"""

from __future__ import annotations

import argparse
import filecmp
import gzip
import hashlib
import io
import json
import logging
import os
import random
import re
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import zstandard

logger = logging.getLogger("build_packs")

REPO = Path(__file__).resolve().parents[3]
DEFAULT_OUT = REPO / "packages" / "retro-eval" / "src" / "retro_eval" / "packs"

# Size knobs (characters of source text); the packs must stay a few MB in git.
PILE_WIKI_EVERY = 3  # every 3rd gensim article (sorted by title) goes into pile-mini
PILE_DOC_CHARS = 40_000  # Gutenberg documents are cut at chapter boundaries to at most this size
MOBY_CHAPTERS = 45  # the first chapters of Moby Dick
KJV_BOOK_EVERY = 6  # every 6th book of the KJV (Genesis, Judges, ...)
SOTU_EVERY = 10  # every 10th State of the Union address (in date order)
DM_PAIRS_PER_DOC = 30  # question/answer pairs per DM Mathematics document (one module each)
DM_SEED = 1234

ZSTD_LEVEL = 19


# ----------------------------------------------------------------------------- helpers


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def split_of(key: str, salt: str) -> str:
    """Deterministic split by hash rank; see assign_splits."""
    return hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()


def assign_splits(keys: list[str], salt: str) -> dict[str, str]:
    """Order keys by sha256 and deal them: position % 10 == 0 -> test, == 1 -> validation, else train.

    Every split is non-empty once there are 3 keys; about 10% / 10% / 80%.
    """
    order = sorted(keys, key=lambda k: split_of(k, salt))
    out = {}
    for i, k in enumerate(order):
        out[k] = "test" if i % 10 == 0 else "validation" if i % 10 == 1 else "train"
    return out


def write_gzip(path: Path, text: str) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(text.encode("utf-8"))
    path.write_bytes(buf.getvalue())


def write_zst(path: Path, text: str) -> None:
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True, threads=0)
    path.write_bytes(cctx.compress(text.encode("utf-8")))


def jsonl(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)


# ----------------------------------------------------------------------------- wikitext-mini

_MOSES = None


def wt_tokenize(text: str) -> str:
    """Tokenise like Wikitext-103: Moses (aggressive hyphen splitting -> ``@-@``) then ``@,@``/``@.@``."""
    global _MOSES
    if _MOSES is None:
        from sacremoses import MosesTokenizer

        _MOSES = MosesTokenizer(lang="en")
    s = _MOSES.tokenize(text, aggressive_dash_splits=True, escape=False, return_str=True)
    s = re.sub(r"(?<=\d),(?=\d)", " @,@ ", s)
    s = re.sub(r"(?<=\d)\.(?=\d)", " @.@ ", s)
    return " ".join(s.split())


_HEADING = re.compile(r"(={2,6})\s*(.*?)\s*\1")


def wikitext_article(title: str, body_lines: Iterable[str]) -> list[str]:
    """One article in Wikitext-103 raw lines: `` \\n = Title = \\n \\n`` then paragraphs, sections
    `` = = Section = = `` (one ``=`` per level) each between blank lines ``" \\n"``."""
    out = [" \n", f" = {wt_tokenize(title)} = \n", " \n"]
    for raw in body_lines:
        line = " ".join(raw.split())
        if not line:
            continue
        m = _HEADING.fullmatch(line)
        if m:
            heading = wt_tokenize(m.group(2))
            if heading:
                eq = " ".join("=" * len(m.group(1)))
                out += [" \n", f" {eq} {heading} {eq} \n", " \n"]
            continue
        out.append(f" {wt_tokenize(line)} \n")
    return out


def build_wikitext(data: Path, out: Path) -> dict:
    articles: dict[str, list[str]] = {}  # title -> raw lines
    origin: dict[str, str] = {}
    for rec in read_jsonl(data / "wikipedia" / "gensim_enwiki_sample.jsonl"):
        articles[rec["title"]] = wikitext_article(rec["title"], rec["text"].split("\n"))
        origin[rec["title"]] = "gensim"
    for rec in read_jsonl(data / "squad" / "squad_dev_v1.1.articles.jsonl"):
        title = rec["title"].replace("_", " ")
        if title in articles:
            continue
        articles[title] = wikitext_article(title, rec["paragraphs"])
        origin[title] = "squad"
    splits = assign_splits(sorted(articles), salt="wikitext-mini")
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    for split, fname in (
        ("train", "wiki.train.raw"),
        ("validation", "wiki.valid.raw"),
        ("test", "wiki.test.raw"),
    ):
        titles = [t for t in sorted(articles) if splits[t] == split]
        text = "".join(line for t in titles for line in articles[t])
        write_gzip(out / (fname + ".gz"), text)
        stats[split] = {
            "articles": len(titles),
            "from_gensim": sum(origin[t] == "gensim" for t in titles),
            "from_squad": sum(origin[t] == "squad" for t in titles),
            "raw_bytes": len(text.encode("utf-8")),
            "gz_bytes": (out / (fname + ".gz")).stat().st_size,
            "titles": titles if split != "train" else None,
        }
    return stats


# ----------------------------------------------------------------------------- pile-mini


def chunk_sections(sections: list[tuple[str, str]], max_chars: int) -> list[tuple[str, str]]:
    """Join consecutive ``(label, text)`` sections into documents of at most ``max_chars`` (a single
    longer section stays whole); the document label is ``first label - last label``."""
    docs, cur, labels = [], [], []
    for label, text in sections:
        if cur and sum(len(t) for t in cur) + len(text) > max_chars:
            docs.append(
                (labels[0] if len(labels) == 1 else f"{labels[0]} - {labels[-1]}", "\n\n".join(cur))
            )
            cur, labels = [], []
        cur.append(text)
        labels.append(label)
    if cur:
        docs.append(
            (labels[0] if len(labels) == 1 else f"{labels[0]} - {labels[-1]}", "\n\n".join(cur))
        )
    return docs


def kjv_documents(data: Path) -> list[tuple[str, str]]:
    text = read_jsonl(data / "books" / "kjv_bible.jsonl")[0]["text"]
    parts = re.split(r"(?:^|\n)\n([^\n]+? \d+)\n\n", text)
    # parts = [preamble, heading1, body1, heading2, body2, ...]
    chapters = [
        (parts[i], f"{parts[i]}\n\n{parts[i + 1].strip()}") for i in range(1, len(parts), 2)
    ]
    books: dict[str, list[tuple[str, str]]] = {}
    for heading, chap in chapters:
        books.setdefault(heading.rsplit(" ", 1)[0], []).append((heading, chap))
    docs = []
    for b, (_, chaps) in enumerate(books.items()):
        if b % KJV_BOOK_EVERY:
            continue
        for label, body in chunk_sections(chaps, PILE_DOC_CHARS):
            docs.append((f"King James Bible, {label}", body))
    return docs


def moby_documents(data: Path) -> list[tuple[str, str]]:
    recs = read_jsonl(data / "books" / "moby_dick.jsonl")[:MOBY_CHAPTERS]
    sections = [(r["title"].replace("Moby Dick, ", ""), r["text"].strip()) for r in recs]
    return [
        (f"Moby Dick, {label}", body) for label, body in chunk_sections(sections, PILE_DOC_CHARS)
    ]


def _patch_sympy_for_mathematics_dataset() -> None:
    """mathematics-dataset 1.0.1 imports ``base_solution_linear`` from ``sympy.solvers.diophantine``,
    which newer sympy keeps in ``sympy.solvers.diophantine.diophantine``: re-export it there."""
    import importlib

    importlib.import_module("sympy.solvers.diophantine")
    pkg = sys.modules["sympy.solvers.diophantine"]
    if not hasattr(pkg, "base_solution_linear"):
        inner = importlib.import_module("sympy.solvers.diophantine.diophantine")
        pkg.base_solution_linear = inner.base_solution_linear


def _patch_numpy_for_mathematics_dataset() -> None:
    """mathematics-dataset 1.0.1's polynomial sampler uses ``np.object`` and ``ndarray.itemset``, both
    removed in numpy 2: give that one module a numpy whose ``zeros``/``empty`` arrays have ``itemset``."""
    import numpy as np
    from mathematics_dataset.sample import polynomials

    class ItemsetArray(np.ndarray):
        def itemset(self, index, value):  # the numpy 1 method: a[index] = value
            self[index] = value

    class NumpyCompat:
        object = object

        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def zeros(*args, **kwargs):
            return np.zeros(*args, **kwargs).view(ItemsetArray)

        @staticmethod
        def empty(*args, **kwargs):
            return np.empty(*args, **kwargs).view(ItemsetArray)

    polynomials.np = NumpyCompat()

    # Composed problems shuffle list(set of entities): the order before the shuffle follows id()
    # hashes, so a seed alone does not reproduce them. Sort by the entity's text, then shuffle.
    from mathematics_dataset.util import composition

    class SortedShuffle:
        def __getattr__(self, name):
            return getattr(random, name)

        @staticmethod
        def shuffle(items):
            if items and all(isinstance(e, composition.Entity) for e in items):
                # private fields: the public getters mark a handle as used
                items.sort(key=lambda e: (str(e._description), str(e._child_description)))
            random.shuffle(items)

    composition.random = SortedShuffle()


def dm_math_documents() -> tuple[list[tuple[str, str]], list[str], str | None]:
    """One document per module of mathematics-dataset (train-easy regime): question and answer lines,
    as the Pile's DM Mathematics files are. Returns (docs, skipped modules, error or None)."""
    try:
        import numpy as np
        import sympy.core.random as sympy_random

        _patch_sympy_for_mathematics_dataset()
        from absl import flags
        from mathematics_dataset import generate

        _patch_numpy_for_mathematics_dataset()
    except Exception as exc:  # package missing or incompatible
        return [], [], f"{type(exc).__name__}: {exc}"
    if not flags.FLAGS.is_parsed():
        flags.FLAGS(["build_packs"])
    generate.init_modules(train_split=True)
    docs, skipped = [], []
    for name, module in generate.filtered_modules["train-easy"].items():
        random.seed(f"{DM_SEED}:{name}")
        sympy_random.seed(f"{DM_SEED}:{name}")  # sympy keeps its own random.Random
        # the generator draws from the legacy global numpy state, so that is what must be seeded
        np.random.seed(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) ^ DM_SEED)  # noqa: NPY002
        lines = []
        try:
            for _ in range(DM_PAIRS_PER_DOC):
                problem, _ = generate.sample_from_module(module)
                lines += [str(problem.question), str(problem.answer)]
        except Exception as exc:  # a few modules use numpy APIs removed in numpy 2
            skipped.append(f"{name} ({type(exc).__name__})")
            continue
        docs.append((f"train-easy/{name}", "\n".join(lines) + "\n"))
    return docs, skipped, None


def build_pile(data: Path, out: Path) -> dict:
    subsets: dict[str, list[tuple[str, str]]] = {}
    wiki = sorted(
        read_jsonl(data / "wikipedia" / "gensim_enwiki_sample.jsonl"), key=lambda r: r["title"]
    )
    subsets["Wikipedia (en)"] = [
        (r["title"], f"{r['title']}\n\n{r['text'].strip()}")
        for i, r in enumerate(wiki)
        if i % PILE_WIKI_EVERY == 0
    ]
    subsets["Gutenberg (PG-19)"] = moby_documents(data) + kjv_documents(data)
    sotu = read_jsonl(data / "speeches" / "state_of_the_union.jsonl")
    subsets["US presidential speeches"] = [
        (r["title"], r["text"].strip()) for i, r in enumerate(sotu) if i % SOTU_EVERY == 0
    ]
    dm_docs, dm_skipped, dm_error = dm_math_documents()
    if dm_error:
        logger.warning("DM Mathematics left out: mathematics-dataset unusable (%s)", dm_error)
    else:
        subsets["DM Mathematics"] = dm_docs

    records: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    stats: dict = {
        "subsets": {},
        "dm_mathematics_skipped_modules": dm_skipped,
        "dm_mathematics_error": dm_error,
    }
    for name, docs in subsets.items():
        splits = assign_splits([title for title, _ in docs], salt=f"pile-mini:{name}")
        per = {"train": 0, "validation": 0, "test": 0}
        for title, text in docs:
            s = splits[title]
            records[s].append({"text": text, "meta": {"pile_set_name": name, "title": title}})
            per[s] += 1
        stats["subsets"][name] = {"documents": per, "chars": sum(len(t) for _, t in docs)}
    out.mkdir(parents=True, exist_ok=True)
    for split, stem in (("train", "train"), ("validation", "val"), ("test", "test")):
        write_zst(out / f"{stem}.jsonl.zst", jsonl(records[split]))
        stats[f"{stem}.jsonl.zst"] = (out / f"{stem}.jsonl.zst").stat().st_size
    return stats


# ----------------------------------------------------------------------------- squad-open-mini


def build_squad(data: Path, out: Path) -> dict:
    articles = read_jsonl(data / "squad" / "squad_dev_v1.1.articles.jsonl")
    qas = read_jsonl(data / "squad" / "squad_dev_v1.1.qa.jsonl")
    paragraphs = {a["title"]: a["paragraphs"] for a in articles}

    passages = [
        {"id": f"{a['title']}#{i}", "title": a["title"].replace("_", " "), "text": p}
        for a in articles
        for i, p in enumerate(a["paragraphs"])
    ]
    nq = [
        {
            "question": q["question"],
            "answer": q["answers"],
            "id": q["id"],
            "passage_id": f"{q['title']}#{q['paragraph']}",
        }
        for q in qas
    ]
    # The official nested SQuAD v1.1 JSON; answer_start = first occurrence of the answer in its
    # paragraph (the source keeps answer texts only; every one of them occurs verbatim).
    by_para: dict[tuple[str, int], list[dict]] = {}
    for q in qas:
        ctx = paragraphs[q["title"]][q["paragraph"]]
        answers = []
        for a in q["answers"]:
            start = ctx.find(a)
            if start < 0:
                raise SystemExit(f"answer {a!r} of {q['id']} not in its paragraph")
            answers.append({"text": a, "answer_start": start})
        by_para.setdefault((q["title"], q["paragraph"]), []).append(
            {"id": q["id"], "question": q["question"], "answers": answers}
        )
    squad = {
        "version": "1.1",
        "data": [
            {
                "title": a["title"],
                "paragraphs": [
                    {"context": p, "qas": by_para.get((a["title"], i), [])}
                    for i, p in enumerate(a["paragraphs"])
                ],
            }
            for a in articles
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    write_gzip(out / "squad-open.dev.jsonl.gz", jsonl(nq))
    write_gzip(out / "passages.jsonl.gz", jsonl(passages))
    write_gzip(
        out / "dev-v1.1.json.gz", json.dumps(squad, ensure_ascii=False, sort_keys=True) + "\n"
    )
    return {
        "questions": len(nq),
        "passages": len(passages),
        "articles": len(articles),
        **{
            f: (out / f).stat().st_size
            for f in ("squad-open.dev.jsonl.gz", "passages.jsonl.gz", "dev-v1.1.json.gz")
        },
    }


def build_all(data: Path, out: Path) -> dict:
    stats = {
        "wikitext-mini": build_wikitext(data, out / "wikitext-mini"),
        "pile-mini": build_pile(data, out / "pile-mini"),
        "squad-open-mini": build_squad(data, out / "squad-open-mini"),
    }
    (out / "packs_stats.json").write_text(
        json.dumps(stats, indent=1, sort_keys=True) + "\n", encoding="utf-8"
    )
    return stats


PACK_FILES = [
    "wikitext-mini/wiki.train.raw.gz",
    "wikitext-mini/wiki.valid.raw.gz",
    "wikitext-mini/wiki.test.raw.gz",
    "pile-mini/train.jsonl.zst",
    "pile-mini/val.jsonl.zst",
    "pile-mini/test.jsonl.zst",
    "squad-open-mini/squad-open.dev.jsonl.gz",
    "squad-open-mini/passages.jsonl.gz",
    "squad-open-mini/dev-v1.1.json.gz",
    "packs_stats.json",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="the raw real-text folder (with its SOURCES.md)"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="the packs directory to write"
    )
    parser.add_argument(
        "--check", action="store_true", help="rebuild in a temp dir and compare with --out"
    )
    args = parser.parse_args(argv)
    if os.environ.get("PYTHONHASHSEED") != "0":
        # mathematics-dataset (through sympy) iterates sets of strings: fix the hash seed and re-run.
        os.execve(
            sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"}
        )
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if not (args.data / "SOURCES.md").is_file():
        parser.error(f"{args.data}: not the raw real-text folder (no SOURCES.md)")
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            build_all(args.data, Path(tmp))
            bad = [
                f for f in PACK_FILES if not filecmp.cmp(Path(tmp) / f, args.out / f, shallow=False)
            ]
        if bad:
            print("differs from a rebuild: " + ", ".join(bad))
            return 1
        print("packs are byte-identical to a rebuild")
        return 0
    stats = build_all(args.data, args.out)
    print(json.dumps(stats, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
