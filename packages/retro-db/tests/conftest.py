import os

# Nothing may load from a model or data hub at test time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# ---- shared fixtures of the database tests (db-A) --------------------------------------------
import json as _json
from pathlib import Path as _Path

import pytest

# ../shared/data beside the clone (CI checks ../shared out next to the repository).
DATA = _Path(__file__).resolve().parents[3].parent / "shared" / "data"


def real_records(rel: str, n: int, max_chars: int = 1500) -> list[dict]:
    """The first n records of a JSONL file under shared/data, texts cut to max_chars."""
    path = DATA / rel
    if not path.is_file():
        pytest.skip(f"{path} not found (shared/data must sit beside the clone)")
    out = []
    with open(path, encoding="utf-8") as f:
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
        for r in real_records("wikipedia/gensim_enwiki_sample.jsonl", 14)
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
    """The ``real_records(rel, n, max_chars)`` helper as a fixture (test modules can't import conftest)."""
    return real_records
