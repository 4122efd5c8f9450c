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


# ---- a database with BM25 keys (retro-db build --keys bm25) ------------------------------------


@pytest.fixture(scope="module")
def bm25_db(tmp_path_factory):
    """The tiny corpus again, built with BM25 keys (one chunk per document)."""
    from retro_db.build import build_database
    from retro_db.ingest import Document
    from retro_db.tokenizer import load_tokenizer

    path = tmp_path_factory.mktemp("bm25keys") / "db"
    return build_database(
        [Document(doc_id=f"d{i}", text=t, meta={}) for i, t in enumerate(DOCS)],
        path,
        tokenizer=load_tokenizer(None),
        keys="bm25",
        chunk_size=64,
        progress=False,
    )


def test_bm25_database_scores_equal_hand_computed_lucene_bm25(bm25_db):
    db = bm25_db
    assert db.keys_kind == "bm25" and db.num_chunks == len(DOCS)
    assert "bm25" in db.info()["keys"] and "recall@10" not in db.info()
    assert not any(name.endswith("keys.npy") for name in db.manifest["files"])
    for query in ("apple cherry", "fig grape banana", "mango"):
        hand = _hand_scores(query)
        nb = db.retrieve(_query(db, query), 3)
        order = np.argsort(-hand, kind="stable")[:3]
        np.testing.assert_allclose(-nb.distances[0], hand[order], rtol=1e-5)
        hit = hand[order] > 0
        assert nb.chunk_ids[0][hit].tolist() == order[hit].tolist()


@pytest.fixture(scope="module")
def wiki_bm25(tmp_path_factory, wiki_docs):
    """Six real articles, m = 16, BM25 keys, two shards; and the chunk texts made here from the
    tokenizer alone (16-token windows of each document), the independent side of the tests."""
    from retro_db.build import build_database
    from retro_db.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    docs = wiki_docs[:6]
    db = build_database(
        docs,
        tmp_path_factory.mktemp("wikibm25") / "db",
        tokenizer=tok,
        keys="bm25",
        chunk_size=16,
        shard_chunks=60,
        progress=False,
    )
    texts, owner = [], []
    for i, d in enumerate(docs):
        ids = tok.encode(d.text)
        for a in range(0, len(ids), 16):
            texts.append(tok.decode(ids[a : a + 16]))
            owner.append(i)
    return db, texts, np.array(owner)


def _bm25s_scores(texts: list[str], queries: list[str]) -> np.ndarray:
    """bm25s's own scores [q, N] of every chunk text (Lucene BM25, the same tokenisation)."""
    import bm25s

    bm = bm25s.BM25(method="lucene")
    bm.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    toks = bm25s.tokenize(queries, stopwords="en", return_ids=False, show_progress=False)
    return np.stack([bm.get_scores(t) if t else np.zeros(len(texts)) for t in toks])


def test_bm25_database_neighbours_equal_bm25s_top_k(wiki_bm25):
    db, texts, _ = wiki_bm25
    assert db.num_chunks == len(texts) and len(db.manifest["shards"]) == 2
    q = np.arange(0, len(texts), 7)
    tokens, lengths = db.chunk_tokens(q)
    nb = db.retrieve(tokens, 4, lengths=lengths)
    truth = _bm25s_scores(texts, [texts[i] for i in q])
    top = -np.sort(-truth, axis=1)[:, :4]
    np.testing.assert_allclose(-nb.distances, top, rtol=1e-5)
    # every neighbour is a chunk whose bm25s score is the one reported (ties in any order)
    got = truth[np.arange(len(q))[:, None], nb.chunk_ids]
    np.testing.assert_allclose(got, -nb.distances, rtol=1e-5)
    some = top[:, 0] > top[:, 1]  # a chunk with terms of its own is its best match
    assert some.sum() > len(q) // 2 and (nb.chunk_ids[some, 0] == q[some]).all()
    row = nb.tokens[0, 0, : nb.lengths[0, 0]]
    assert db.tokenizer.decode(row[:16]) == texts[q[0]]


def test_bm25_training_neighbours_exclude_the_own_document(wiki_bm25, tmp_path):
    from retro_db.neighbours import write_neighbours

    db, texts, owner = wiki_bm25
    write_neighbours(db, None, tmp_path / "nb", k=3, shard_chunks=50, progress=False)
    ids = np.load(tmp_path / "nb" / "neighbour_ids.npy")
    dist = np.load(tmp_path / "nb" / "neighbour_distances.npy")
    doc_ids = np.load(tmp_path / "nb" / "doc_ids.npy")
    assert ids.shape == (len(texts), 3) and (ids >= 0).all()
    assert (doc_ids == owner).all() and (owner[ids] != owner[:, None]).all()
    truth = _bm25s_scores(texts, texts)
    truth[owner[:, None] == owner[None, :]] = -np.inf  # the own document's chunks are excluded
    np.testing.assert_allclose(-dist, -np.sort(-truth, axis=1)[:, :3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(truth[np.arange(len(texts))[:, None], ids], -dist, rtol=1e-5)


def test_bm25_index_folder_is_bm25s_own_format(wiki_bm25):
    import bm25s

    db, texts, _ = wiki_bm25
    folder = db.path / db.manifest["index"]["file"].rsplit("/", 1)[0]
    bm = bm25s.BM25.load(folder, allow_pickle=False)
    query = bm25s.tokenize(texts[:3], stopwords="en", return_ids=False, show_progress=False)
    _, scores = bm.retrieve(query, k=2, show_progress=False)
    tokens, lengths = db.chunk_tokens(np.arange(3))
    np.testing.assert_allclose(-db.retrieve(tokens, 2, lengths=lengths).distances, scores)


@pytest.mark.parametrize(
    "name,edit",
    [
        ("data.csc.index.npy", "flip"),
        ("vocab.index.json", "flip"),
        ("params.index.json", "flip"),
        ("indices.csc.index.npy", "truncate"),
    ],
)
def test_a_tampered_bm25_index_is_refused_at_open(wiki_bm25, tmp_path, name, edit):
    import shutil

    from retro_db.database import Database
    from retro_db.manifest import DatabaseError

    db, _, _ = wiki_bm25
    copy = tmp_path / "db"
    shutil.copytree(db.path, copy)
    p = copy / db.manifest["index"]["file"].rsplit("/", 1)[0] / name
    data = bytearray(p.read_bytes())
    if edit == "flip":
        data[-2] ^= 0x01  # same size: only the hash can tell
    else:
        del data[-4:]
    p.write_bytes(bytes(data))
    with pytest.raises(DatabaseError, match=name):
        Database.open(copy)


def test_bm25_prefix_index_scores_the_prefix_alone(wiki_bm25):
    """A prefix of a BM25 database is a bm25s index of those chunks only (its own idf and
    average length), not the whole index filtered."""
    from retro_db.prefix import PrefixRetriever, prefix_chunks

    db, texts, _ = wiki_bm25
    n = prefix_chunks(db.doc_ids, db.num_documents, 0.5)
    assert 0 < n < db.num_chunks
    q = np.arange(0, len(texts), 5)
    tokens, lengths = db.chunk_tokens(q)
    nb = PrefixRetriever(db, n).retrieve(tokens, 3, lengths=lengths)
    truth = _bm25s_scores(texts[:n], [texts[i] for i in q])
    assert (nb.chunk_ids < n).all()
    np.testing.assert_allclose(-nb.distances, -np.sort(-truth, axis=1)[:, :3], rtol=1e-5)
    got = truth[np.arange(len(q))[:, None], nb.chunk_ids]
    np.testing.assert_allclose(got, -nb.distances, rtol=1e-5)
    whole = db.retrieve(tokens, 3, lengths=lengths)
    assert not np.allclose(whole.distances[q < n], nb.distances[q < n])  # idf differs


def test_gc_deletes_an_old_versions_bm25_folder_and_a_stray_one(tmp_path):
    from retro_db.build import add_documents, build_database, collect_garbage
    from retro_db.database import Database
    from retro_db.ingest import Document

    path = tmp_path / "db"
    docs = [Document(doc_id=f"d{i}", text=t, meta={}) for i, t in enumerate(DOCS)]
    build_database(docs[:3], path, keys="bm25", chunk_size=64, progress=False)
    add_documents(path, docs[3:], progress=False)  # version 2: idf changed, a new BM25 folder
    assert sorted(p.name for p in (path / "index").iterdir()) == ["v00001.bm25", "v00002.bm25"]
    stray = path / "index" / "v00003.bm25"  # as an add killed before its manifest leaves it
    stray.mkdir()
    (stray / "params.index.json").write_text("{}")
    res = collect_garbage(path, grace=0, keep=1)
    assert res.versions_removed == [1]
    assert "index/v00003.bm25/params.index.json" in res.removed
    assert sorted(p.name for p in (path / "index").iterdir()) == ["v00002.bm25"]
    d = Database.open(path, verify=True)
    assert d.version == 2 and d.num_documents == len(DOCS)
    # the kept version still retrieves: document 4's chunk finds itself first
    assert int(d.retrieve(_query(d, DOCS[4]), 1).chunk_ids[0][0]) == 4
