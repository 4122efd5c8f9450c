"""Prefix sub-databases (retro_db.prefix, the database-size sweep): each a real index of the
first documents' chunks alone, checked against exact search over that prefix."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from retro_db.database import Database
from retro_db.prefix import PrefixRetriever, parse_fraction, prefix_chunks, subset_chunks

FRACTIONS = [Fraction(1, 16), Fraction(1, 4), Fraction(1, 2), Fraction(1)]


def _exact(keys: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Squared L2 of every query to every key, in float64: (distances, ids) of the k nearest."""
    d = ((queries[:, None, :].astype(np.float64) - keys[None].astype(np.float64)) ** 2).sum(-1)
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, ids, axis=1), ids


def test_prefixes_are_nested_document_boundaries(small_db):
    db = Database.open(small_db)
    ns = [prefix_chunks(db.doc_ids, db.num_documents, f) for f in FRACTIONS]
    assert ns == sorted(ns) and ns[-1] == db.num_chunks and ns[0] > 0
    for f, n in zip(FRACTIONS, ns, strict=True):
        docs = max(1, -(-f.numerator * db.num_documents // f.denominator))
        assert set(np.unique(db.doc_ids[:n])) == set(range(docs))  # whole documents, in order
        assert n == db.num_chunks or db.doc_ids[n] == docs
    with pytest.raises(ValueError, match="document boundary"):
        PrefixRetriever(db, ns[1] + 1)
    assert parse_fraction("1/16") == Fraction(1, 16) and parse_fraction(0.25) == Fraction(1, 4)
    for bad in ("0", "2", "x", "1/0"):
        with pytest.raises(ValueError, match="fraction"):
            parse_fraction(bad)


def test_prefix_neighbours_equal_exact_search_over_the_prefix_alone(small_db):
    db = Database.open(small_db)
    q = np.arange(0, db.num_chunks, 5)
    tokens, lengths = db.chunk_tokens(q)
    queries = db.embed_chunks(tokens, lengths)
    for f in FRACTIONS[:3]:
        n = prefix_chunks(db.doc_ids, db.num_documents, f)
        sub = PrefixRetriever(db, n)
        assert sub.num_chunks == n and sub.factory == "Flat"
        nb = sub.retrieve(tokens, 3, lengths=lengths)
        dist, ids = _exact(db.keys(np.arange(n)), queries, 3)
        assert (nb.chunk_ids < n).all()
        np.testing.assert_allclose(nb.distances, dist, rtol=1e-4, atol=1e-5)
        assert (nb.chunk_ids == ids).mean() > 0.95  # ties aside, the same chunks
        rows, lens = db.store.neighbour_rows(nb.chunk_ids.reshape(-1))
        assert (nb.tokens.reshape(rows.shape) == rows).all()
        # the same-document exclusion, within the prefix
        excl = db.doc_ids[q]
        nb = sub.retrieve(tokens, 3, excl, lengths=lengths)
        valid = nb.chunk_ids >= 0
        assert (
            db.doc_ids[nb.chunk_ids[valid]] != np.broadcast_to(excl[:, None], valid.shape)[valid]
        ).all()
        assert (nb.chunk_ids < n).all()


def test_random_subsets_are_nested_whole_documents_and_search_them_alone(small_db):
    db = Database.open(small_db)
    subsets = [subset_chunks(db.doc_ids, db.num_documents, f, seed=3) for f in FRACTIONS]
    docs = [set(np.unique(db.doc_ids[ids]).tolist()) for ids in subsets]
    for f, ids, d in zip(FRACTIONS, subsets, docs, strict=True):
        assert len(d) == max(1, -(-f.numerator * db.num_documents // f.denominator))
        assert np.array_equal(ids, np.flatnonzero(np.isin(db.doc_ids, sorted(d))))  # whole docs
    assert all(a <= b for a, b in zip(docs[:-1], docs[1:], strict=True))  # nested
    assert docs[1] != set(range(len(docs[1])))  # not the prefix (seed 3)
    assert np.array_equal(subsets[-1], np.arange(db.num_chunks))
    assert np.array_equal(
        subset_chunks(db.doc_ids, db.num_documents, Fraction(1, 4), seed=None),
        np.arange(prefix_chunks(db.doc_ids, db.num_documents, Fraction(1, 4))),
    )
    with pytest.raises(ValueError, match="whole documents"):
        PrefixRetriever(db, subsets[1][1:])
    q = np.arange(0, db.num_chunks, 5)
    tokens, lengths = db.chunk_tokens(q)
    queries = db.embed_chunks(tokens, lengths)
    ids = subsets[1]
    sub = PrefixRetriever(db, ids)
    assert sub.num_chunks == len(ids) and sub.num_documents == len(docs[1])
    assert sub.manifest != PrefixRetriever(db, subsets[2]).manifest
    nb = sub.retrieve(tokens, 3, lengths=lengths)
    dist, pos = _exact(db.keys(ids), queries, 3)
    assert np.isin(nb.chunk_ids, ids).all()
    np.testing.assert_allclose(nb.distances, dist, rtol=1e-4, atol=1e-5)
    assert (nb.chunk_ids == ids[pos]).mean() > 0.95  # ties aside, the same chunks
    rows, _ = db.store.neighbour_rows(nb.chunk_ids.reshape(-1))
    assert (nb.tokens.reshape(rows.shape) == rows).all()
