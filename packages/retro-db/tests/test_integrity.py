"""Fault injection (issue 16): corrupted, tampered or repeated input is refused, never used silently.

Synthetic documents only (no data files): a 2-version database of m=8 chunks, hashing keys d=16.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from retro_db.build import BuildStats, add_documents, build_database
from retro_db.cli import main
from retro_db.database import Database
from retro_db.ingest import Document, IngestError, IngestStats, read_documents
from retro_db.manifest import DatabaseError, json_checksum, writer_lock
from retro_db.neighbours import DATASET_FILES, write_neighbours

WORDS = (
    "river stone light market winter garden paper engine silver window history music "
    "forest island letter bridge number circle morning harbour theory signal"
).split()


def _docs(n: int, seed: int, prefix: str = "d") -> list[Document]:
    rng = np.random.default_rng(seed)
    return [
        Document(f"{prefix}{i}", " ".join(rng.choice(WORDS, size=int(rng.integers(30, 70)))))
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def base_db(tmp_path_factory):
    """Version 1 from 8 documents, version 2 adds 3 more: 2 version files, several shards."""
    path = tmp_path_factory.mktemp("integrity") / "db"
    kw = dict(shard_chunks=20, threads=1, progress=False)
    build_database(_docs(8, 0), path, embedder="hash:16", chunk_size=8, **kw)
    add_documents(path, _docs(3, 1, "e"), **kw)
    return path


@pytest.fixture
def db(base_db, tmp_path):
    path = tmp_path / "db"
    shutil.copytree(base_db, path)
    return path


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name != ".lock")


def _rewrite_manifest(path: Path, edit) -> None:
    man = json.loads((path / "manifest.json").read_text())
    edit(man)
    man["checksum"] = json_checksum(man)  # the path check itself must refuse, not the checksum
    (path / "manifest.json").write_text(json.dumps(man))


# ---- manifest paths --------------------------------------------------------------------------
ESCAPES = {
    "index": lambda m: m["index"].update(file="../other/index.faiss"),
    "shard": lambda m: m["shards"].__setitem__(0, "../../outside"),
    "files": lambda m: m["files"].update({"../../../../etc/passwd": {"sha256": "0" * 64}}),
    "absolute": lambda m: m["files"].update({"/etc/passwd": {"sha256": "0" * 64}}),
    "version": lambda m: m["version_files"].update({"../../x.json": "0" * 64}),
}


@pytest.mark.parametrize("form", sorted(ESCAPES))
def test_manifest_paths_cannot_escape(db, form, tmp_path, capsys):
    outside = tmp_path / "other"
    outside.mkdir()
    shutil.copy(db / "index" / "v00002.faiss", outside / "index.faiss")
    _rewrite_manifest(db, ESCAPES[form])
    with pytest.raises(DatabaseError) as e:
        Database.open(db, verify=True)
    msg = str(e.value)
    assert "\n" not in msg and ("resolves outside" in msg or "relative path inside" in msg), msg
    assert "manifest.json" in msg
    capsys.readouterr()
    assert main(["info", str(db), "--verify"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "manifest.json" in err


def test_shard_symlink_out_of_the_database_is_refused(db, tmp_path):
    target = tmp_path / "elsewhere"
    shutil.move(db / "shards" / "s00000", target)
    (db / "shards" / "s00000").symlink_to(target)
    with pytest.raises(DatabaseError, match=r"shards/s00000/.*resolves outside"):
        Database.open(db)


# ---- byte flips ------------------------------------------------------------------------------
def _flip(p: Path, offset: int) -> int:
    raw = bytearray(p.read_bytes())
    old = raw[offset]
    raw[offset] ^= 0x5A
    p.write_bytes(bytes(raw))
    return old


def _open_checked(path: Path, version: int | None, verify: bool) -> str | None:
    """The error of opening (None: opened)."""
    try:
        Database.open(path, verify=verify, version=version)
    except DatabaseError as e:
        assert "\n" not in str(e)
        return str(e)
    return None


def test_random_byte_flips_are_all_detected(db):
    """Seeded random flips, 3 in every file of the database: each is refused by open or verify."""
    rng = np.random.default_rng(16)
    files = _files(db)
    pristine = {p: p.read_bytes() for p in files}
    current = json.loads((db / "manifest.json").read_text())["files"]
    flips = 3 * len(files)
    at_open = at_verify = 0
    for i in range(flips):
        p = files[i // 3]
        p.write_bytes(pristine[p])
        offset = int(rng.integers(p.stat().st_size))
        _flip(p, offset)
        rel = p.relative_to(db).as_posix()
        version = int(p.stem[1:]) if p.parent.name == "versions" else None
        if rel not in current and p.parent.name not in ("versions", "db"):
            version = 1  # a file of version 1 only (its index): open that version
        # a corrupted faiss index is never handed to faiss unverified (it may crash on it)
        cheap = None if p.suffix == ".faiss" else _open_checked(db, version, verify=False)
        err = cheap or _open_checked(db, version, verify=True)
        assert err is not None, f"flip at {p.relative_to(db)}:{offset} went unnoticed"
        assert p.name in err or "manifest.json" in err, err
        at_open += cheap is not None
        at_verify += cheap is None
        p.write_bytes(pristine[p])
    print(
        f"byte flips: {flips} of {flips} in {len(files)} files detected ({at_open} at open, "
        f"{at_verify} by verify)"
    )
    assert at_open + at_verify == flips


def test_keys_header_flips_name_the_file(db, capsys):
    """Each byte of a keys.npy header flipped in turn: refused in one line naming the file (the
    issue saw numpy's bare `Cannot parse header`), by open or verify and by the CLI."""
    p = db / "shards" / "s00001" / "keys.npy"
    raw = p.read_bytes()
    header = 10 + int.from_bytes(raw[8:10], "little")
    for offset in range(header):
        flipped = bytearray(raw)
        flipped[offset] ^= 1 << (offset % 8)
        p.write_bytes(bytes(flipped))
        err = _open_checked(db, None, verify=False) or _open_checked(db, None, verify=True)
        assert err is not None and "s00001/keys.npy" in err, (offset, err)
    flipped = bytearray(raw)
    flipped[raw.index(b"{") + 1] ^= 0x5A  # the dict's first quote: `Cannot parse header`
    p.write_bytes(bytes(flipped))
    capsys.readouterr()
    assert main(["info", str(db)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{p}: not a readable .npy file" in err, err


def _mm(db: Path, shard: str, name: str) -> np.ndarray:
    return np.load(db / "shards" / shard / name, mmap_mode="r+", allow_pickle=False)


TARGETED = {
    # what: (file, how, found by the cheap checks of every open)
    "token out of vocabulary": ("tokens.npy", lambda a: a.__setitem__((3, 2), 65535), True),
    "token in vocabulary": ("tokens.npy", lambda a: a.__setitem__((3, 2), a[3, 2] ^ 1), False),
    "length": ("lengths.npy", lambda a: a.__setitem__(2, a[2] - 3), True),
    "doc id": ("doc_ids.npy", lambda a: a.__setitem__(4, a[4] + 1), True),
    "offset": ("offsets.npy", lambda a: a.__setitem__(5, a[5] + 8), True),
    "key": ("keys.npy", lambda a: a.__setitem__((1, 1), a[1, 1] + 1), False),
}


@pytest.mark.parametrize("what", sorted(TARGETED))
def test_targeted_flips_are_refused(db, what):
    name, how, cheap = TARGETED[what]
    a = _mm(db, "s00001", name)
    how(a)
    a.flush()
    del a
    err = _open_checked(db, None, verify=False)
    assert (err is not None) == cheap, err
    if cheap:
        assert f"s00001/{name}" in err and "expected" in err
    err = _open_checked(db, None, verify=True)
    assert err is not None and f"s00001/{name}" in err


def test_corrupt_database_never_becomes_a_dataset(db, tmp_path, capsys):
    """The issue's case: a token set to 65535, then `retro-db neighbours`; and a flipped key."""
    a = _mm(db, "s00000", "tokens.npy")
    a[0, 0] = 65535
    a.flush()
    del a
    out = tmp_path / "ds"
    capsys.readouterr()
    assert main(["neighbours", str(db), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "s00000/tokens.npy: row 0 holds token id 65535" in err and err.count("\n") == 1
    assert not out.exists()


def test_flipped_key_is_refused_by_neighbours_unless_no_verify(db, tmp_path):
    a = _mm(db, "s00002", "keys.npy")
    a[0, 0] = a[0, 0] + 1
    a.flush()
    del a
    with pytest.raises(DatabaseError, match=r"s00002/keys\.npy: sha256 differs"):
        write_neighbours(db, None, tmp_path / "ds", k=2, progress=False)
    assert not (tmp_path / "ds").exists()
    man = write_neighbours(db, None, tmp_path / "ds2", k=2, progress=False, verify=False)
    assert man["counts"]["chunks"] == Database.open(db).num_chunks


# ---- add idempotence -------------------------------------------------------------------------
def test_add_twice_equals_add_once(db, tmp_path):
    before = Database.open(db)
    new = _docs(4, 7, "n")
    once = add_documents(db, new, shard_chunks=20, threads=1, progress=False)
    stats = BuildStats()
    twice = add_documents(db, new, shard_chunks=20, threads=1, progress=False, stats=stats)
    assert stats.already_present == 4 and stats.duplicates == 0
    assert twice.version == once.version == before.version + 1
    assert twice.num_chunks == once.num_chunks and twice.num_documents == before.num_documents + 4
    # duplicates inside one add (and already present ones) are skipped and counted
    stats = BuildStats()
    more = _docs(2, 8, "m")
    again = add_documents(
        db, [*more, more[0], new[1], Document("renamed", more[1].text)], progress=False, stats=stats
    )
    assert (stats.already_present, stats.duplicates) == (1, 2)
    assert again.num_documents == once.num_documents + 2


def test_build_reports_duplicates(tmp_path):
    docs = _docs(3, 2)
    stats = BuildStats()
    built = build_database(
        [*docs, docs[1]],
        tmp_path / "db",
        embedder="hash:16",
        chunk_size=8,
        progress=False,
        stats=stats,
    )
    assert stats.duplicates == 1 and built.num_documents == 3


# ---- neighbours: resume parameters, lock, leftovers --------------------------------------------
def _crashing(docs, n):
    for i, d in enumerate(docs):
        if i == n:
            raise KeyboardInterrupt("simulated crash")
        yield d


def test_neighbours_resume_with_other_parameters_is_refused(db, tmp_path):
    corpus = _docs(6, 3, "c")
    out = tmp_path / "ds"
    with pytest.raises(KeyboardInterrupt):
        write_neighbours(db, _crashing(corpus, 4), out, k=2, shard_chunks=10, progress=False)
    for kw in ({"k": 2, "shard_chunks": 20}, {"k": 3, "shard_chunks": 10}):
        with pytest.raises(
            DatabaseError, match=r"params\.json: an interrupted run here used other"
        ):
            write_neighbours(db, corpus, out, progress=False, **kw)
    (out / ".tmp-tokens.npy").write_bytes(b"left by a kill")
    man = write_neighbours(db, corpus, out, k=2, shard_chunks=10, progress=False)
    ref = write_neighbours(db, corpus, tmp_path / "ref", k=2, shard_chunks=10, progress=False)
    assert man == ref and man["counts"]["chunks"] > 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*DATASET_FILES, "manifest.json"])


def test_second_neighbours_writer_exits_2_and_leaves_nothing(db, tmp_path, capsys):
    out = tmp_path / "ds"
    with writer_lock(out, what="neighbours run"):  # another run holds the output
        capsys.readouterr()
        assert main(["neighbours", str(db), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert ".lock: another neighbours run is writing here" in err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]


# ---- disk full -------------------------------------------------------------------------------
FSIZE_CHILD = """
import resource, signal, sys
from retro_db.cli import main
limit = int(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.exit(main(sys.argv[2:]))
"""


def test_disk_full_names_the_file_and_the_bytes_and_leaves_no_temp_file(tmp_path):
    """A build whose writes hit a file size limit (RLIMIT_FSIZE, as a full disk would): exit 2,
    one line naming the file, the bytes written of those needed; no temporary file left; the same
    command without the limit then completes and verifies."""
    import subprocess
    import sys

    src = tmp_path / "docs.jsonl"
    src.write_bytes(_jsonl(40))
    out = tmp_path / "db"
    args = ["build", str(src), "--out", str(out), "--embedder", "hash:64", "--chunk-size", "8"]
    args += ["--shard-chunks", "200", "--index-factory", "Flat", "--no-progress"]
    limit = 20000  # tokens.npy of a shard: 200 x 8 x 2 + 128 bytes; keys.npy: 200 x 64 x 2 + 128
    p = subprocess.run(
        [sys.executable, "-c", FSIZE_CHILD, str(limit), *args], capture_output=True, text=True
    )
    assert p.returncode == 2, p.stderr
    keys = out / "shards" / "s00000" / "keys.npy"
    assert p.stderr.count("\n") == 1, p.stderr
    # numpy reports the refused write as "N requested and M written"
    assert f"{keys}: write failed after {limit} of {200 * 64 * 2 + 128} bytes: " in p.stderr
    assert "requested and" in p.stderr and "bytes free there" in p.stderr
    assert not [q for q in out.rglob(".tmp-*")], "a temporary file was left behind"
    assert (out / "shards" / "s00000" / "tokens.npy").is_file()  # written before: kept
    assert main(args) == 0
    assert Database.open(out, verify=True).num_documents == 40


# ---- truncated input -------------------------------------------------------------------------
def _jsonl(n: int) -> bytes:
    return b"".join(json.dumps({"text": d.text}).encode() + b"\n" for d in _docs(n, 5))


def _zst(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".jsonl.gz", ".parquet"])
def test_truncated_input_is_named_as_truncated(tmp_path, suffix, caplog):
    p = tmp_path / f"docs{suffix}"
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": [d.text for d in _docs(40, 5)]}), p, row_group_size=10)
    else:
        data = _jsonl(40)
        p.write_bytes(_zst(data) if suffix.endswith(".zst") else gzip.compress(data))
    whole = list(read_documents(p))
    assert len(whole) == 40
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    stats = IngestStats()
    got = list(read_documents(p, stats=stats))
    assert len(got) < 40 and [d.text for d in got] == [d.text for d in whole[: len(got)]]
    assert stats.truncated == [str(p)] and stats.skipped == 0
    assert f"{p}: truncated after {len(got)} documents" in caplog.text
    with pytest.raises(IngestError, match=rf"docs{suffix}: truncated after {len(got)} documents"):
        list(read_documents(p, strict=True))


def test_truncated_build_input_cli_report_and_strict(tmp_path, capsys):
    p = tmp_path / "docs.jsonl.zst"
    data = _jsonl(30).splitlines(keepends=True)
    p.write_bytes(_zst(b"".join(data[:20])) + _zst(b"".join(data[20:]))[:-40])  # 2 frames
    out = tmp_path / "db"
    args = ["build", str(p), "--embedder", "hash:8", "--chunk-size", "8", "--no-progress"]
    capsys.readouterr()
    assert main([*args, "--out", str(out), "--strict"]) == 2
    assert "docs.jsonl.zst: truncated after" in capsys.readouterr().err
    assert main([*args, "--out", str(out)]) == 0
    assert f"20 documents read, 0 bad records skipped, 1 truncated files ({p})" in (
        capsys.readouterr().out
    )


def test_version_file_edit_is_refused(db):
    p = db / "versions" / "v00001.json"
    man = json.loads(p.read_text())
    man["counts"]["documents"] += 0
    man["index"]["search_params"] = {"foo": 1}
    man["checksum"] = json_checksum(man)
    p.write_text(json.dumps(man, indent=2, sort_keys=True) + "\n")
    with pytest.raises(DatabaseError, match=r"v00001\.json: sha256 differs from"):
        Database.open(db, version=1)
    with pytest.raises(DatabaseError, match=r"v00001\.json: sha256 differs from"):
        Database.open(db, verify=True)
    os.remove(p)
    with pytest.raises(DatabaseError, match=r"v00001\.json: file missing"):
        Database.open(db, verify=True)
