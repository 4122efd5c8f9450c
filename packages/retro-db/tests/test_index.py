"""The faiss index: default choice by size, training, mmap read, recall against exact search."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from retro_db.embedders import HashingEmbedder
from retro_db.index import (
    FLAT_THRESHOLD,
    HNSW_THRESHOLD,
    apply_search_params,
    default_factory,
    exact_search,
    exact_search_blocks,
    read_index,
    recall_at_k,
    set_threads,
    train_index,
    write_index,
)
from retro_db.manifest import DatabaseError


@pytest.fixture(scope="module")
def keys(load_records):
    """Keys of ~2750 real text windows of 40 words (Moby Dick + Wikipedia), hashing embedder d=48
    (at least 39 x 64 for the IVF64 training below)."""
    set_threads(1)
    recs = load_records("moby_dick", 40, max_chars=10000)
    recs += load_records("wikipedia", 48, max_chars=10000)
    words = " ".join(r["text"] for r in recs).split()
    windows = [" ".join(words[i : i + 40]) for i in range(0, len(words) - 40, 40)]
    assert len(windows) >= 39 * 64, len(windows)
    return HashingEmbedder(48).embed_texts(windows)


def test_default_factory_by_size():
    assert default_factory(10, 384) == ("Flat", {})
    assert default_factory(FLAT_THRESHOLD - 1, 384)[0] == "Flat"
    f, p = default_factory(FLAT_THRESHOLD, 384)
    assert f.startswith("HNSW") and "efSearch" in p
    f, p = default_factory(HNSW_THRESHOLD * 50, 384)
    assert f.startswith("IVF") and f.endswith(",PQ192x4fs,Refine(SQ8)") and p["nprobe"] >= 1
    assert p["k_factor_rf"] > 1
    # the IVF list count grows like sqrt(N)
    nlist = int(f[3:].split(",")[0])
    assert 2 * np.sqrt(HNSW_THRESHOLD * 50) <= nlist <= 8 * np.sqrt(HNSW_THRESHOLD * 50)


def test_flat_is_exact(keys):
    index = train_index("Flat", keys)
    index.add(keys)
    assert recall_at_k(index, keys, keys[:100], 10) == 1.0


@pytest.mark.parametrize(
    "factory,params,floor",
    [("IVF32,Flat", {"nprobe": 16}, 0.9), ("HNSW16,Flat", {"efSearch": 64}, 0.9)],
)
def test_approximate_recall_vs_exact(keys, factory, params, floor, tmp_path):
    index = train_index(factory, keys[:2000])
    index.add(keys)
    apply_search_params(index, params)
    r = recall_at_k(index, keys, keys[::30], 10)
    assert r >= floor, f"{factory} recall@10 {r:.3f}"
    # the written index reads back (mmap) and answers the same
    write_index(index, tmp_path / "i.faiss")
    back = read_index(tmp_path / "i.faiss", mmap=True, dim=keys.shape[1])
    apply_search_params(back, params)
    d1, i1 = index.search(keys[:20], 5)
    d2, i2 = back.search(keys[:20], 5)
    np.testing.assert_array_equal(i1, i2)


def test_nprobe_changes_ivf_search(keys):
    index = train_index("IVF64,Flat", keys)
    index.add(keys)
    apply_search_params(index, {"nprobe": 1})
    low = recall_at_k(index, keys, keys[::20], 10)
    apply_search_params(index, {"nprobe": 64})
    assert recall_at_k(index, keys, keys[::20], 10) == 1.0 > low


def test_exact_search_against_numpy(keys):
    q = keys[:7]
    d, i = exact_search(keys, q, 3)
    full = ((q[:, None, :] - keys[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(i, np.argsort(full, axis=1, kind="stable")[:, :3])
    np.testing.assert_allclose(d, np.sort(full, axis=1)[:, :3], rtol=1e-4, atol=1e-5)


def test_read_errors_name_the_file(keys, tmp_path):
    index = faiss.IndexFlatL2(keys.shape[1])
    index.add(keys)
    write_index(index, tmp_path / "i.faiss")
    with pytest.raises(DatabaseError, match=r"i\.faiss: index dimension 48, expected 384"):
        read_index(tmp_path / "i.faiss", dim=384)
    p = tmp_path / "i.faiss"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(DatabaseError, match=r"i\.faiss: not a readable faiss index"):
        read_index(p)
    with pytest.raises(DatabaseError, match="missing"):
        read_index(tmp_path / "nope.faiss")


def test_exact_search_blocks_equals_one_block(keys):
    q = keys[::100] + 0.01
    d, i = exact_search(keys, q, 7)
    d2, i2 = exact_search_blocks([keys[:500], keys[500:501], keys[501:1700], keys[1700:]], q, 7)
    np.testing.assert_array_equal(i, i2)
    np.testing.assert_allclose(d, d2, rtol=1e-6)


def test_refine_lifts_the_recall_of_fast_scan_pq(keys, tmp_path):
    # The large-database default re-ranks fast-scan candidates on SQ8 keys; truth = exact search.
    queries, base = keys[:100], keys[100:]
    got = {}
    for factory, params in (
        ("IVF32,PQ24x4fs", {"nprobe": 8}),
        ("IVF32,PQ24x4fs,Refine(SQ8)", {"nprobe": 8, "k_factor_rf": 10}),
    ):
        index = train_index(factory, base)
        index.add(base)
        write_index(index, tmp_path / "i.faiss")
        index = read_index(tmp_path / "i.faiss")  # memory-mapped, as a database opens it
        apply_search_params(index, params)
        got[factory] = recall_at_k(index, base, queries, 10)
    assert got["IVF32,PQ24x4fs,Refine(SQ8)"] > got["IVF32,PQ24x4fs"] + 0.1, got
