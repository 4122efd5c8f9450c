"""Databases larger than memory (issue 18): IVF lists on disk, chosen by projected bytes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import retro_db.index
from retro_db.build import add_documents, build_database
from retro_db.database import Database
from retro_db.index import choose_index, exact_search
from retro_db.ingest import Document
from retro_db.manifest import DatabaseError, sha256_file

KB = 1024


@pytest.fixture(scope="module")
def corpus(load_records):
    recs = load_records("wikipedia", 40, max_chars=4000)
    return [Document(r["title"], r["text"]) for r in recs]


@pytest.fixture(scope="module")
def ondisk_db(corpus, tmp_path_factory):
    """A database built as if memory were 64 KB: its index goes on disk."""
    out = tmp_path_factory.mktemp("ondisk") / "db"
    mp = pytest.MonkeyPatch()
    mp.setattr(retro_db.index, "available_memory", lambda: 64 * KB)
    try:
        build_database(
            corpus[:30], out, embedder="hash:64", chunk_size=16, shard_chunks=256, progress=False
        )
    finally:
        mp.undo()
    return out


def test_choice_by_projected_bytes():
    small = choose_index(1000, 64, available=1 << 30)
    assert (small.factory, small.on_disk) == ("Flat", False)  # the default, unchanged
    big = choose_index(1000, 64, available=100 * KB)
    assert big.on_disk and big.factory.startswith("IVF") and big.factory.endswith(",SQ8")
    assert "on disk instead of Flat" in big.reason and "MB available" in big.reason
    asked = choose_index(5000, 64, "IVF16,Flat", available=100 * KB)
    assert asked.on_disk and asked.factory == "IVF16,Flat"
    # fast-scan lists cannot live on disk: the on-disk default replaces them
    hnsw = choose_index(5000, 64, "HNSW32,Flat", available=100 * KB)
    assert not hnsw.on_disk and hnsw.factory == "HNSW32,Flat"  # asked for: kept, with a warning


def test_ondisk_manifest_names_and_hashes_the_lists(ondisk_db):
    man = json.loads((ondisk_db / "manifest.json").read_text())
    idx = man["index"]
    assert idx["on_disk"] is True and idx["factory"].endswith(",SQ8")
    for name in (idx["file"], idx["lists"], idx["trained"]):
        assert man["files"][name]["sha256"] == sha256_file(ondisk_db / name)
    assert "on disk" in idx["reason"]
    assert not [p for p in (ondisk_db / "index").iterdir() if p.name.startswith(".")]


def test_ondisk_search_recall_and_self_match(ondisk_db):
    db = Database.open(ondisk_db, verify=True)
    assert retro_db.index.ondisk_lists_file(db.index) is not None
    assert db.info(sample=200)["recall@10"] >= 0.9
    ids = np.arange(0, db.num_chunks, 7)
    d, got = db.search_keys(db.keys(ids), 1)
    exact_d, _ = exact_search(np.concatenate(list(db.key_blocks())), db.keys(ids), 1)
    assert np.allclose(d[:, 0], exact_d[:, 0], atol=1e-3)  # SQ8: near-exact distances


def test_ondisk_equals_in_memory_index_of_the_same_factory(ondisk_db, corpus, tmp_path):
    disk = Database.open(ondisk_db)
    factory = disk.manifest["index"]["factory"]
    mem = build_database(
        corpus[:30],
        tmp_path / "mem",
        embedder="hash:64",
        chunk_size=16,
        shard_chunks=256,
        index_factory=factory,
        search_params=disk.search_params,
        progress=False,
    )
    assert not mem.manifest["index"].get("on_disk")
    assert disk.search_params == mem.search_params
    q = mem.keys(np.arange(0, mem.num_chunks, 5))
    dm, im = mem.search_keys(q, 10)
    dd, id_ = disk.search_keys(q, 10)
    np.testing.assert_array_equal(dd, dm)
    assert (id_ == im).mean() > 0.99  # equal distances; only the order of exact ties may differ


def test_ondisk_database_moves_and_grows(ondisk_db, corpus, tmp_path):
    moved = tmp_path / "elsewhere" / "db"
    shutil.copytree(ondisk_db, moved)
    v1 = Database.open(moved)
    lists1 = v1.manifest["index"]["lists"]
    before = sha256_file(moved / lists1)
    mp = pytest.MonkeyPatch()
    mp.setattr(retro_db.index, "available_memory", lambda: 64 * KB)
    try:
        v2 = add_documents(moved, corpus[30:], embedder="hash:64", progress=False)
    finally:
        mp.undo()
    assert v2.version == 2 and v2.num_chunks > v1.num_chunks
    assert v2.manifest["index"]["lists"] != lists1
    assert sha256_file(moved / lists1) == before  # the old version's lists are untouched
    old = Database.open(moved, version=1, verify=True)
    assert old.index.ntotal == v1.num_chunks
    new_ids = np.arange(v1.num_chunks, v2.num_chunks, 3)
    _, got = v2.search_keys(v2.keys(new_ids), 1)
    assert (got[:, 0] == new_ids).mean() > 0.9  # new chunks find themselves
    assert Database.open(moved, verify=True).info()["recall@10"] >= 0.9


def test_ondisk_lists_tampering_is_refused(ondisk_db, tmp_path):
    copy = tmp_path / "db"
    shutil.copytree(ondisk_db, copy)
    man = json.loads((copy / "manifest.json").read_text())
    lists = copy / man["index"]["lists"]
    data = bytearray(lists.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lists.write_bytes(bytes(data))
    Database.open(copy)  # sizes match: the cheap checks pass
    with pytest.raises(DatabaseError, match="ivfdata: sha256 differs"):
        Database.open(copy, verify=True)
    lists.write_bytes(bytes(data[:-16]))
    with pytest.raises(DatabaseError, match="ivfdata: size"):
        Database.open(copy)
