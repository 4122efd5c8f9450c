"""The retro-db CLI: every subcommand's --help, a full build/add/info/query/neighbours/dedup run,
and errors as one line on stderr with exit code 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from retro_db.cli import main
from retro_db.database import Database

SUBCOMMANDS = ["build", "add", "info", "query", "neighbours", "dedup"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, wiki_docs):
    d = tmp_path_factory.mktemp("cli")
    p = d / "wiki.jsonl"
    p.write_text(
        "".join(json.dumps({"title": x.doc_id, "text": x.text}) + "\n" for x in wiki_docs[:10]),
        encoding="utf-8",
    )
    q = d / "more.jsonl"
    q.write_text(
        "".join(json.dumps({"title": x.doc_id, "text": x.text}) + "\n" for x in wiki_docs[10:14]),
        encoding="utf-8",
    )
    return p, q


@pytest.fixture(scope="module")
def cli_db(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("clidb") / "db"
    rc = main(
        [
            "build",
            str(corpus[0]),
            "--out",
            str(out),
            "--id-field",
            "title",
            "--embedder",
            "hash:32",
            "--chunk-size",
            "16",
            "--shard-chunks",
            "60",
            "--threads",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 0
    return out


def test_console_script_help():
    exe = shutil.which("retro-db")
    cmd = [exe] if exe else [sys.executable, "-m", "retro_db.cli"]
    r = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for sub in SUBCOMMANDS:
        assert sub in r.stdout


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_subcommand_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([sub, "--help"])
    assert e.value.code == 0
    assert f"usage: retro-db {sub}" in capsys.readouterr().out


def test_build_then_info(cli_db, capsys):
    db = Database.open(cli_db, verify=True)
    assert db.num_documents == 10 and db.chunk_size == 16
    assert db.document_index("Anarchism") == 0
    capsys.readouterr()
    assert main(["info", str(cli_db), "--json", "--verify", "-k", "5"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["chunks"] == db.num_chunks and info["documents"] == 10
    assert info["index"] == "Flat" and info["recall@5"] == 1.0  # Flat is exact
    assert info["bytes"]["chunks"] > 0 and info["bytes"]["keys"] > 0 and info["bytes"]["index"] > 0
    assert main(["info", str(cli_db)]) == 0
    assert "recall@10" in capsys.readouterr().out


def test_query_finds_the_chunk_it_was_given(cli_db, wiki_docs, capsys):
    text = wiki_docs[2].text[:60]
    capsys.readouterr()
    assert main(["query", str(cli_db), text, "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and hits[0]["doc"] == 2 and hits[0]["text"].startswith(text[:30])


def test_add_and_neighbours(cli_db, corpus, tmp_path, capsys):
    db = tmp_path / "db"
    shutil.copytree(cli_db, db)
    assert main(["add", str(db), str(corpus[1]), "--id-field", "title", "--no-progress"]) == 0
    d = Database.open(db, verify=True)
    assert d.version == 2 and d.num_documents == 14
    out = tmp_path / "ds"
    assert main(["neighbours", str(db), "--out", str(out), "-k", "2", "--no-progress"]) == 0
    nid = np.load(out / "neighbour_ids.npy")
    doc_ids = np.load(out / "doc_ids.npy")
    assert not np.any(d.doc_ids[nid] == doc_ids[:, None])
    out2 = tmp_path / "ds2"
    rc = main(
        [
            "neighbours",
            str(db),
            "--out",
            str(out2),
            "--corpus",
            str(corpus[1]),
            "--id-field",
            "title",
            "--no-progress",
        ]
    )
    assert rc == 0
    doc_ids = np.load(out2 / "doc_ids.npy")
    assert list(dict.fromkeys(doc_ids.tolist())) == [10, 11, 12, 13]  # matched by title


def test_dedup(corpus, wiki_docs, tmp_path, capsys):
    pytest.importorskip("datasketch")
    train = tmp_path / "train.jsonl"
    near_copy = wiki_docs[1].text.replace("anarchism", "anarchy", 1)
    recs = [{"text": x.text} for x in wiki_docs[2:8]] + [{"text": near_copy}]
    train.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    ev = tmp_path / "eval.jsonl"
    ev.write_text(json.dumps({"text": wiki_docs[1].text}) + "\n", encoding="utf-8")
    report, kept = tmp_path / "report.json", tmp_path / "kept.jsonl"
    rc = main(
        [
            "dedup",
            "--train",
            str(train),
            "--eval",
            str(ev),
            "--report",
            str(report),
            "--kept-out",
            str(kept),
        ]
    )
    assert rc == 0
    rep = json.loads(report.read_text())
    assert rep["num_removed"] == 1 and rep["removed"][0]["train_index"] == 6
    kept_texts = [json.loads(x)["text"] for x in kept.read_text().splitlines()]
    assert kept_texts == [x.text for x in wiki_docs[2:8]]


def _error(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("retro-db: error: ") and err.count("\n") == 1, err
    return err


def test_errors_exit_2_with_one_line(cli_db, corpus, tmp_path, capsys):
    err = _error(["info", str(tmp_path)], capsys)
    assert "manifest.json: file not found" in err
    err = _error(
        ["build", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x"), "--no-progress"],
        capsys,
    )
    assert "nope.jsonl" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": 3}\n')
    err = _error(
        [
            "build",
            str(bad),
            "--out",
            str(tmp_path / "y"),
            "--strict",
            "--embedder",
            "hash:8",
            "--no-progress",
        ],
        capsys,
    )
    assert "bad.jsonl:2" in err
    db = tmp_path / "db"
    shutil.copytree(cli_db, db)
    p = db / "shards" / "s00000" / "keys.npy"
    p.write_bytes(p.read_bytes()[:-1])
    err = _error(["query", str(db), "hello"], capsys)
    assert "s00000/keys.npy" in err and "expected" in err


def test_error_exit_code_from_the_console_script(tmp_path):
    exe = shutil.which("retro-db")
    cmd = [exe] if exe else [sys.executable, "-m", "retro_db.cli"]
    r = subprocess.run([*cmd, "info", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("retro-db: error:") and r.stderr.count("\n") == 1
