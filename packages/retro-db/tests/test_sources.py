"""The one source reader (ingest.read_sources): folders by extension, text fields, the summary.

Fixtures are written inside tmp_path from the committed Wikipedia sample (tests/data); builds use
the hashing embedder, so nothing downloads and nothing needs torch.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from retro_db.cli import main
from retro_db.database import Database
from retro_db.ingest import IngestError, IngestStats, read_sources

BUILD = ["--embedder", "hash:16", "--chunk-size", "16", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def texts(load_records):
    """20 distinct real article texts (cut to 400 characters)."""
    return [r["text"] for r in load_records("wikipedia", 20, max_chars=400)]


def _jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")


def _corpus_folder(root, texts):
    """One file of each supported format, an unsupported one, a hidden one, one with a bad byte.

    Returns the folder and {relative file: documents it holds} (the independent truth).
    """
    d = root / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / ".git").mkdir()
    (d / "a.txt").write_text(texts[0], encoding="utf-8")
    (d / "b.md").write_text("# Title\n\n" + texts[1], encoding="utf-8")
    (d / "c.jsonl").write_bytes(_jsonl([{"text": texts[2]}, {"text": texts[3]}]))
    (d / "d.json").write_text(json.dumps([{"text": texts[4]}, {"text": texts[5]}]), "utf-8")
    (d / "sub" / "e.jsonl.gz").write_bytes(gzip.compress(_jsonl([{"text": texts[6]}])))
    zst = _jsonl([{"text": texts[7], "meta": {"pile_set_name": "Pile-CC"}}, {"text": texts[8]}])
    (d / "sub" / "f.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(zst))
    pq.write_table(pa.table({"text": [texts[9], texts[10]]}), d / "g.parquet")
    (d / "wiki.test.raw").write_text(
        f" \n = One = \n \n {texts[11]} \n = Two = \n \n {texts[12]} \n", encoding="utf-8"
    )
    (d / "h.json.gz").write_bytes(gzip.compress(_jsonl([{"text": texts[13]}])))
    # invalid UTF-8 in the middle of a real text: the document stays, the byte is replaced
    (d / "bad.txt").write_bytes(texts[14][:50].encode() + b"\xff" + texts[14][50:].encode())
    (d / "notes.csv").write_text("text\nnot read\n", encoding="utf-8")  # unsupported
    (d / ".hidden.txt").write_text(texts[15], encoding="utf-8")  # hidden file
    (d / ".git" / "x.txt").write_text(texts[16], encoding="utf-8")  # hidden folder
    counts = {
        "a.txt": 1,
        "b.md": 1,
        "bad.txt": 1,
        "c.jsonl": 2,
        "d.json": 2,
        "g.parquet": 2,
        "h.json.gz": 1,
        "sub/e.jsonl.gz": 1,
        "sub/f.jsonl.zst": 2,
        "wiki.test.raw": 2,
    }
    return d, counts


def test_folder_reads_every_supported_format_and_accounts_for_the_rest(tmp_path, texts):
    d, counts = _corpus_folder(tmp_path, texts)
    stats = IngestStats()
    docs = list(read_sources([d], stats=stats))
    assert len(docs) == stats.documents == sum(counts.values())
    got = {Path(p).relative_to(d).as_posix(): n for p, _, n in stats.files}
    assert got == counts
    assert sorted((str(p), why) for p, why in stats.skipped_files) == sorted(
        [
            (str(d / ".git"), "hidden folder"),
            (str(d / ".hidden.txt"), "hidden file"),
            (str(d / "notes.csv"), "unsupported extension"),
        ]
    )
    assert stats.skipped == 0 and stats.replaced == {str(d / "bad.txt"): 1}
    by_id = {x.doc_id: x for x in docs}
    assert by_id["bad.txt"].text == texts[14][:50] + "\ufffd" + texts[14][50:]
    assert by_id["sub/f.jsonl.zst:1"].meta == {"pile_set_name": "Pile-CC"}
    assert by_id["d.json:2"].text == texts[5]
    assert by_id["One"].text.startswith(" = One = ")
    # every text of the folder's readable files is there once, nothing of the skipped ones
    joined = "\n".join(x.text for x in docs)
    for i in list(range(0, 14)):
        assert texts[i] in joined, i
    assert texts[15] not in joined and texts[16] not in joined
    summary = stats.summary()
    assert summary.startswith(f"{sum(counts.values())} documents read from 10 files")
    assert "3 files skipped (1 hidden file, 1 hidden folder, 1 unsupported extension)" in summary
    assert "invalid UTF-8 replaced in 1 documents (1 sequences)" in summary
    assert len(stats.details()) == 10 + 3 + 1


def test_folder_build_accounts_for_every_document(tmp_path, texts, capsys):
    d, counts = _corpus_folder(tmp_path, texts)
    out = tmp_path / "db"
    assert main(["build", str(d), "--out", str(out), "-v", *BUILD]) == 0
    printed = capsys.readouterr().out
    n = sum(counts.values())
    assert f"read: {n} documents read from 10 files, 3 files skipped" in printed
    for name in counts:  # -v lists every file
        assert f"read {d / name} (" in printed
    assert f"skipped {d / 'notes.csv'}: unsupported extension" in printed
    db = Database.open(out, verify=True)
    assert db.num_documents == n
    ids = {r["doc_id"] for r in db.document_records()}
    assert {
        "a.txt",
        "b.md",
        "bad.txt",
        "c.jsonl:2",
        "sub/e.jsonl.gz:1",
        "g.parquet:2",
        "Two",
    } <= ids


def test_strict_refuses_the_bad_byte(tmp_path, texts, capsys):
    d, _ = _corpus_folder(tmp_path, texts)
    assert main(["build", str(d), "--out", str(tmp_path / "db"), "--strict", *BUILD]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.txt:1: invalid UTF-8 at byte 50" in err


def test_paragraphs_list_builds_with_text_field(tmp_path, texts, capsys):
    recs = [{"title": f"T{i}", "paragraphs": [texts[i][:200], texts[i][200:]]} for i in range(0, 6)]
    p = tmp_path / "articles.jsonl"
    p.write_bytes(_jsonl(recs))
    out = tmp_path / "db"
    argv = ["build", str(p), "--out", str(out), "--text-field", "paragraphs", "--id-field", "title"]
    assert main([*argv, *BUILD]) == 0
    db = Database.open(out)
    assert db.num_documents == 6
    docs = list(read_sources(p, text_field="paragraphs", id_field="title"))
    assert [x.text for x in docs] == [texts[i][:200] + "\n\n" + texts[i][200:] for i in range(6)]
    assert db.document_index("T3") == 3


def test_default_text_field_on_paragraph_records_names_the_fields(tmp_path, texts, capsys):
    p = tmp_path / "articles.jsonl"
    p.write_bytes(_jsonl([{"title": "T", "paragraphs": [texts[0]]}] * 3))
    assert main(["build", str(p), "--out", str(tmp_path / "db"), *BUILD]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "no documents with text" in err and "missing field 'text': 3" in err
    with pytest.raises(
        IngestError, match=r"missing field 'text' \(the record has: title, paragraphs\)"
    ):
        list(read_sources(p, strict=True))


@pytest.mark.parametrize(
    "record,message",
    [
        ({"body": {"x": 1}}, r"missing field 'body\.text' \(the record has: body\.x\)"),
        (
            {"body": {"text": 3}},
            r"field 'body\.text': expected a string or a list of strings, got int",
        ),
        ({"body": {"text": ["a", 2]}}, r"got a list of int/str \(the record has: body\.text\)"),
    ],
)
def test_wrong_text_field_lists_the_fields_the_record_has(tmp_path, record, message):
    p = tmp_path / "x.jsonl"
    p.write_bytes(_jsonl([record]))
    with pytest.raises(IngestError, match=message):
        list(read_sources(p, text_field="body.text", strict=True))


def test_dotted_text_field_and_list_in_parquet(tmp_path, texts):
    p = tmp_path / "x.parquet"
    pq.write_table(
        pa.table({"doc": [{"body": texts[0]}, {"body": texts[1]}], "paras": [["a", "b"], ["c"]]}), p
    )
    assert [x.text for x in read_sources(p, text_field="doc.body")] == texts[:2]
    assert [x.text for x in read_sources(p, text_field="paras")] == ["a\n\nb", "c"]


def test_explicit_format_on_a_folder_reads_that_format_only(tmp_path, texts):
    d, _ = _corpus_folder(tmp_path, texts)
    stats = IngestStats()
    docs = list(read_sources(d, "jsonl", stats=stats))
    assert len(docs) == 2 + 2 + 1 + 2 + 1  # c.jsonl, d.json, e.jsonl.gz, f.jsonl.zst, h.json.gz
    assert "not --format jsonl" in {why for _, why in stats.skipped_files}


def test_missing_source_is_refused_before_reading(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope: no such file or folder"):
        read_sources([tmp_path, tmp_path / "nope"])


def test_truncated_compressed_file_in_a_folder_is_still_named(tmp_path, texts):
    d = tmp_path / "c"
    d.mkdir()
    raw = zstandard.ZstdCompressor().compress(_jsonl([{"text": t} for t in texts[:8]]))
    (d / "x.jsonl.zst").write_bytes(raw[: len(raw) // 2])
    stats = IngestStats()
    docs = list(read_sources(d, stats=stats))
    assert stats.truncated == [str(d / "x.jsonl.zst")] and len(docs) < 8
    assert [x.text for x in docs] == texts[: len(docs)]
    assert "1 truncated files" in stats.summary()
    with pytest.raises(IngestError, match="truncated after"):
        list(read_sources(d, strict=True))
