import os

# Nothing may load from a model or data hub at test time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# ---- shared fixtures of the database tests (db-A) --------------------------------------------
import gzip as _gzip
import json as _json
from pathlib import Path as _Path

import pytest

# Small real texts committed beside the tests (see data/README.md: sources and licences).
DATA = _Path(__file__).resolve().parent / "data"
#: fixture name -> (records in the file, characters each text was cut to); see data/cut.py
FIXTURES = {"wikipedia": (48, 10000), "moby_dick": (40, 10000)}


def real_records(name: str, n: int, max_chars: int = 1500) -> list[dict]:
    """The first n records of the fixture ``data/<name>.jsonl.gz``, texts cut to max_chars.

    Asking for more records or characters than the fixture holds is an error (cut a bigger fixture
    with data/cut.py), and so is a missing file: the tests never skip for lack of data.
    """
    if name not in FIXTURES:
        raise ValueError(f"unknown fixture {name!r}: expected one of {sorted(FIXTURES)}")
    records, chars = FIXTURES[name]
    if n > records or max_chars > chars:
        raise ValueError(
            f"{name}: asked {n} records of {max_chars} characters; the fixture holds "
            f"{records} of at most {chars}"
        )
    path = DATA / f"{name}.jsonl.gz"
    if not path.is_file():
        pytest.fail(f"test data {path} is missing (it is committed with the tests)")
    out = []
    with _gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            rec = _json.loads(line)
            if isinstance(rec.get("text"), str):
                rec["text"] = rec["text"][:max_chars]
            out.append(rec)
            if len(out) == n:
                break
    return out


@pytest.fixture(scope="session")
def wiki_docs():
    """14 real Wikipedia articles (cut to 1500 characters) as Documents."""
    from retro_db.ingest import Document

    return [
        Document(r["title"], r["text"], {"pageid": r["pageid"]})
        for r in real_records("wikipedia", 14)
    ]


@pytest.fixture(scope="session")
def small_db(tmp_path_factory, wiki_docs):
    """A database of the first 10 articles: m=16, hashing embedder d=32, Flat index, 3 shards."""
    from retro_db.build import build_database

    path = tmp_path_factory.mktemp("db") / "db"
    build_database(
        wiki_docs[:10],
        path,
        embedder="hash:32",
        chunk_size=16,
        shard_chunks=60,
        threads=1,
        progress=False,
    )
    return path


@pytest.fixture(scope="session")
def load_records():
    """The ``real_records(name, n, max_chars)`` helper as a fixture (test modules can't import conftest)."""
    return real_records
