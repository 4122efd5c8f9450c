"""Wikitext-103 (raw) reader: ``wiki.{train,valid,test}.raw`` files or the ``datasets`` Parquet export.

The raw format (Merity et al. 2016): one paragraph per line, Moses-tokenised (spaces around
punctuation, ``@-@`` / ``@,@`` / ``@.@`` for hyphens and number separators), every line starting with
a space; articles start at a top-level heading line `` = Title = ``, sections at `` = = Section = = ``;
blank lines are a single space. The Parquet export of ``datasets`` has one line per row in column
``text`` with blank lines as ``""``.

Documents are articles. As in lm-eval's ``wikitext`` task, a model scores the detokenised article
(:func:`wikitext_detokenize`, which calls lm-eval's own detokeniser) and word-level perplexity divides
by the number of words of the *raw* article (:func:`wikitext_word_count`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path

from ._io import open_text, strip_compression
from .types import BenchmarkError, Document, canonical_split

__all__ = [
    "WIKITEXT_FILES",
    "is_title_line",
    "read_wikitext",
    "rows_to_lines",
    "split_articles",
    "wikitext_detokenize",
    "wikitext_documents",
    "wikitext_word_count",
]

logger = logging.getLogger(__name__)

#: canonical split -> file name in the Wikitext-103 raw release.
WIKITEXT_FILES = {
    "train": "wiki.train.raw",
    "validation": "wiki.valid.raw",
    "test": "wiki.test.raw",
}

_WS = re.compile(r"\s+")


def is_title_line(line: str) -> bool:
    """True for an article heading `` = Title = `` (not a section `` = = Section = = ``)."""
    s = line.strip()
    return len(s) > 4 and s.startswith("= ") and s.endswith(" =") and not s.startswith("= =")


def split_articles(lines: Iterable[str]) -> list[tuple[str, str]]:
    """Split Wikitext lines (each ending in ``\\n``) into ``(title, page)`` articles.

    A page is its title line and every line up to the next title line, joined unchanged (the
    document that lm-eval's ``wikitext_document_level`` data calls ``page``). Lines before the first
    title are dropped if blank; non-blank text there is kept as an untitled article.
    """
    articles: list[tuple[str, str]] = []
    title: str | None = None
    buf: list[str] = []

    def flush() -> None:
        if title is not None:
            articles.append((title, "".join(buf)))
        elif any(line.strip() for line in buf):
            articles.append(("", "".join(buf)))

    for line in lines:
        if is_title_line(line):
            flush()
            title = line.strip()[2:-2].strip()
            buf = [line]
        else:
            buf.append(line)
    flush()
    return articles


def wikitext_detokenize(page: str) -> str:
    """The standard Wikitext detokeniser: lm-eval's ``wikitext`` task function, called as is."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    return wikitext_detokenizer({"page": page})


def wikitext_word_count(page: str) -> int:
    """Words of a raw page for word-level perplexity, counted exactly as lm-eval does.

    lm-eval's ``process_results`` uses ``len(re.split(r"\\s+", page))`` on the raw
    (not detokenised) page; we keep that definition so word perplexities agree.
    """
    return len(_WS.split(page))


def wikitext_documents(
    lines: Iterable[str], *, detokenize: bool = True, source: str = ""
) -> list[Document]:
    """Turn Wikitext lines into one :class:`Document` per article.

    Args:
        lines: raw lines, each ending in ``\\n`` (a Parquet/hub row ``""`` is passed as ``" \\n"``).
        detokenize: store the detokenised article in ``text`` (what a model scores); else the raw page.
        source: file name for log messages.

    Returns:
        Documents with ``doc_id`` = title (``#2``, ``#3`` appended to repeated titles) and ``meta``
        ``{"title", "words": raw word count, "raw_bytes": UTF-8 bytes of the raw page}``.
    """
    docs: list[Document] = []
    seen: dict[str, int] = {}
    for title, page in split_articles(lines):
        n = seen.get(title, 0) + 1
        seen[title] = n
        doc_id = title if n == 1 else f"{title}#{n}"
        text = wikitext_detokenize(page) if detokenize else page
        meta = {
            "title": title,
            "words": wikitext_word_count(page),
            "raw_bytes": len(page.encode("utf-8")),
        }
        docs.append(Document(doc_id=doc_id, text=text, meta=meta))
    logger.debug("%s: %d articles", source or "wikitext", len(docs))
    return docs


def rows_to_lines(rows: Iterable[str | None]) -> Iterable[str]:
    """Wikitext rows as exported by ``datasets`` (one line each, blank lines as ``""`` or None)
    -> the lines of the raw file, each ending in ``\\n`` (a blank line as ``" \\n"``)."""
    for row in rows:
        if not row:  # the datasets export stores blank lines as ""
            yield " \n"
        else:
            yield row if row.endswith("\n") else row + "\n"


def _parquet_rows(path: Path) -> list[str | None]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise BenchmarkError(f"{path}: not a readable Parquet file ({exc})") from None
    if "text" not in table.column_names:
        raise BenchmarkError(
            f"{path}: Parquet file has no 'text' column (has {table.column_names})"
        )
    return table.column("text").to_pylist()


def _split_files(directory: Path, split: str) -> list[Path]:
    raw = WIKITEXT_FILES[split]
    for name in (raw, raw + ".gz", raw + ".zst"):
        if (directory / name).is_file():
            return [directory / name]
    hf = sorted(directory.glob(f"{split}-*.parquet")) or sorted(directory.glob(f"{split}.parquet"))
    return hf


def read_wikitext(
    path: str | Path, split: str | None = "test", *, detokenize: bool = True
) -> list[Document]:
    """Read one Wikitext split as articles.

    Args:
        path: a directory holding ``wiki.{train,valid,test}.raw`` (optionally ``.gz``/``.zst``) or the
            Parquet export (``{split}-*.parquet`` / ``{split}.parquet``); or one such file (then
            ``split`` is ignored).
        split: ``train``, ``validation`` (``valid``) or ``test``.
        detokenize: see :func:`wikitext_documents`.

    Raises:
        BenchmarkError: the split's file is missing, unreadable or holds no article.
    """
    path = Path(path)
    if path.is_dir():
        canon = canonical_split(split or "test")
        files = _split_files(path, canon)
        if not files:
            raise BenchmarkError(
                f"{path}: no Wikitext split {canon!r} (expected {WIKITEXT_FILES[canon]}[.gz] "
                f"or {canon}-*.parquet)"
            )
    elif path.is_file():
        files = [path]
    else:
        raise BenchmarkError(f"{path}: no such file or directory")

    lines: list[str] = []
    for f in files:
        if strip_compression(f.name).endswith(".parquet"):
            lines.extend(rows_to_lines(_parquet_rows(f)))
        else:
            with open_text(f) as fh:
                lines.extend(fh)
    docs = wikitext_documents(lines, detokenize=detokenize, source=str(path))
    if not docs:
        raise BenchmarkError(f"{', '.join(map(str, files))}: empty Wikitext benchmark (no article)")
    return docs
