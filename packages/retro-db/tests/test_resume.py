"""A build killed with SIGKILL and restarted finishes byte-identical to an uninterrupted build."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

CHILD = textwrap.dedent(
    """
    import json, sys, time
    import retro_db.shards
    from retro_db.build import build_database
    from retro_db.ingest import read_jsonl

    src, out, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    retro_db.shards.READ_AHEAD = 1  # tokenise document by document: shards finish one by one

    def slow():
        for d in read_jsonl(src, id_field="title"):
            time.sleep(delay)  # stretch the build so that the parent can kill it mid-way
            yield d

    build_database(slow(), out, embedder="hash:32", chunk_size=16, shard_chunks=40,
                   index_factory="IVF4,Flat", threads=1, progress=False)
    """
)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _run(script: Path, src: Path, out: Path, delay: float) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen(
        [sys.executable, str(script), str(src), str(out), str(delay)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(
                f"child ended before the kill point: {proc.stderr.read().decode()}"
            )
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("kill point never reached")
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_and_resume_is_identical(tmp_path, wiki_docs):
    src = tmp_path / "docs.jsonl"
    src.write_text(
        "".join(json.dumps({"title": d.doc_id, "text": d.text}) + "\n" for d in wiki_docs),
        encoding="utf-8",
    )
    script = tmp_path / "child.py"
    script.write_text(CHILD, encoding="utf-8")

    ref = tmp_path / "ref"
    p = _run(script, src, ref, 0.0)
    assert p.wait(timeout=120) == 0, p.stderr.read().decode()

    out = tmp_path / "out"
    shard = out / "shards"
    kill_points = [
        # after the first shard is complete
        lambda: (shard / "s00001" / "shard.json").exists(),
        # in the middle of a shard: its first array is written, its marker is not
        lambda: (shard / "s00003" / "tokens.npy").exists(),
        # later on
        lambda: (shard / "s00005" / "shard.json").exists(),
    ]
    for ready in kill_points:
        _kill_when(_run(script, src, out, 0.05), ready)
        assert not (out / "manifest.json").exists()
    p = _run(script, src, out, 0.0)
    assert p.wait(timeout=120) == 0, p.stderr.read().decode()

    got, want = _hashes(out), _hashes(ref)
    assert sorted(got) == sorted(want)  # same files, no temporaries left behind
    diff = [name for name in want if got[name] != want[name]]
    assert not diff, f"files differ after resume: {diff}"
    assert json.loads((out / "manifest.json").read_text())["counts"]["shards"] >= 6


def _crash_after(docs, n):
    for i, d in enumerate(docs):
        if i == n:
            raise KeyboardInterrupt("simulated crash")
        yield d


def test_interrupted_add_resumes_to_the_same_version(small_db, wiki_docs, tmp_path, monkeypatch):
    import shutil

    import retro_db.shards

    monkeypatch.setattr(retro_db.shards, "READ_AHEAD", 1)
    from retro_db.build import add_documents
    from retro_db.database import Database

    ref, out = tmp_path / "ref", tmp_path / "out"
    shutil.copytree(small_db, ref)
    shutil.copytree(small_db, out)
    add_documents(ref, wiki_docs[10:14], shard_chunks=30, progress=False)
    for n in (1, 3):
        with pytest.raises(KeyboardInterrupt):
            add_documents(out, _crash_after(wiki_docs[10:14], n), shard_chunks=30, progress=False)
        assert Database.open(out).version == 1  # the manifest still names version 1
    assert (out / "shards" / "s00003" / "shard.json").exists()  # a shard of the add was complete
    add_documents(out, wiki_docs[10:14], shard_chunks=30, progress=False)
    assert _hashes(out) == _hashes(ref)


def test_resume_with_other_settings_is_refused(wiki_docs, tmp_path, monkeypatch):
    import retro_db.shards
    from retro_db.build import build_database

    monkeypatch.setattr(retro_db.shards, "READ_AHEAD", 1)
    from retro_db.manifest import DatabaseError

    out = tmp_path / "db"
    with pytest.raises(KeyboardInterrupt):
        build_database(
            _crash_after(wiki_docs, 6),
            out,
            embedder="hash:32",
            chunk_size=16,
            shard_chunks=30,
            progress=False,
        )
    with pytest.raises(DatabaseError, match="settings"):
        build_database(
            wiki_docs, out, embedder="hash:32", chunk_size=32, shard_chunks=30, progress=False
        )
    with pytest.raises(DatabaseError, match="other sources"):
        build_database(
            wiki_docs[1:], out, embedder="hash:32", chunk_size=16, shard_chunks=30, progress=False
        )


def test_second_writer_is_refused(small_db, wiki_docs, tmp_path):
    import shutil

    from retro_db.build import add_documents
    from retro_db.manifest import DatabaseError, writer_lock

    path = tmp_path / "db"
    shutil.copytree(small_db, path)
    with writer_lock(path):  # another writer holds the database
        with pytest.raises(DatabaseError, match=r"\.lock: another build or add"):
            add_documents(path, wiki_docs[10:11], progress=False)
    add_documents(path, wiki_docs[10:11], progress=False)  # released: works
