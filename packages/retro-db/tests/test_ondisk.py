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
    assert big.on_disk and big.factory.startswith("IVF") and big.factory.endswith(",SQfp16")
    assert "on disk instead of Flat" in big.reason and "MB available" in big.reason
    asked = choose_index(5000, 64, "IVF16,Flat", available=100 * KB)
    assert asked.on_disk and asked.factory == "IVF16,Flat"
    # fast-scan lists cannot live on disk: the on-disk default replaces them
    hnsw = choose_index(5000, 64, "HNSW32,Flat", available=100 * KB)
    assert not hnsw.on_disk and hnsw.factory == "HNSW32,Flat"  # asked for: kept, with a warning


def test_ondisk_manifest_names_and_hashes_the_lists(ondisk_db):
    man = json.loads((ondisk_db / "manifest.json").read_text())
    idx = man["index"]
    assert idx["on_disk"] is True and idx["factory"].endswith(",SQfp16")
    for name in (idx["file"], idx["lists"], idx["trained"]):
        assert man["files"][name]["sha256"] == sha256_file(ondisk_db / name)
    assert "on disk" in idx["reason"]
    assert not [p for p in (ondisk_db / "index").iterdir() if p.name.startswith(".")]


def test_ondisk_search_recall_and_self_match(ondisk_db):
    db = Database.open(ondisk_db, verify=True)
    assert retro_db.index.ondisk_lists_file(db.index) is not None
    info = db.info(sample=200)
    assert info["recall@10"] >= 0.9 and info["index_on_disk"]
    per = info["bytes_per_chunk"]  # 64-d float16 keys: 128 bytes; lists: the same codes + an id
    assert 128 <= per["keys.npy"] < 128 + 128 * len(db.manifest["shards"]) / db.num_chunks + 0.01
    assert per["index lists (on disk)"] >= 128 + 8 and per["trained index"] > 0
    total = sum(int(e["size"]) for e in db.manifest["files"].values())
    assert abs(sum(per.values()) * db.num_chunks - total) < len(per) * db.num_chunks * 0.01
    ids = np.arange(0, db.num_chunks, 7)
    d, got = db.search_keys(db.keys(ids), 1)
    exact_d, _ = exact_search(np.concatenate(list(db.key_blocks())), db.keys(ids), 1)
    assert np.allclose(d[:, 0], exact_d[:, 0], atol=1e-3)  # SQfp16: the stored float16 keys, exact


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


# A child process builds and queries a database with its data segment capped (RLIMIT_DATA: heap
# and anonymous memory; memory-mapped files, i.e. the page cache, are not counted, as on a machine
# whose disk is larger than its memory). faiss (and the BLAS it bundles) is loaded and run once
# before the cap: its one-time buffers are the library's, not the build's; without that warm-up
# faiss crashes (SIGSEGV, no exception) at its first k-means under a tight cap.
CHILD = r"""
import json, resource, sys
import numpy as np, faiss
faiss.omp_set_num_threads(1)
faiss.index_factory(1024, "IVF2,Flat").train(np.random.default_rng(1).random((128, 1024), "float32"))
from retro_db.build import build_database
from retro_db.ingest import read_documents
from retro_db.tokenizer import load_tokenizer
src, out, headroom, factory = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
docs, tok = list(read_documents(src)), load_tokenizer()
def vmdata():
    return next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmData"))
resource.setrlimit(resource.RLIMIT_DATA, (vmdata() + headroom, resource.RLIM_INFINITY))
try:
    db = build_database(docs, out, tokenizer=tok, embedder="hash:4096", chunk_size=4,
                        shard_chunks=512, threads=1, progress=False,
                        index_factory=None if factory == "auto" else factory)
    ids = np.arange(0, db.num_chunks, 97)
    dist, got = db.search_keys(db.keys(ids), 10)
    if len(sys.argv) > 5:  # the training data's neighbours too, part by part, under the same cap
        from retro_db.neighbours import write_neighbours
        write_neighbours(db, None, sys.argv[5], k=2, shard_chunks=256, progress=False)
    print(json.dumps({"ok": True, "ids": ids.tolist(), "got": got.tolist(),
                      "index": db.manifest["index"]}))
except MemoryError as e:
    print(json.dumps({"ok": False, "error": str(e)}))
"""
CAP = 80 << 20  # bytes of heap the build may add to the loaded interpreter


def _capped(tmp_path, name, factory, *neighbours):
    import os
    import subprocess
    import sys

    res = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(tmp_path / "docs.jsonl"),
            str(tmp_path / name),
            str(CAP),
            factory,
            *neighbours,
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        env=dict(os.environ),
    )
    lines = [x for x in res.stdout.splitlines() if x.startswith("{")]
    return res.returncode, (json.loads(lines[-1]) if lines else None), res.stderr[-2000:]


def test_build_and_query_under_a_memory_cap_smaller_than_keys_plus_index(load_records, tmp_path):
    docs = [
        {"id": f"{name}{i}", "text": r["text"]}
        for name in ("wikipedia", "moby_dick")
        for i, r in enumerate(load_records(name, 20, max_chars=4000))
    ]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    rc, out, err = _capped(tmp_path, "db", "auto", str(tmp_path / "nb"))
    assert rc == 0 and out is not None and out["ok"], (rc, out, err)
    assert out["index"]["on_disk"] and "on disk instead of Flat" in out["index"]["reason"]
    db = Database.open(tmp_path / "db", verify=True)
    keys_bytes = sum(
        (tmp_path / "db" / n).stat().st_size for n in db.manifest["files"] if n.endswith("keys.npy")
    )
    index_bytes = sum(
        (tmp_path / "db" / n).stat().st_size for n in db.manifest["files"] if n.startswith("index/")
    )
    assert keys_bytes + index_bytes > 1.5 * CAP  # the cap is well below keys + index
    # the capped child's answers against exact search here (no cap), by numpy
    keys = np.concatenate([np.asarray(k, np.float32) for k in db.key_blocks()])
    q = keys[out["ids"]]
    d2 = (q * q).sum(1)[:, None] - 2 * q @ keys.T + (keys * keys).sum(1)[None, :]
    truth = np.argsort(d2, axis=1, kind="stable")[:, :10]
    kth = np.take_along_axis(d2, truth[:, -1:], 1)
    # a hit is a returned chunk at least as near as the exact 10th (ties of duplicate text count)
    got = np.asarray(out["got"])
    near = np.take_along_axis(d2, got, 1) <= kth + 1e-3
    assert near.mean() >= 0.9
    # the neighbours written under the cap, part by part, equal a one-shot search here (no cap)
    db.drop_index_pages()
    one = db.neighbours_of_keys(keys, 2, db.doc_ids)
    np.testing.assert_array_equal(np.load(tmp_path / "nb" / "neighbour_ids.npy"), one.chunk_ids)
    np.testing.assert_array_equal(
        np.load(tmp_path / "nb" / "neighbour_distances.npy"), one.distances
    )
    # and the in-memory default under the same cap does not fit: the cap binds
    rc, out, err = _capped(tmp_path, "flat", "Flat")
    assert rc != 0 or (out is not None and not out["ok"]), (rc, out)


def test_cli_max_memory_puts_the_index_on_disk(corpus, tmp_path, capfd):
    # 2150 chunks x 256 float32 = 2.2 MB of Flat: not within half of 1 MB
    from retro_db.cli import main

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"id": d.doc_id, "text": d.text}) + "\n" for d in corpus))
    args = ["build", str(src), "--embedder", "hash:256", "--chunk-size", "16", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "small"), "--max-memory-mb", "1"]) in (0, None)
    assert Database.open(tmp_path / "small").manifest["index"]["on_disk"]
    assert main([*args, "--out", str(tmp_path / "default")]) in (0, None)
    assert not Database.open(tmp_path / "default").manifest["index"].get("on_disk")
    capfd.readouterr()
    assert main(["info", str(tmp_path / "small"), "--json"]) in (0, None)
    info = json.loads(capfd.readouterr().out)  # faiss's own prints kept out of stdout (fd 1)
    assert info["index_on_disk"] and info["recall@10"] >= 0.9


def _template_and_blocks(db: Database):
    """The database's trained, empty IVF index and (first chunk id, keys) of each shard."""
    man = db.manifest["index"]
    template = retro_db.index.read_index(db.path / man["trained"], mmap=False, dim=db.dim)
    blocks, start = [], 0
    for keys in db.key_blocks():
        blocks.append((start, keys))
        start += len(keys)
    return template, blocks


def test_lists_filled_from_encoded_files_equal_the_streamed_ones(ondisk_db, tmp_path):
    # The Ray engine's path (workers write each shard's codes, the driver fills the lists from
    # the files) against the local one, at the index level: the same lists file, byte for byte.
    from retro_db.index import build_ondisk_ivf, build_ondisk_ivf_from_codes, write_ivf_codes

    db = Database.open(ondisk_db)
    template, blocks = _template_and_blocks(db)
    assert len(blocks) >= 2
    _, streamed = build_ondisk_ivf(template, blocks, tmp_path, "streamed")
    coded, sizes = [], 0
    for i, (start, keys) in enumerate(blocks):
        lp, cp = tmp_path / f"s{i}.lists.npy", tmp_path / f"s{i}.codes.npy"
        sizes = sizes + write_ivf_codes(template, keys, lp, cp)
        coded.append((start, lp, cp))
        assert len(np.load(lp)) == len(keys)
    assert int(sizes.sum()) == db.num_chunks
    _, filled = build_ondisk_ivf_from_codes(template, coded, sizes, tmp_path, "filled")
    assert sha256_file(filled) == sha256_file(streamed)
    # and both equal the database's own lists (built by build_database)
    assert sha256_file(streamed) == sha256_file(ondisk_db / db.manifest["index"]["lists"])
    # independent truth: faiss's own add of every key into the same template, list by list
    import faiss

    mem = faiss.clone_index(template)
    for start, keys in blocks:
        mem.add_with_ids(
            np.asarray(keys, np.float32), np.arange(start, start + len(keys), dtype=np.int64)
        )
    got = retro_db.index.read_index(tmp_path / "filled.faiss", on_disk=True)
    a, b = faiss.extract_index_ivf(mem).invlists, faiss.extract_index_ivf(got).invlists
    cs = a.code_size
    for lst in range(a.nlist):
        m = a.list_size(lst)
        assert b.list_size(lst) == m
        if m:
            np.testing.assert_array_equal(
                faiss.rev_swig_ptr(b.get_ids(lst), m), faiss.rev_swig_ptr(a.get_ids(lst), m)
            )
            np.testing.assert_array_equal(
                faiss.rev_swig_ptr(b.get_codes(lst), m * cs),
                faiss.rev_swig_ptr(a.get_codes(lst), m * cs),
            )


def test_add_appends_into_lists_equal_to_a_build_over_the_union(ondisk_db, corpus, tmp_path):
    # `add` copies the current lists list by list into the new version's file and writes the new
    # keys after them (no faiss merge of block index files): the lists of the same trained index
    # filled with every key in one go. Then a fresh build over the union answers the same queries.
    from retro_db.index import build_ondisk_ivf

    grown = tmp_path / "grown"
    shutil.copytree(ondisk_db, grown)
    mp = pytest.MonkeyPatch()
    mp.setattr(retro_db.index, "available_memory", lambda: 64 * KB)
    try:
        v2 = add_documents(grown, corpus[30:], embedder="hash:64", progress=False)
        fresh = build_database(
            corpus,
            tmp_path / "fresh",
            embedder="hash:64",
            chunk_size=16,
            shard_chunks=256,
            progress=False,
        )
    finally:
        mp.undo()
    assert v2.version == 2 and v2.manifest["index"]["on_disk"]
    template, blocks = _template_and_blocks(v2)
    _, union = build_ondisk_ivf(template, blocks, tmp_path, "union")
    assert sha256_file(grown / v2.manifest["index"]["lists"]) == sha256_file(union)
    assert not [p for p in (grown / "index").iterdir() if p.name.startswith(".")]
    # queries: the fresh build over the union (its own training) and the grown database, both
    # searching every list: the same neighbours (IVF-SQfp16 stores each key's residual to its
    # centroid in float16, so distances differ by that rounding only, ~1e-4 relative, and the
    # order of near ties may differ)
    assert fresh.num_chunks == v2.num_chunks and fresh.manifest["index"]["on_disk"]
    import faiss

    q = v2.keys(np.arange(0, v2.num_chunks, 5))
    for db in (v2, fresh):
        retro_db.index.apply_search_params(
            db.index, {"nprobe": faiss.extract_index_ivf(db.index).nlist}
        )
    dg, ig = v2.search_keys(q, 10)
    df, if_ = fresh.search_keys(q, 10)
    np.testing.assert_allclose(dg, df, rtol=2e-3, atol=1e-5)
    same = np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(ig, if_, strict=True)])
    assert same > 0.97, same


def test_neighbours_streamed_part_by_part_equal_one_shot(ondisk_db, tmp_path):
    # write_neighbours queries the on-disk index part by part (shard_chunks queries at a time,
    # each part written as it is done, its mapped list pages given back after it): the result
    # equals one search of every chunk at once, with the same exclusion of the own document
    from retro_db.neighbours import write_neighbours

    db = Database.open(ondisk_db)
    n = db.num_chunks
    part = next(s for s in range(90, 200) if n % s == 0 or n % s >= 32)  # no tiny last part
    write_neighbours(db, None, tmp_path / "ds", k=3, shard_chunks=part, progress=False)
    assert n > 3 * part  # several parts
    ids = np.arange(n)
    one = db.neighbours_of_keys(db.keys(ids), 3, db.doc_ids)
    ds = tmp_path / "ds"
    np.testing.assert_array_equal(np.load(ds / "neighbour_ids.npy"), one.chunk_ids)
    np.testing.assert_array_equal(np.load(ds / "neighbour_distances.npy"), one.distances)
    np.testing.assert_array_equal(np.load(ds / "neighbours.npy"), one.tokens)
    assert not np.any(db.doc_ids[one.chunk_ids] == db.doc_ids[:, None])


def test_long_steps_show_bytes_and_an_eta(corpus, tmp_path, capsys, monkeypatch):
    # the bars of a build whose index goes on disk, and of its neighbours: text read (bytes),
    # embedding (chunks of a shard, with a total), the index add (bytes of keys, with a total)
    # and the neighbours (chunks, with a total): a bar with a total shows "100%" and an ETA field
    import re

    from tqdm import tqdm

    from retro_db.neighbours import write_neighbours

    monkeypatch.setattr(retro_db.index, "available_memory", lambda: 64 * KB)
    db = build_database(
        corpus[:8], tmp_path / "db", embedder="hash:64", chunk_size=16, shard_chunks=256
    )
    write_neighbours(db, None, tmp_path / "nb", k=2, shard_chunks=100)
    err = capsys.readouterr().err
    lines = {}
    for line in re.split(r"[\r\n]+", err):
        name = line.split(":", 1)[0].strip()
        if name:
            lines[name] = line  # the last state of each bar
    assert db.manifest["index"]["on_disk"]
    text = sum(len(d.text.encode("utf-8")) for d in corpus[:8])
    assert f": {tqdm.format_sizeof(text)}B [" in lines["documents (text)"]  # no total: a rate
    keys = tqdm.format_sizeof(db.num_chunks * 64 * 2)  # float16 keys, d = 64
    add = lines["index add (on disk)"]
    assert "100%" in add and f"{keys}/{keys} [" in add and "B/s]" in add
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d", add)  # elapsed<remaining: the ETA
    nb = lines["neighbours"]
    assert "100%" in nb and f"{db.num_chunks}/{db.num_chunks}" in nb and "chunk/s" in nb


def _resident(path) -> int:
    """Bytes of ``path``'s pages this process holds mapped (/proc/self/smaps)."""
    total, cur = 0, None
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            cur = head[5] if len(head) > 5 else None
        elif head[0] == "Rss:" and cur == str(path):
            total += int(head[1]) * 1024
    return total


def test_bounded_list_search_equals_the_search_and_gives_back_its_pages(ondisk_db):
    # the build tunes nprobe with it: the probed lists a group at a time (here one list), their
    # pages dropped after each; the neighbours and distances of faiss's own search of the index
    from retro_db.index import search_lists_bounded

    db = Database.open(ondisk_db)
    lists = (ondisk_db / db.manifest["index"]["lists"]).resolve()
    nlist = db.index.nlist
    retro_db.index.apply_search_params(db.index, {"nprobe": max(2, nlist // 2)})
    q = db.keys(np.arange(0, db.num_chunks, 11))
    db.drop_index_pages()
    d, i = search_lists_bounded(db.index, q, 10, budget=1)
    assert _resident(lists) == 0
    dr, ir = db.index.search(q, 10)
    assert _resident(lists) > 0  # a plain search keeps the lists it read
    np.testing.assert_array_equal(d, dr)
    assert all(set(a) == set(b) for a, b in zip(i, ir, strict=True))
    assert (i[:, 0] == np.arange(0, db.num_chunks, 11)).mean() > 0.9


def test_open_and_release_pages_leave_no_chunk_pages_mapped(ondisk_db, tmp_path):
    # Database.open checks every chunk array through its map; the pages it read are given back
    from retro_db.chunks import release_pages

    db = Database.open(ondisk_db)
    shard = (ondisk_db / "shards" / db.manifest["shards"][0]).resolve()
    assert db.num_chunks and _resident(shard / "tokens.npy") == 0
    a = np.arange(1 << 20, dtype=np.int64)
    np.save(tmp_path / "a.npy", a)
    m = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert int(m.sum()) == int(a.sum())
    before = _resident(tmp_path / "a.npy")
    assert before > 4 << 20
    release_pages(m[len(m) // 2 :])  # the second half only
    assert 0 < _resident(tmp_path / "a.npy") <= before - (4 << 20)
    release_pages(m)
    assert _resident(tmp_path / "a.npy") == 0
    np.testing.assert_array_equal(m, a)  # read again from the file
    # arrays in memory and copy-on-write maps are left alone
    b = a.copy()
    release_pages(b)
    np.testing.assert_array_equal(b, a)
    c = np.load(tmp_path / "a.npy", mmap_mode="c")
    c[0] = -5
    c.flags.writeable = False
    release_pages(c)
    assert c[0] == -5
