"""write_neighbours: the training dataset format of API.md, exclusion, resumption."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from retro_db.database import Database
from retro_db.manifest import DatabaseError
from retro_db.neighbours import DATASET_FILES, write_neighbours
from retro_db.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def db(small_db):
    return Database.open(small_db)


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_self_dataset_format_exactly(db, tmp_path):
    out = tmp_path / "ds"
    write_neighbours(db, None, out, k=3, shard_chunks=50, progress=False)
    man = json.loads((out / "manifest.json").read_text())
    n, m = db.num_chunks, db.chunk_size
    assert {
        k: man[k]
        for k in man
        if k not in ("files", "source_db", "counts", "tokenizer_id", "checksum")
    } == {
        "format": "retro-dataset",
        "version": 1,
        "chunk_size": m,
        "num_neighbours": 3,
        "neighbour_len": 2 * m,
        "vocab_size": 50257,
        "pad_id": 50256,
    }
    assert man["tokenizer_id"] == load_tokenizer().id
    body = json.dumps(
        {k: v for k, v in man.items() if k != "checksum"},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    assert man["checksum"] == hashlib.sha256(body.encode()).hexdigest()
    assert man["counts"] == {"chunks": n, "documents": db.num_documents}
    assert man["source_db"] == {
        "id": db.id,
        "manifest_sha256": _sha(db.path / "manifest.json"),
    }
    expect = {
        "tokens.npy": ([n, m], "uint16"),
        "lengths.npy": ([n], "int32"),
        "doc_ids.npy": ([n], "int64"),
        "neighbours.npy": ([n, 3, 2 * m], "uint16"),
        "neighbour_lengths.npy": ([n, 3], "int32"),
        "neighbour_ids.npy": ([n, 3], "int64"),
        "neighbour_distances.npy": ([n, 3], "float32"),
    }
    assert set(man["files"]) == set(expect)
    for name, (shape, dtype) in expect.items():
        a = np.load(out / name, allow_pickle=False)
        assert list(a.shape) == shape and str(a.dtype) == dtype, name
        assert man["files"][name]["shape"] == shape and man["files"][name]["dtype"] == dtype
        assert man["files"][name]["sha256"] == _sha(out / name)
    assert sorted(p.name for p in out.iterdir()) == sorted([*DATASET_FILES, "manifest.json"])
    # contents: the database's chunks, neighbours never from the own document, rows from the store
    tokens, lengths = db.chunk_tokens(np.arange(n))
    np.testing.assert_array_equal(np.load(out / "tokens.npy"), tokens)
    np.testing.assert_array_equal(np.load(out / "lengths.npy"), lengths)
    doc_ids = np.load(out / "doc_ids.npy")
    np.testing.assert_array_equal(doc_ids, db.doc_ids)
    nid = np.load(out / "neighbour_ids.npy")
    assert np.all(nid >= 0)
    assert not np.any(db.doc_ids[nid] == doc_ids[:, None])
    rows, rlen = db.store.neighbour_rows(nid.reshape(-1))
    np.testing.assert_array_equal(np.load(out / "neighbours.npy").reshape(-1, 2 * m), rows)
    np.testing.assert_array_equal(np.load(out / "neighbour_lengths.npy").reshape(-1), rlen)
    # equal to retrieve() with the same exclusion
    nb = db.retrieve(tokens[:20], 3, exclude_doc_ids=doc_ids[:20], lengths=lengths[:20])
    np.testing.assert_allclose(
        np.load(out / "neighbour_distances.npy")[:20], nb.distances, rtol=1e-3, atol=1e-4
    )


def test_corpus_mode_excludes_same_named_database_document(db, wiki_docs, tmp_path):
    out = tmp_path / "ds"
    corpus = wiki_docs[8:14]  # 8, 9 are in the database; 10..13 are not
    man = write_neighbours(db, corpus, out, k=2, shard_chunks=40, progress=False)
    doc_ids = np.load(out / "doc_ids.npy")
    nid = np.load(out / "neighbour_ids.npy")
    assert man["counts"]["documents"] == 6
    assert list(dict.fromkeys(doc_ids.tolist())) == [8, 9, 10, 11, 12, 13]
    assert not np.any(db.doc_ids[nid] == doc_ids[:, None])
    # chunks of database documents 8 and 9 would otherwise find themselves at distance 0
    for d in (8, 9):
        assert np.all(np.load(out / "neighbour_distances.npy")[doc_ids == d] > 0)
    tok = load_tokenizer()
    first = np.load(out / "tokens.npy")[0]
    assert first.tolist() == tok.encode(corpus[0].text)[: db.chunk_size]


def test_corpus_resume_after_crash_is_identical(db, wiki_docs, tmp_path):
    corpus = wiki_docs[6:14]
    ref = tmp_path / "ref"
    write_neighbours(db, corpus, ref, k=2, shard_chunks=30, progress=False)

    def crashing(n):
        for i, d in enumerate(corpus):
            if i == n:
                raise KeyboardInterrupt("simulated crash")
            yield d

    out = tmp_path / "out"
    for n in (3, 5):
        with pytest.raises(KeyboardInterrupt):
            write_neighbours(db, crashing(n), out, k=2, shard_chunks=30, progress=False)
    assert (out / "parts").is_dir() and not (out / "manifest.json").exists()
    write_neighbours(db, corpus, out, k=2, shard_chunks=30, progress=False)
    for name in [*DATASET_FILES, "manifest.json"]:
        assert _sha(out / name) == _sha(ref / name), name
    assert not (out / "parts").exists()
    with pytest.raises(DatabaseError, match="already exists"):
        write_neighbours(db, corpus, out, k=2, progress=False)


def test_resume_with_another_corpus_is_refused(db, wiki_docs, tmp_path):
    def crashing():
        yield from wiki_docs[:4]
        raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        write_neighbours(db, crashing(), out, k=2, shard_chunks=10, progress=False)
    with pytest.raises(DatabaseError, match="another corpus"):
        write_neighbours(db, wiki_docs[5:], out, k=2, shard_chunks=10, progress=False)


def test_chunk_array_corpus_equals_self_mode(db, tmp_path):
    """Pre-chunked tokens are embedded and excluded by their doc_ids: same as the self mode."""
    n = db.num_chunks
    tokens, lengths = db.chunk_tokens(np.arange(n))
    chunks = {"tokens": tokens, "lengths": lengths, "doc_ids": db.doc_ids}
    write_neighbours(db, chunks, tmp_path / "a", k=2, shard_chunks=70, progress=False)
    write_neighbours(db, None, tmp_path / "b", k=2, progress=False)
    for name in ("tokens.npy", "lengths.npy", "doc_ids.npy", "neighbour_lengths.npy"):
        assert _sha(tmp_path / "a" / name) == _sha(tmp_path / "b" / name), name
    da = np.load(tmp_path / "a" / "neighbour_distances.npy")
    db_ = np.load(tmp_path / "b" / "neighbour_distances.npy")
    np.testing.assert_allclose(da, db_, rtol=1e-2, atol=1e-3)  # query keys fp32 vs stored fp16
    nid = np.load(tmp_path / "a" / "neighbour_ids.npy")
    assert not np.any(db.doc_ids[nid] == db.doc_ids[:, None])
    with pytest.raises(ValueError, match=r"expected \[N, m=16\]"):
        write_neighbours(db, {"tokens": tokens[:, :8], "doc_ids": db.doc_ids}, tmp_path / "c")
