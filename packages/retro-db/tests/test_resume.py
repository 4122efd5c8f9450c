"""Crash safety (issue 16's fault-injection suite, with test_integrity.py): a build, add or
neighbours run killed with SIGKILL, at fixed points and at seeded random moments, and restarted
finishes byte-identical to an uninterrupted run; a second concurrent writer of each kind exits 2 and
leaves nothing behind.

The children run ``CHILD`` below: the hashing embedder, small real texts of tests/data, and a
per-document delay that stretches the run so that the parent can kill it mid-way.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import retro_db.shards
    from retro_db.build import add_documents, build_database
    from retro_db.ingest import read_jsonl
    from retro_db.neighbours import write_neighbours

    op, src, out, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    ready = Path(sys.argv[5]) if len(sys.argv) > 5 else None
    retro_db.shards.READ_AHEAD = 1  # tokenise document by document: shards finish one by one

    def slow():
        for d in read_jsonl(src, id_field="title"):
            if ready is not None and not ready.exists():
                ready.write_text("working")  # inside the run: the writer lock is held
            time.sleep(delay)  # stretch the run so that the parent can kill it mid-way
            yield d

    if op == "build":
        build_database(slow(), out, embedder="hash:32", chunk_size=16, shard_chunks=40,
                       index_factory="IVF4,Flat", threads=1, progress=False)
    elif op == "add":
        add_documents(out, slow(), shard_chunks=40, threads=1, progress=False)
    else:  # neighbours: argv[6] is the database
        write_neighbours(sys.argv[6], slow(), out, k=2, shard_chunks=20, threads=1,
                         progress=False)
    """
)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _run(
    script: Path, src: Path, out: Path, delay: float, *extra: Path, op: str = "build"
) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen(
        [sys.executable, str(script), op, str(src), str(out), str(delay), *map(str, extra)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 60.0, after: float = 0.0) -> None:
    """SIGKILL ``proc`` ``after`` seconds after ``ready()`` holds; it must still be running."""
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
    time.sleep(after)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"the child ended before the kill: {proc.returncode}"


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


# ---- random SIGKILLs of build, add and neighbours; a concurrent second writer -----------------
DELAY = 0.05  # seconds per document in the killed runs
KILLS = 3  # random kills of each kind
SEEDS = {"build": 161, "add": 162, "neighbours": 163}


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text(
        "".join(json.dumps({"title": r["title"], "text": r["text"]}) + "\n" for r in records),
        encoding="utf-8",
    )
    return path


#: a file that exists once a killed run got somewhere (the restart then really resumes)
PROGRESS = {
    "build": "shards/s00000/shard.json",
    "add": "shards/s00003/shard.json",  # small_db has 3 shards
    "neighbours": "parts/p00000/done.json",
}


def _case(op: str, tmp: Path, small_db: Path, load_records):
    """(source, killed output, reference output, extra child args, second writer's CLI args)."""
    out, ref = tmp / "out", tmp / "ref"
    if op == "build":
        src = _write_jsonl(tmp / "docs.jsonl", load_records("wikipedia", 30))
        cli = ["build", str(src), "--out", str(out), "--embedder", "hash:32", "--chunk-size"]
        cli += ["16", "--shard-chunks", "40", "--index-factory", "IVF4,Flat", "--no-progress"]
        return src, out, ref, (), cli
    if op == "add":
        src = _write_jsonl(tmp / "docs.jsonl", load_records("wikipedia", 34)[14:])
        shutil.copytree(small_db, out)
        shutil.copytree(small_db, ref)
        return (
            src,
            out,
            ref,
            (),
            ["add", str(out), str(src), "--shard-chunks", "40", "--no-progress"],
        )
    src = _write_jsonl(tmp / "docs.jsonl", load_records("moby_dick", 24))
    cli = ["neighbours", str(small_db), "--out", str(out), "--corpus", str(src), "-k", "2"]
    cli += ["--shard-chunks", "20", "--no-verify", "--no-progress"]  # straight to the lock
    return src, out, ref, (small_db,), cli


@pytest.mark.slow
@pytest.mark.parametrize("op", ["build", "add", "neighbours"])
def test_random_sigkills_resume_identical_and_a_second_writer_exits_2(
    op, tmp_path, small_db, load_records, capsys
):
    """KILLS SIGKILLs at seeded random moments of a run, then a run to the end during which a
    second writer (the CLI) tries the same output: it exits 2 with one line naming the lock, and
    the result is byte-identical to an uninterrupted run (so the second writer left nothing)."""
    from retro_db.cli import main
    from retro_db.database import Database

    src, out, ref, extra, cli = _case(op, tmp_path, small_db, load_records)
    n_docs = len(src.read_text().splitlines())
    script = tmp_path / "child.py"
    script.write_text(CHILD, encoding="utf-8")
    p = _run(script, src, ref, 0.0, tmp_path / "ready-ref", *extra, op=op)
    assert p.wait(timeout=120) == 0, p.stderr.read().decode()

    rng = np.random.default_rng(SEEDS[op])
    ready = tmp_path / "ready"
    done = out / PROGRESS[op]
    for i in range(KILLS):
        ready.unlink(missing_ok=True)
        # After `ready` the run still sleeps DELAY per document; after `done` (its first shard or
        # part) at least 18 documents remain: kills within these bounds land mid-run. The last
        # kill waits for `done`, so that the final run resumes real work whatever the load.
        if i < KILLS - 1:
            when, after = ready.exists, float(rng.uniform(0.0, 0.8 * n_docs * DELAY))
        else:
            when, after = (lambda: ready.exists() and done.is_file()), float(rng.uniform(0, 0.5))
        _kill_when(_run(script, src, out, DELAY, ready, *extra, op=op), when, after=after)
        if op == "add":
            assert Database.open(out).version == 1  # the old version stays the readable one
        else:
            assert not (out / "manifest.json").exists()
    assert done.is_file()

    ready.unlink()
    p = _run(script, src, out, 0.1, ready, *extra, op=op)
    t0 = time.monotonic()
    while not ready.exists():
        assert p.poll() is None, p.stderr.read().decode()
        assert time.monotonic() - t0 < 60
        time.sleep(0.005)
    capsys.readouterr()
    assert main(cli) == 2  # the child holds the writer lock for at least n_docs * 0.1 s more
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out / '.lock'}: another" in err, err
    assert p.wait(timeout=120) == 0, p.stderr.read().decode()

    got, want = _hashes(out), _hashes(ref)
    assert sorted(got) == sorted(want)  # same files: no temporaries, nothing of the second writer
    assert [name for name in want if got[name] != want[name]] == []


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
