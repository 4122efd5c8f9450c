"""BM25 chunk retrieval (retro_db.bm25) against Lucene BM25 computed by hand on a tiny corpus."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

pytest.importorskip("bm25s")

from retro_db.bm25 import BM25Retriever

DOCS = [
    "apple banana apple cherry",
    "banana date elderberry",
    "cherry cherry fig grape",
    "apple fig",
    "kiwi lemon mango",
]


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    from retro_db.build import build_database
    from retro_db.database import Database
    from retro_db.ingest import Document
    from retro_db.tokenizer import load_tokenizer

    path = tmp_path_factory.mktemp("bm25") / "db"
    build_database(
        [Document(doc_id=f"d{i}", text=t, meta={}) for i, t in enumerate(DOCS)],
        path,
        tokenizer=load_tokenizer(None),
        embedder="hash:32",
        chunk_size=64,  # one chunk per document: chunk i is DOCS[i]
        progress=False,
    )
    return Database.open(path)


def _hand_scores(query: str, k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """Lucene BM25 of every document: idf = ln(1 + (N - df + 0.5) / (df + 0.5)) and
    tf / (tf + k1 (1 - b + b dl / avgdl)) (Lucene 8+ drops the classic constant factor k1 + 1)."""
    docs = [re.findall(r"\b\w\w+\b", d.lower()) for d in DOCS]
    avgdl = sum(map(len, docs)) / len(docs)
    out = np.zeros(len(docs))
    for t in set(re.findall(r"\b\w\w+\b", query.lower())):
        df = sum(t in d for d in docs)
        idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
        for i, d in enumerate(docs):
            tf = d.count(t)
            out[i] += idf * tf / (tf + k1 * (1 - b + b * len(d) / avgdl))
    return out


def _query(db, text):
    toks = db.tokenizer.encode(text)
    row = np.full((1, 64), db.pad_id, dtype=np.int64)
    row[0, : len(toks)] = toks
    return row


def test_bm25_scores_and_ranking_equal_hand_computed_lucene_bm25(db):
    assert db.num_chunks == len(DOCS)
    bm = BM25Retriever(db)
    assert bm.chunk_size == 64 and bm.tokenizer_id == db.tokenizer_id
    for query in ("apple cherry", "fig grape banana", "mango"):
        hand = _hand_scores(query)
        nb = bm.retrieve(_query(db, query), 3)
        order = np.argsort(-hand, kind="stable")[:3]
        np.testing.assert_allclose(-nb.distances[0], hand[order], rtol=1e-5)
        hit = hand[order] > 0  # zero-score ties come in any order
        assert nb.chunk_ids[0][hit].tolist() == order[hit].tolist()
        # the neighbour rows are the chunks themselves (no continuation: one chunk per document)
        best = int(nb.chunk_ids[0, 0])
        want = db.tokenizer.encode(DOCS[best])
        assert nb.lengths[0, 0] == len(want)
        assert nb.tokens[0, 0, : len(want)].tolist() == want


def test_bm25_excludes_a_document_and_caps_k(db):
    bm = BM25Retriever(db)
    q = np.concatenate([_query(db, "apple cherry"), _query(db, "apple cherry")])
    best = int(np.argmax(_hand_scores("apple cherry")))
    doc_of_best = int(db.store.doc_ids_of([best])[0])
    nb = bm.retrieve(q, 2, exclude_doc_ids=np.array([doc_of_best, -1]))
    assert best not in nb.chunk_ids[0].tolist() and nb.chunk_ids[1, 0] == best
    order = np.argsort(-_hand_scores("apple cherry"), kind="stable")
    assert nb.chunk_ids[0, 0] == order[1]
    many = bm.retrieve(q[:1], 10, exclude_doc_ids=np.array([doc_of_best]))
    assert (many.chunk_ids[0] >= 0).sum() == len(DOCS) - 1
    assert np.isinf(many.distances[0, len(DOCS) - 1 :]).all()
