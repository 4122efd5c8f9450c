"""The Ray engine (distributed.py): a database or neighbours dataset built on a local 2-CPU Ray
cluster must equal the one the local engine builds from the same arguments.

Independent truth: the local build (``build_database`` / ``write_neighbours``, tested on their own
against brute force elsewhere). One Ray cluster serves the whole module (startup takes seconds).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from retro_db.build import build_database
from retro_db.database import Database
from retro_db.distributed import local_temp_dir
from retro_db.ingest import Document
from retro_db.neighbours import DATASET_FILES, write_neighbours

# fp16 keys: both engines embed in float32 and round to float16. If the float32 results differ by
# the encoder's float noise (different thread counts), rounding can land one fp16 step apart:
# a step is at most |x| * 2**-10 (10 mantissa bits) for normal numbers, 2**-24 below 2**-14.
KEY_RTOL = 2.0**-10
KEY_ATOL = 2.0**-24

BUILD = dict(embedder="hash:64", chunk_size=16, shard_chunks=100, threads=1, progress=False)


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=128 * 1024**2,
        logging_level="WARNING",
        _temp_dir=local_temp_dir(),  # nox points TMPDIR into the venv, which Ray's workers refuse
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def docs(load_records):
    recs = load_records("wikipedia", 48)
    out = [Document(r["title"], r["text"], {"pageid": r["pageid"]}) for r in recs[:40]]
    out.insert(7, Document("empty", "", {}))  # no tokens: skipped, takes no document index
    return out, [Document(r["title"], r["text"], {}) for r in recs[40:]]


@pytest.fixture(scope="module")
def flat_pair(cluster, docs, tmp_path_factory):
    d = tmp_path_factory.mktemp("flat")
    local = build_database(docs[0], d / "local", index_factory="Flat", **BUILD)
    remote = build_database(docs[0], d / "ray", index_factory="Flat", **BUILD, engine="ray")
    return local, remote


def _assert_same_database(local: Database, remote: Database) -> None:
    n = local.num_chunks
    assert remote.num_chunks == n and remote.num_documents == local.num_documents
    ids = np.arange(n)
    for a, b in zip(local.chunk_tokens(ids), remote.chunk_tokens(ids), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(local.doc_ids, remote.doc_ids)
    np.testing.assert_array_equal(local.store.offsets_of(ids), remote.store.offsets_of(ids))
    np.testing.assert_allclose(remote.keys(ids), local.keys(ids), rtol=KEY_RTOL, atol=KEY_ATOL)
    assert remote.manifest["shards"] == local.manifest["shards"]
    for s in local.manifest["shards"]:
        a = (local.path / "shards" / s / "documents.jsonl").read_text()
        assert (remote.path / "shards" / s / "documents.jsonl").read_text() == a


def test_ray_build_equals_local_build(flat_pair):
    local, remote = flat_pair
    assert len(local.manifest["shards"]) >= 4  # several shard tasks ran on 2 workers
    _assert_same_database(local, remote)
    # the skipped empty document: same indices on both sides, none for it
    assert local.document_index("empty") == remote.document_index("empty") == -1
    # neighbours of every chunk, by its own stored key, with the exact (Flat) index
    keys = local.keys(np.arange(local.num_chunks))
    d_local, i_local = local.search_keys(keys, 5)
    d_remote, i_remote = remote.search_keys(keys, 5)
    np.testing.assert_array_equal(i_remote, i_local)
    np.testing.assert_array_equal(d_remote, d_local)
    # the manifests name the same files with the same sha256 (hashing keys are exact)
    assert json.loads((remote.path / "manifest.json").read_text()) == json.loads(
        (local.path / "manifest.json").read_text()
    )
    Database.open(remote.path, verify=True)
    assert not list(remote.path.glob(".ray-probe-*")) and not list(remote.path.rglob(".tmp-*"))


@pytest.mark.parametrize("factory", ["IVF16,Flat", "IVF16,PQ16x4fs,Refine(SQ8)", "HNSW32,Flat"])
def test_ray_index_merge_searches_like_local(cluster, docs, tmp_path, factory):
    # IVF: shard parts added on the workers and merged with merge_from (ids shifted per shard);
    # Refine: its IVF-PQ base and SQ8 codes merged apart (the >2M default's shape); HNSW cannot
    # merge, its keys are added on the driver. 846 chunks, 16 lists.
    params = {"nprobe": 4, "k_factor_rf": 4} if "Refine" in factory else {"nprobe": 4}
    if factory.startswith("HNSW"):
        params = {"efSearch": 64}
    kw = dict(BUILD, index_factory=factory, search_params=params)
    local = build_database(docs[0], tmp_path / "local", **kw)
    remote = build_database(docs[0], tmp_path / "ray", **kw, engine="ray")
    assert local.num_chunks >= 39 * 16  # enough keys to train 16 lists
    _assert_same_database(local, remote)
    keys = local.keys(np.arange(local.num_chunks))
    d_local, i_local = local.search_keys(keys, 10)
    d_remote, i_remote = remote.search_keys(keys, 10)
    np.testing.assert_array_equal(i_remote, i_local)
    np.testing.assert_array_equal(d_remote, d_local)
    if factory == "IVF16,Flat":  # merging IVF-Flat parts gives the very same index bytes
        sha = [
            json.loads((db.path / "manifest.json").read_text())["files"]["index/v00001.faiss"]
            for db in (local, remote)
        ]
        assert sha[0]["sha256"] == sha[1]["sha256"]
    Database.open(remote.path, verify=True)


def test_ray_ondisk_build_equals_local(cluster, docs, tmp_path, monkeypatch):
    # Memory as if 64 KB: the index goes on disk (IVF-SQfp16 lists in index/v00001.ivfdata). On
    # Ray the workers encode each shard's keys into files and the driver only fills the lists
    # from them: the driver's own encoder (build_ondisk_ivf) is made to fail for the Ray build.
    import retro_db.build
    import retro_db.index

    monkeypatch.setattr(retro_db.index, "available_memory", lambda: 64 * 1024)
    local = build_database(docs[0], tmp_path / "local", **BUILD)

    def no_driver_encoding(*a, **k):
        raise AssertionError("the Ray build encoded keys on the driver")

    monkeypatch.setattr(retro_db.build, "build_ondisk_ivf", no_driver_encoding)
    remote = build_database(docs[0], tmp_path / "ray", **BUILD, engine="ray")
    idx = local.manifest["index"]
    assert idx["on_disk"] and idx["factory"].endswith(",SQfp16")
    assert len(local.manifest["shards"]) >= 4  # several shards encoded on 2 workers
    _assert_same_database(local, remote)
    # the same trained index, lists file and index file, byte for byte (sha256 in the manifests)
    ml, mr = (json.loads((db.path / "manifest.json").read_text()) for db in (local, remote))
    for name in (idx["file"], idx["lists"], idx["trained"]):
        assert mr["files"][name] == ml["files"][name], name
    assert mr == ml
    keys = local.keys(np.arange(local.num_chunks))
    d_local, i_local = local.search_keys(keys, 10)
    d_remote, i_remote = remote.search_keys(keys, 10)
    np.testing.assert_array_equal(i_remote, i_local)
    np.testing.assert_array_equal(d_remote, d_local)
    Database.open(remote.path, verify=True)
    left = [p.name for p in (remote.path / "index").iterdir()]
    assert sorted(left) == sorted(p.name for p in (local.path / "index").iterdir())  # no codes


def test_ray_resumes_an_interrupted_build(cluster, flat_pair, docs, tmp_path):
    # A kill after shards 0-1 completed and during shard 2: no shard.json there, no manifest.
    _, remote = flat_pair
    path = tmp_path / "ray"
    shutil.copytree(remote.path, path)
    for p in [path / "manifest.json", path / "versions", path / "index"]:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    (path / "shards" / "s00002" / "shard.json").unlink()
    (path / "shards" / "s00003" / "keys.npy").write_bytes(b"junk")  # to be redone, not read
    before = (path / "shards" / "s00000" / "shard.json").stat().st_mtime_ns
    again = build_database(docs[0], path, index_factory="Flat", **BUILD, engine="ray")
    assert (path / "shards" / "s00000" / "shard.json").stat().st_mtime_ns == before  # reused
    assert json.loads((path / "manifest.json").read_text()) == remote.manifest
    Database.open(again.path, verify=True)


def _assert_same_dataset(a, b) -> None:
    for name in DATASET_FILES:
        np.testing.assert_array_equal(np.load(b / name), np.load(a / name), err_msg=name)
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert mb["counts"] == ma["counts"] and mb["files"] == ma["files"]


def test_ray_neighbours_equal_local(cluster, flat_pair, docs, tmp_path):
    local, _ = flat_pair
    kw = dict(k=3, shard_chunks=150, progress=False)
    # the database's own chunks (stored keys) ...
    write_neighbours(local, None, tmp_path / "self_local", **kw)
    write_neighbours(local, None, tmp_path / "self_ray", **kw, engine="ray")
    _assert_same_dataset(tmp_path / "self_local", tmp_path / "self_ray")
    # ... and a corpus of documents: some in the database (by doc_id, excluded), some new
    corpus = docs[0][30:] + docs[1]
    write_neighbours(local, corpus, tmp_path / "docs_local", **kw)
    write_neighbours(local, corpus, tmp_path / "docs_ray", **kw, engine="ray")
    _assert_same_dataset(tmp_path / "docs_local", tmp_path / "docs_ray")
    assert not (tmp_path / "docs_ray" / "parts").exists()


def test_cli_build_and_neighbours_with_engine_ray(cluster, docs, tmp_path):
    from retro_db.cli import main

    src = tmp_path / "docs.jsonl"
    src.write_text(
        "".join(json.dumps({"title": d.doc_id, "text": d.text}) + "\n" for d in docs[0][:20]),
        encoding="utf-8",
    )
    common = ["--id-field", "title", "--embedder", "hash:64", "--chunk-size", "16"]
    common += ["--shard-chunks", "100", "--threads", "1", "--no-progress"]
    assert main(["build", str(src), "--out", str(tmp_path / "local"), *common]) == 0
    ray_args = ["--engine", "ray", "--num-cpus", "2"]
    assert main(["build", str(src), "--out", str(tmp_path / "ray"), *common, *ray_args]) == 0
    _assert_same_database(Database.open(tmp_path / "local"), Database.open(tmp_path / "ray"))
    nb = ["-k", "2", "--shard-chunks", "100", "--no-progress"]
    assert main(["neighbours", str(tmp_path / "local"), "--out", str(tmp_path / "nl"), *nb]) == 0
    rc = main(
        ["neighbours", str(tmp_path / "local"), "--out", str(tmp_path / "nr"), *nb, *ray_args]
    )
    assert rc == 0
    _assert_same_dataset(tmp_path / "nl", tmp_path / "nr")


def test_worker_errors_arrive_as_one_line(cluster, docs, tmp_path):
    with pytest.raises(ValueError, match=r"^HashingEmbedder: dim must be >= 1, got 0$"):
        build_database(docs[0][:3], tmp_path / "db", **dict(BUILD, embedder="hash:0"), engine="ray")


def test_missing_ray_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    from retro_db.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    msg = "retro-db build --engine ray needs the [ray] extra: pip install 'retro-db[ray]'"
    with pytest.raises(ImportError) as e:
        build_database([Document("a", "text")], tmp_path / "db", embedder="hash:8", engine="ray")
    assert str(e.value) == msg
    assert not (tmp_path / "db").exists()
    src = tmp_path / "a.txt"
    src.write_text("some text", encoding="utf-8")
    assert main(["build", str(src), "--out", str(tmp_path / "db"), "--engine", "ray"]) == 2
    assert capsys.readouterr().err.strip() == f"retro-db: error: {msg}"
    with pytest.raises(ImportError) as e:
        write_neighbours(tmp_path / "no-db", None, tmp_path / "ds", engine="ray")
    assert str(e.value) == msg.replace("build", "neighbours")
    assert not (tmp_path / "ds").exists()


def test_ray_options_need_engine_ray(tmp_path, capsys):
    from retro_db.cli import main

    src = tmp_path / "a.txt"
    src.write_text("some text", encoding="utf-8")
    assert main(["build", str(src), "--out", str(tmp_path / "db"), "--num-cpus", "2"]) == 2
    err = "retro-db: error: build: --address and --num-cpus need --engine ray"
    assert capsys.readouterr().err.strip() == err
    with pytest.raises(ValueError, match="^build: engine 'spark', expected 'local' or 'ray'$"):
        build_database([Document("a", "text")], tmp_path / "db", engine="spark")


def test_unreachable_address_fails_fast(tmp_path):
    # In a fresh process: ray.init would retry for minutes; a TCP probe answers at once.
    pytest.importorskip("ray")
    src = tmp_path / "a.txt"
    src.write_text("some text", encoding="utf-8")
    out = tmp_path / "db"
    args = ["build", str(src), "--out", str(out), "--engine", "ray", "--address", "127.0.0.1:1"]
    r = subprocess.run(
        [sys.executable, "-m", "retro_db.cli", *args], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    assert r.stderr.startswith("retro-db: error: ray: cannot connect to '127.0.0.1:1': ")
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()  # nothing written before the cluster answered


@pytest.mark.embed
@pytest.mark.slow
def test_ray_build_with_minilm_equals_local(cluster, docs, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    tiny = [Document(d.doc_id, d.text[:300], d.meta) for d in docs[0][:8]]
    kw = dict(BUILD, embedder=None, shard_chunks=12, index_factory="Flat")
    local = build_database(tiny, tmp_path / "local", **kw)
    remote = build_database(tiny, tmp_path / "ray", **kw, engine="ray")
    assert len(local.manifest["shards"]) >= 2
    _assert_same_database(local, remote)
    assert remote.manifest["embedder"] == local.manifest["embedder"]
    keys = local.keys(np.arange(local.num_chunks))
    np.testing.assert_array_equal(remote.search_keys(keys, 4)[1], local.search_keys(keys, 4)[1])


def test_local_ray_temp_dir_leaves_the_virtualenv(monkeypatch, tmp_path):
    # Ray's workers die at start with a temp dir inside $VIRTUAL_ENV (nox sets TMPDIR there).
    venv = tmp_path / "venv"
    monkeypatch.setenv("VIRTUAL_ENV", str(venv))
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(venv / "tmp"))
    assert local_temp_dir() == "/tmp/ray"
    monkeypatch.setenv("TMPDIR", str(tmp_path / "elsewhere"))
    assert local_temp_dir() is None
    monkeypatch.setenv("RAY_TMPDIR", str(venv / "ray"))
    assert local_temp_dir() == "/tmp/ray"
    monkeypatch.delenv("VIRTUAL_ENV")
    assert local_temp_dir() is None


# ---- bounded memory per worker (issue 18) ------------------------------------------------------
# Each Ray worker process runs this hook at start (runtime_env worker_process_setup_hook): faiss
# (and its BLAS) and the tokenizer are loaded and run once, as in the local memory-cap test
# (test_ondisk.py), then the worker's data segment is capped (RLIMIT_DATA: heap and anonymous
# memory; mapped files are not counted) at what it holds plus RETRO_TEST_WORKER_CAP bytes.
CAP_HOOK = r"""
import os, resource
import numpy as np, faiss

def vmdata():
    return next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmData"))

def cap():
    faiss.omp_set_num_threads(1)
    faiss.index_factory(1024, "IVF2,Flat").train(np.random.default_rng(1).random((128, 1024), "float32"))
    from retro_db.tokenizer import load_tokenizer
    load_tokenizer().encode_batch(["warm up"])
    import retro_db.distributed, retro_db.shards, retro_db.index  # noqa: F401
    limit = vmdata() + int(os.environ["RETRO_TEST_WORKER_CAP"])
    resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.RLIM_INFINITY))
"""

CAP_DRIVER = r"""
import json, os, resource, sys
import numpy as np, ray
import retro_db.build
from retro_db.build import build_database
from retro_db.distributed import local_temp_dir
from retro_db.tokenizer import load_tokenizer

src, out, cap = sys.argv[1], sys.argv[2], int(sys.argv[3])
ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", _temp_dir=local_temp_dir(),
         runtime_env={"worker_process_setup_hook": "retro_test_cap_hook.cap",
                      "env_vars": {"RETRO_TEST_WORKER_CAP": str(cap)}})

@ray.remote(num_cpus=1)
def probe(nbytes):
    # what a worker may hold: its cap, and whether keys + index would fit in it at once
    soft = resource.getrlimit(resource.RLIMIT_DATA)[0]
    try:
        np.ones(nbytes, dtype=np.uint8)
        fits = True
    except MemoryError:
        fits = False
    return {"rlimit_data": soft, "fits": fits}

def no_driver_encoding(*a, **k):
    raise AssertionError("the Ray build encoded keys on the driver")

retro_db.build.build_ondisk_ivf = no_driver_encoding
db = build_database(src, out, tokenizer=load_tokenizer(), embedder="hash:4096", chunk_size=4,
                    shard_chunks=512, threads=1, progress=False, engine="ray",
                    max_memory=cap)
files = db.manifest["files"]
total = sum(int(e["size"]) for n, e in files.items() if n.endswith("keys.npy") or n.startswith("index/"))
print(json.dumps({"index": db.manifest["index"], "shards": len(db.manifest["shards"]),
                  "probe": ray.get(probe.remote(total)), "keys_and_index": total}))
ray.shutdown()
"""
WORKER_CAP = 80 << 20  # bytes each worker may add to its loaded interpreter


def test_ray_ondisk_build_under_a_worker_memory_cap_equals_local(load_records, tmp_path):
    # A separate Ray cluster (in a child process) whose every worker is capped below the keys +
    # index of the database it writes (shards: tokenise, embed, write; then encode its shards'
    # keys for the on-disk lists): the build succeeds, a worker under the same cap cannot hold
    # keys + index, and the database equals the local build byte for byte (uncapped, here).
    import os

    pytest.importorskip("ray")
    docs = [
        {"id": f"{name}{i}", "text": r["text"]}
        for name in ("wikipedia", "moby_dick")
        for i, r in enumerate(load_records(name, 20, max_chars=4000))
    ]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "retro_test_cap_hook.py").write_text(CAP_HOOK)
    path = os.pathsep.join([str(tmp_path / "hook"), *sys.path])
    res = subprocess.run(
        [sys.executable, "-c", CAP_DRIVER, str(tmp_path / "docs.jsonl"), str(tmp_path / "ray")]
        + [str(WORKER_CAP)],
        capture_output=True,
        text=True,
        timeout=1800,
        env=dict(os.environ, PYTHONPATH=path),
    )
    lines = [x for x in res.stdout.splitlines() if x.startswith("{")]
    assert res.returncode == 0 and lines, res.stderr[-3000:]
    out = json.loads(lines[-1])
    assert out["index"]["on_disk"] and out["shards"] >= 4
    assert out["keys_and_index"] > 1.5 * WORKER_CAP  # the cap is well below keys + index
    assert out["probe"]["rlimit_data"] < 1 << 40 and not out["probe"]["fits"]  # the cap binds
    local = build_database(
        str(tmp_path / "docs.jsonl"),
        tmp_path / "local",
        embedder="hash:4096",
        chunk_size=4,
        shard_chunks=512,
        threads=1,
        progress=False,
        max_memory=WORKER_CAP,
    )
    remote = Database.open(tmp_path / "ray", verify=True)
    ml, mr = (json.loads((db.path / "manifest.json").read_text()) for db in (local, remote))
    assert mr == ml  # every file's sha256: shards, keys, trained index, lists, index
