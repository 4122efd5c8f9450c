"""r(C), MinHash overlap and bpb(alpha) buckets against brute-force and hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retro_eval.overlap import (
    ALPHAS,
    bucket_bpb,
    build_minhash_index,
    chunk_overlap_ratios,
    longest_common_substring,
    longest_common_substrings,
    minhash_overlaps,
)


def brute_lcs(a: list[int], b: list[int]) -> int:
    """Longest L such that some a[i:i+L] occurs in b, by direct search (O(m r len))."""
    best = 0
    for i in range(len(a)):
        for j in range(len(b)):
            n = 0
            while i + n < len(a) and j + n < len(b) and a[i + n] == b[j + n]:
                n += 1
            best = max(best, n)
    return best


def test_lcs_hand_cases():
    assert longest_common_substring([1, 2, 3, 4], [9, 2, 3, 4, 1]) == 3
    assert longest_common_substring([1, 2, 3], [4, 5, 6]) == 0
    assert longest_common_substring([7, 7, 7], [7, 7]) == 2
    assert longest_common_substring([], [1]) == 0


@st.composite
def overlap_case(draw):
    vocab = draw(st.integers(2, 5))  # a small vocabulary makes long shared runs likely
    c = draw(st.integers(1, 4))
    m = draw(st.integers(1, 10))
    k = draw(st.integers(1, 3))
    r = draw(st.integers(1, 20))
    tok = st.integers(0, vocab - 1)
    chunks = np.array(draw(st.lists(st.lists(tok, min_size=m, max_size=m), min_size=c, max_size=c)))
    nbs = np.array(
        draw(
            st.lists(
                st.lists(st.lists(tok, min_size=r, max_size=r), min_size=k, max_size=k),
                min_size=c,
                max_size=c,
            )
        )
    )
    lengths = np.array(draw(st.lists(st.integers(0, m), min_size=c, max_size=c)))
    nb_lengths = np.array(
        draw(st.lists(st.lists(st.integers(0, r), min_size=k, max_size=k), min_size=c, max_size=c))
    )
    return chunks, lengths, nbs, nb_lengths


@settings(max_examples=150, deadline=None)
@given(overlap_case(), st.integers(1, 3))
def test_lcs_and_rc_match_brute_force(case, batch_size):
    chunks, lengths, nbs, nb_lengths = case
    c, m = chunks.shape
    k = nbs.shape[1]
    lcs = longest_common_substrings(chunks, lengths, nbs, nb_lengths, batch_size=batch_size)
    expected = np.array(
        [
            [
                brute_lcs(chunks[i, : lengths[i]].tolist(), nbs[i, j, : nb_lengths[i, j]].tolist())
                for j in range(k)
            ]
            for i in range(c)
        ]
    )
    np.testing.assert_array_equal(lcs, expected)
    rc = chunk_overlap_ratios(chunks, lengths, nbs, nb_lengths, chunk_size=m)
    np.testing.assert_allclose(rc, expected.max(axis=1) / m)


def test_rc_paper_example_and_defaults():
    # m = 64: a neighbour sharing exactly 8 contiguous tokens gives r(C) = 12.5%
    rng = np.random.default_rng(0)
    chunk = rng.integers(1000, 2000, size=64)
    nb = rng.integers(5000, 6000, size=(2, 128))
    nb[1, 30:38] = chunk[10:18]
    assert chunk_overlap_ratios(chunk[None], None, nb[None], None)[0] == pytest.approx(0.125)
    # a missing neighbour (length 0) never counts
    assert chunk_overlap_ratios(chunk[None], None, nb[None], np.array([[128, 0]]))[0] == 0.0


def test_rc_bad_inputs():
    with pytest.raises(ValueError, match=r"neighbours must have shape \[C=2"):
        chunk_overlap_ratios(np.zeros((2, 4), int), None, np.zeros((3, 1, 8), int), None)
    with pytest.raises(ValueError, match="chunks must be a 2-D"):
        chunk_overlap_ratios(np.zeros(4, int), None, np.zeros((1, 1, 8), int), None)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 4\]"):
        chunk_overlap_ratios(np.zeros((1, 4), int), np.array([5]), np.zeros((1, 1, 8), int), None)
    with pytest.raises(ValueError, match="integer token ids"):
        chunk_overlap_ratios(np.zeros((1, 4)), None, np.zeros((1, 1, 8), int), None)


# ----------------------------------------------------------------------------- MinHash


def brute_jaccard(a: list[int], b: list[int], n: int) -> float:
    """Exact Jaccard of n-gram sets; a sequence shorter than n is one shingle (retro_db's convention)."""

    def grams(x):
        if not x:
            return set()
        if len(x) < n:
            return {tuple(x)}
        return {tuple(x[i : i + n]) for i in range(len(x) - n + 1)}

    ga, gb = grams(a), grams(b)
    if not ga and not gb:
        return 0.0
    return len(ga & gb) / len(ga | gb)


def test_minhash_overlap_matches_brute_force_max_jaccard():
    pytest.importorskip("datasketch")
    rng = np.random.default_rng(7)
    m, ngram, n_train = 32, 4, 60
    train = rng.integers(0, 50_000, size=(n_train, m))
    train_len = np.full(n_train, m)
    train_len[5] = 20
    # queries: copies of training chunks with 0..m/2 tokens replaced, plus unrelated chunks
    queries, q_len = [], []
    for i in range(24):
        src = train[(i * 7) % n_train].copy()
        n_change = [0, 1, 2, 4, 8, 16][i % 6]
        pos = rng.choice(m, size=n_change, replace=False)
        src[pos] = rng.integers(60_000, 70_000, size=n_change)
        queries.append(src)
        q_len.append(m)
    queries += list(rng.integers(80_000, 90_000, size=(4, m)))
    q_len += [m, m, 10, 0]
    queries, q_len = np.array(queries), np.array(q_len)

    got = minhash_overlaps(queries, q_len, (train, train_len), ngram=ngram, threshold=0.3)
    brute = np.array(
        [
            max(
                brute_jaccard(
                    queries[i, : q_len[i]].tolist(), train[j, : train_len[j]].tolist(), ngram
                )
                for j in range(n_train)
            )
            for i in range(len(queries))
        ]
    )
    assert np.all(got <= brute + 1e-12)  # always the exact Jaccard of a real chunk
    strong = brute >= 0.5  # well above the LSH threshold: LSH finds the best chunk
    assert strong.sum() >= 8
    np.testing.assert_allclose(got[strong], brute[strong])
    assert got[-1] == 0.0 and got[-2] == 0.0  # unrelated / empty chunks


def test_minhash_overlaps_reuses_index_and_reads_a_database_like_object():
    pytest.importorskip("datasketch")
    rng = np.random.default_rng(1)
    train = rng.integers(0, 1000, size=(10, 16))

    class FakeDb:  # the two members build_minhash_index uses from retro_db's Database
        num_chunks = 10
        chunk_size = 16

        def chunk_tokens(self, ids):
            return train[ids], np.full(len(ids), 16, dtype=np.int32)

    index = build_minhash_index(FakeDb(), ngram=4, batch_chunks=3)
    assert len(index) == 10
    a = minhash_overlaps(train[:3], None, index)
    np.testing.assert_allclose(a, 1.0)
    with pytest.raises(TypeError, match="retro_db Database"):
        minhash_overlaps(train[:3], None, "not a db")


# ----------------------------------------------------------------------------- buckets


def test_bucket_bpb_equals_hand_computation():
    bits = [10.0, 20.0, 30.0, 40.0]
    nbytes = [5, 10, 20, 40]
    overlap = [0.0, 0.125, 0.5, 1.0]
    rows = bucket_bpb(bits, nbytes, overlap)
    assert [r["alpha"] for r in rows] == list(ALPHAS)
    by_alpha = {r["alpha"]: r for r in rows}
    # alpha = 0: chunk 0 only -> 10 / 5
    assert by_alpha[0.0]["chunks"] == 1 and by_alpha[0.0]["bpb"] == pytest.approx(2.0)
    # alpha = 0.125 and 0.25: chunks 0, 1 -> 30 / 15
    for a in (0.125, 0.25):
        assert by_alpha[a]["chunks"] == 2 and by_alpha[a]["bpb"] == pytest.approx(2.0)
        assert by_alpha[a]["bits"] == 30.0 and by_alpha[a]["bytes"] == 15
    # alpha = 0.5, 0.75: chunks 0..2 -> 60 / 35
    assert by_alpha[0.5]["bpb"] == pytest.approx(60 / 35) and by_alpha[0.75]["chunks"] == 3
    # alpha = 1: everything -> 100 / 75
    assert by_alpha[1.0]["bpb"] == pytest.approx(100 / 75) and by_alpha[1.0]["chunks"] == 4
    assert not any(r["empty"] for r in rows)


def test_bucket_bpb_random_subsets_match_direct_sum():
    rng = np.random.default_rng(3)
    bits = rng.uniform(0, 500, size=200)
    nbytes = rng.integers(1, 300, size=200)
    ov = rng.integers(0, 65, size=200) / 64
    for row in bucket_bpb(bits, nbytes, ov):
        sel = [i for i in range(200) if ov[i] <= row["alpha"]]
        assert row["chunks"] == len(sel)
        if sel:
            assert row["bpb"] == pytest.approx(
                sum(bits[i] for i in sel) / sum(int(nbytes[i]) for i in sel)
            )


def test_bucket_bpb_empty_bucket_is_reported():
    rows = bucket_bpb([3.0, 4.0], [2, 2], [0.5, 0.75])
    low = [r for r in rows if r["alpha"] < 0.5]
    assert low and all(r["empty"] and r["bpb"] is None and r["chunks"] == 0 for r in low)
    assert rows[-1]["bpb"] == pytest.approx(7 / 4)
    none = bucket_bpb([], [], [])
    assert all(r["empty"] and r["bpb"] is None for r in none)
    assert not any(isinstance(r["bpb"], float) and math.isnan(r["bpb"]) for r in rows)


def test_bucket_bpb_bad_inputs():
    with pytest.raises(ValueError, match="one entry per chunk"):
        bucket_bpb([1.0], [1, 2], [0.0])
    with pytest.raises(ValueError, match="overlap must be finite"):
        bucket_bpb([1.0], [1], [float("nan")])
    with pytest.raises(ValueError, match=r"12\.5% is 0\.125"):
        bucket_bpb([1.0], [1], [0.0], alphas=(12.5,))
    with pytest.raises(ValueError, match="non-negative"):
        bucket_bpb([-1.0], [1], [0.0])


# ----------------------------------------------------------------------------- with a real database


def test_overlaps_with_a_retro_db_database(tmp_path):
    """Chunks stored in the database overlap it fully under both measures; unrelated text does not."""
    pytest.importorskip("datasketch")
    build = pytest.importorskip("retro_db.build")
    from retro_db.ingest import Document
    from retro_eval.benchmarks import load_benchmark

    docs = [
        d
        for d in load_benchmark("pile-mini", "test").documents
        if d.meta["pile_set_name"] == "Wikipedia (en)"
    ]
    db = build.build_database(
        [Document(d.doc_id, d.text[:3000], {}) for d in docs[:2]],
        tmp_path / "db",
        embedder="hash:32",
        chunk_size=32,
        progress=False,
    )
    ids = np.arange(min(db.num_chunks, 12), dtype=np.int64)
    tokens, lengths = db.chunk_tokens(ids)
    full = np.asarray(lengths) == 32
    assert full.sum() >= 5
    index = build_minhash_index(db, ngram=8)
    np.testing.assert_allclose(minhash_overlaps(tokens, lengths, index)[full], 1.0)
    nb = db.retrieve(np.asarray(tokens), 2)
    rc = chunk_overlap_ratios(tokens, lengths, nb.tokens, nb.lengths, chunk_size=32)
    # each stored chunk retrieves itself (distance 0): its whole text is a common substring
    np.testing.assert_allclose(rc[full], 1.0)
    other = db.tokenizer.encode(
        "Completely unrelated words about quantum chromodynamics and gluons " * 3
    )[:32]
    assert minhash_overlaps(np.array([other]), None, index, ngram=8)[0] < 0.2
