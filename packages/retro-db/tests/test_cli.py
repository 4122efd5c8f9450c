"""The retro-db CLI: every subcommand's --help, a full build/add/info/query/neighbours/dedup run,
and errors as one line on stderr with exit code 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retro_db.cli import main
from retro_db.database import Database

SUBCOMMANDS = ["build", "add", "info", "query", "neighbours", "dedup", "gc"]


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


def test_dedup_as_the_readme_writes_it_keeps_the_users_records(wiki_docs, tmp_path, capsys):
    """`retro-db dedup a.jsonl --eval b.jsonl --out k.jsonl`; kept records come back unchanged."""
    pytest.importorskip("datasketch")
    a = tmp_path / "a.jsonl"
    near_copy = wiki_docs[1].text.replace("anarchism", "anarchy", 1)
    recs = [{"id": f"doc-{i}", "text": x.text, "src": "w"} for i, x in enumerate(wiki_docs[2:6])]
    recs.insert(2, {"id": "near", "text": near_copy, "src": "w"})
    a.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    b = tmp_path / "b.jsonl"
    b.write_text(json.dumps({"text": wiki_docs[1].text}) + "\n", encoding="utf-8")
    k = tmp_path / "k.jsonl"
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    assert "retro-db dedup train.jsonl --eval test.jsonl --out kept.jsonl" in readme
    capsys.readouterr()
    assert main(["dedup", str(a), "--eval", str(b), "--out", str(k), "--no-progress"]) == 0
    kept = [json.loads(x) for x in k.read_text(encoding="utf-8").splitlines()]
    assert kept == [r for r in recs if r["id"] != "near"]  # the user's id and fields, as read
    out = capsys.readouterr().out
    assert "dedup: 1 of 5 training documents removed" in out and "train: 5 documents read" in out
    assert _error(["dedup", str(a), "--eval", str(b)], capsys).endswith("--report REPORT.json\n")


def test_add_of_an_empty_file_exits_2_like_build(cli_db, tmp_path, capsys):
    db = tmp_path / "db"
    shutil.copytree(cli_db, db)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    err = _error(["add", str(db), str(empty), "--no-progress"], capsys)
    assert "no documents with text" in err and "0 documents read from 1 files" in err
    argv = ["build", str(empty), "--out", str(tmp_path / "x"), "--embedder", "hash:8"]
    err = _error([*argv, "--no-progress"], capsys)
    assert "no documents with text" in err
    assert Database.open(db).version == 1


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["query", "DB", "hello", "-k", "0"], "argument -k: expected an integer >= 1, got 0"),
        (["query", "DB", "hello", "-k", "x"], "argument -k: expected an integer, got 'x'"),
        (["info", "DB", "--sample", "-3"], "expected an integer >= 1, got -3"),
        (["dedup", "a", "--eval", "b", "--threshold", "2"], "expected a number in (0, 1]"),
        (["gc", "DB", "--grace", "nan"], "expected a finite number of seconds"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["build", "x"], "the following arguments are required: --out"),
        (["build", "x", "--out", "y", "--keys", "foo"], "argument --keys: invalid choice: 'foo'"),
    ],
)
def test_usage_errors_are_one_line(cli_db, argv, expected, capsys):
    argv = [str(cli_db) if a == "DB" else a for a in argv]
    err = _error(argv, capsys)
    assert expected in err and "--help" in err


def test_build_into_a_folder_that_is_not_a_database_is_refused(corpus, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("mine", encoding="utf-8")
    err = _error(["build", str(corpus[0]), "--out", str(out), "--embedder", "hash:8"], capsys)
    assert f"{out}: not empty and not a database (holds thesis.tex)" in err
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]  # nothing written


def test_existing_database_error_names_the_cli_command(cli_db, corpus, capsys):
    err = _error(["build", str(corpus[0]), "--out", str(cli_db), "--no-progress"], capsys)
    assert "`retro-db add`" in err


def _grow(db, wiki_docs, tmp_path, n):
    """n adds of one new article each (versions 2..n+1)."""
    for i in range(n):
        p = tmp_path / f"more{i}.jsonl"
        p.write_text(json.dumps({"text": wiki_docs[10 + i].text}) + "\n", encoding="utf-8")
        assert main(["add", str(db), str(p), "--no-progress"]) == 0


def test_add_to_a_flat_index_stores_only_the_growth(cli_db, wiki_docs, tmp_path):
    from retro_db.index import exact_search_blocks

    db = tmp_path / "db"
    shutil.copytree(cli_db, db)
    base = (db / "index" / "v00001.faiss").stat().st_size
    _grow(db, wiki_docs, tmp_path, 3)
    d = Database.open(db, verify=True)
    assert d.version == 4 and d.num_documents == 13
    assert d.manifest["index"]["file"] == "index/v00001.faiss"
    assert d.manifest["index"]["parts"] == [f"index/v{v:05d}.faiss" for v in (2, 3, 4)]
    sizes = [(db / "index" / f"v{v:05d}.faiss").stat().st_size for v in (2, 3, 4)]
    assert max(sizes) < base / 3  # each part holds one article's keys, not a copy of the index
    assert (db / "index" / "v00001.faiss").stat().st_size == base  # never rewritten
    # searching the parts together == exact search over every stored key (ids = chunk ids)
    queries = d.keys(np.arange(0, d.num_chunks, 7))
    got_d, got_i = d.search_keys(queries, 5)
    want_d, want_i = exact_search_blocks(d.key_blocks(), queries, 5)
    assert np.array_equal(got_i, want_i) and np.allclose(got_d, want_d)
    assert d.recall(sample=50, k=5) == 1.0
    # every earlier version still opens with its own parts
    assert Database.open(db, version=2, verify=True).num_chunks < d.num_chunks


def test_gc_deletes_old_versions_no_reader_can_open(wiki_docs, tmp_path, capsys):
    from retro_db.build import build_database

    db = tmp_path / "db"
    # an IVF index needs training: add grows a copy of it, which gc can then delete
    build_database(
        wiki_docs[:10],
        db,
        embedder="hash:32",
        chunk_size=16,
        index_factory="IVF2,Flat",
        threads=1,
        progress=False,
    )
    _grow(db, wiki_docs, tmp_path, 3)
    v1 = Database.open(db, version=1)  # a reader holding version 1
    q = v1.keys(np.arange(3))
    before = v1.search_keys(q, 2)
    indexes = sorted(p.name for p in (db / "index").iterdir())
    assert indexes == [f"v{v:05d}.faiss" for v in (1, 2, 3, 4)]
    capsys.readouterr()
    # every version was superseded moments ago: inside the default grace period, nothing goes
    assert main(["gc", str(db)]) == 0
    assert "freed 0 bytes" in capsys.readouterr().out
    assert len(list((db / "index").iterdir())) == 4
    sizes = {p.name: p.stat().st_size for p in (db / "index").iterdir()}
    assert main(["gc", str(db), "--grace", "0", "--keep", "2", "--dry-run"]) == 0
    assert "would free" in capsys.readouterr().out and len(list((db / "index").iterdir())) == 4
    assert main(["prune", str(db), "--grace", "0", "--keep", "2"]) == 0
    out = capsys.readouterr().out
    freed = sizes["v00001.faiss"] + sizes["v00002.faiss"]
    assert f"freed {freed} bytes" in out and "kept versions 3, 4" in out
    assert sorted(p.name for p in (db / "index").iterdir()) == ["v00003.faiss", "v00004.faiss"]
    # the current and kept versions open and verify; a removed one is a one-line error
    assert Database.open(db, verify=True).version == 4
    assert Database.open(db, version=3, verify=True).num_documents == 12
    assert main(["info", str(db), "--verify", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 4
    # the reader that opened version 1 before gc still searches it
    after = v1.search_keys(q, 2)
    assert np.array_equal(before[1], after[1])
    from retro_db.manifest import DatabaseError

    with pytest.raises(DatabaseError, match="version 1 was removed by `retro-db gc`"):
        Database.open(db, version=1)


def test_gc_keeps_versions_whose_files_later_versions_share(cli_db, wiki_docs, tmp_path, capsys):
    db = tmp_path / "db"
    shutil.copytree(cli_db, db)
    _grow(db, wiki_docs, tmp_path, 2)  # Flat: every version's index files are in version 3's
    capsys.readouterr()
    assert main(["gc", str(db), "--grace", "0"]) == 0
    assert (
        "freed 0 bytes (0 files of versions none); kept versions 1, 2, 3" in capsys.readouterr().out
    )
    assert Database.open(db, version=1, verify=True).num_documents == 10


def test_gc_removes_an_index_no_version_names(cli_db, tmp_path, capsys):
    db = tmp_path / "db"
    shutil.copytree(cli_db, db)
    stray = db / "index" / "v00002.faiss"  # as an add killed before its manifest leaves it
    stray.write_bytes(b"x" * 10)
    assert main(["gc", str(db)]) == 0
    assert not stray.exists() and (db / "index" / "v00001.faiss").is_file()
    assert Database.open(db, verify=True).version == 1


@pytest.mark.embed
def test_no_progress_silences_loading_weights(corpus, tmp_path, capfd):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    enc = tmp_path / "enc"
    enc.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz"]
    (enc / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    transformers.BertTokenizerFast(vocab_file=str(enc / "vocab.txt")).save_pretrained(str(enc))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    transformers.BertModel(cfg).save_pretrained(str(enc))
    db = tmp_path / "db"
    capfd.readouterr()  # save_pretrained's own bars
    args = ["build", str(corpus[1]), "--out", str(db), "--embedder", str(enc), "--chunk-size", "16"]
    assert main([*args, "--threads", "1", "--no-progress"]) == 0
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "it/s" not in err and "%|" not in err, err
    assert main(["query", str(db), "hello"]) == 0  # the control: without, the bar shows
    assert "Loading weights" in capfd.readouterr().err
    assert main(["query", str(db), "hello", "--no-progress"]) == 0
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "%|" not in err, err


def test_build_with_bm25_keys_then_info_and_neighbours(corpus, tmp_path, capsys):
    out = tmp_path / "bm25db"
    err = _error(
        ["build", str(corpus[0]), "--out", str(out), "--keys", "bm25", "--embedder", "hash:8"],
        capsys,
    )
    assert "--keys bm25: --embedder apply to --keys dense only" in err
    assert not out.exists()  # refused before anything was written
    pytest.importorskip("bm25s")  # the rest builds one (the no-torch session has no bm25s)
    argv = ["build", str(corpus[0]), "--out", str(out), "--keys", "bm25", "--chunk-size", "16"]
    assert main([*argv, "--id-field", "title", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json", "--verify"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["keys"].startswith("bm25 (bm25s") and info["verified"] is True
    nb = tmp_path / "nb"
    assert main(["neighbours", str(out), "--out", str(nb), "-k", "2", "--no-progress"]) == 0
    db = Database.open(out)
    ids = np.load(nb / "neighbour_ids.npy")
    assert ids.shape == (db.num_chunks, 2) and (ids >= 0).all()
    assert (db.doc_ids[ids] != np.load(nb / "doc_ids.npy")[:, None]).all()


def test_info_names_dense_keys(cli_db, capsys):
    capsys.readouterr()
    assert main(["info", str(cli_db), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["keys"] == "dense (hashing-32-v1, d=32)"
