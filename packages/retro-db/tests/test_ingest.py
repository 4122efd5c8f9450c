"""Streaming readers on packs made from real text (tests/data), and their bad-record handling."""

from __future__ import annotations

import json
import logging

import pytest
import zstandard

from retro_db.ingest import (
    IngestError,
    IngestStats,
    read_documents,
    read_jsonl,
    read_parquet,
    read_pile,
    read_text,
    read_wikitext103,
)


@pytest.fixture(scope="module")
def articles(load_records):
    return load_records("wikipedia", 5, max_chars=800)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_jsonl_reads_every_record_with_text_field_and_ids(tmp_path, articles):
    recs = [{"title": a["title"], "body": {"text": a["text"]}} for a in articles]
    p = tmp_path / "a.jsonl"
    _write_jsonl(p, recs)
    docs = list(read_jsonl(p, "body.text", id_field="title", meta_fields=("title",)))
    assert [d.text for d in docs] == [a["text"] for a in articles]
    assert [d.doc_id for d in docs] == [a["title"] for a in articles]
    assert docs[0].meta == {"title": articles[0]["title"]}
    # default ids: file name and line
    assert next(read_jsonl(p, "body.text")).doc_id == "a.jsonl:1"


def _bad_jsonl(path, articles):
    good = json.dumps({"text": articles[0]["text"]}).encode()
    lines = [
        good,
        b'{"text": "caf\xff"}',  # 2: invalid UTF-8
        json.dumps({"other": "x"}).encode(),  # 3: missing field
        json.dumps({"text": "   "}).encode(),  # 4: empty text
        b"{not json",  # 5: invalid JSON
        json.dumps({"text": articles[1]["text"]}).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_bad_records_are_counted_skipped_and_named(tmp_path, articles, caplog):
    p = tmp_path / "bad.jsonl"
    _bad_jsonl(p, articles)
    stats = IngestStats()
    with caplog.at_level(logging.WARNING, logger="retro_db.ingest"):
        docs = list(read_jsonl(p, stats=stats))
    # the invalid byte is replaced and counted; the document stays
    assert [d.text for d in docs] == [articles[0]["text"], "caf\ufffd", articles[1]["text"]]
    assert stats.documents == 3 and stats.skipped == 3
    assert stats.replaced == {f"{p}:2": 1}
    text = caplog.text
    for line, what in [
        (2, "invalid UTF-8 sequences replaced"),
        (3, "missing field 'text' (the record has: other)"),
        (4, "empty text"),
        (5, "invalid JSON"),
    ]:
        assert f"bad.jsonl:{line}" in text and what in text


@pytest.mark.parametrize("line,what", [(2, "invalid UTF-8")])
def test_strict_raises_on_first_bad_record(tmp_path, articles, line, what):
    p = tmp_path / "bad.jsonl"
    _bad_jsonl(p, articles)
    with pytest.raises(IngestError, match=f"bad.jsonl:{line}: {what}"):
        list(read_jsonl(p, strict=True))


def test_text_file_and_folder(tmp_path, articles):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text(articles[1]["text"], encoding="utf-8")
    (folder / "sub" / "a.txt").write_text(articles[0]["text"], encoding="utf-8")
    (folder / "empty.txt").write_text("\n", encoding="utf-8")
    (folder / "bad.txt").write_bytes(b"line one\nline \xfe two\n")
    (folder / ".hidden.txt").write_text("not read", encoding="utf-8")
    (folder / "skip.md").write_text("not read", encoding="utf-8")
    stats = IngestStats()
    docs = list(read_text(folder, stats=stats))
    assert [d.doc_id for d in docs] == ["b.txt", "bad.txt", "sub/a.txt"]
    assert docs[2].text == articles[0]["text"]
    assert docs[1].text == "line one\nline \ufffd two\n"  # one bad byte: the document stays
    assert stats.skipped == 1 and stats.replaced == {str(folder / "bad.txt"): 1}
    with pytest.raises(IngestError, match=r"bad\.txt:2: invalid UTF-8"):
        list(read_text(folder, strict=True))
    single = list(read_text(folder / "b.txt"))
    assert single[0].text == articles[1]["text"]


def _wikitext(articles) -> str:
    """Wikitext-103 raw layout: ' = Title = ' articles with ' = = Sub = = ' sections."""
    out = [" \n"]
    for a in articles:
        paras = [p for p in a["text"].split("\n") if p.strip()]
        out += [f" = {a['title']} = \n", " \n", f" {paras[0]} \n", " \n"]
        out += [" = = Section = = \n", " \n"] + [f" {p} \n" for p in paras[1:]] + [" \n"]
    return "".join(out)


def test_wikitext103_splits_at_top_level_headings_only(tmp_path, articles):
    p = tmp_path / "wiki.test.raw"
    raw = _wikitext(articles)
    p.write_text(raw, encoding="utf-8")
    docs = list(read_wikitext103(p))
    assert [d.doc_id for d in docs] == [a["title"] for a in articles]
    assert all(" = = Section = = " in d.text for d in docs)
    # nothing lost: the articles concatenate back to the file (after the leading blank line)
    assert "".join(d.text for d in docs) == raw[len(" \n") :]
    assert docs[0].text.startswith(f" = {articles[0]['title']} = \n")
    assert [d.doc_id for d in read_documents(p)] == [a["title"] for a in articles]


def test_pile_jsonl_and_zst(tmp_path, articles):
    recs = [
        {"text": a["text"], "meta": {"pile_set_name": "Wikipedia (en)" if i % 2 else "Pile-CC"}}
        for i, a in enumerate(articles)
    ]
    plain = tmp_path / "00.jsonl"
    _write_jsonl(plain, recs)
    zst = tmp_path / "00.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    for p in (plain, zst):
        docs = list(read_pile(p))
        assert [d.text for d in docs] == [r["text"] for r in recs]
        assert [d.meta["pile_set_name"] for d in docs] == [r["meta"]["pile_set_name"] for r in recs]
    assert len(list(read_documents(zst))) == len(recs)  # auto-detected as the Pile


def test_pile_zst_bad_record_named(tmp_path, articles):
    raw = json.dumps({"text": articles[0]["text"], "meta": {}}).encode() + b'\n{"meta": {}}\n'
    p = tmp_path / "x.jsonl.zst"
    p.write_bytes(zstandard.ZstdCompressor().compress(raw))
    with pytest.raises(IngestError, match=r"x\.jsonl\.zst:2: missing field 'text'"):
        list(read_pile(p, strict=True))


def test_parquet_as_exported_by_datasets(tmp_path, articles):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [a["text"] for a in articles] + ["", None]
    table = pa.table({"text": texts, "title": [a["title"] for a in articles] + ["e", "n"]})
    p = tmp_path / "train.parquet"
    pq.write_table(table, p, row_group_size=2)  # several row groups, as datasets writes them
    stats = IngestStats()
    docs = list(read_parquet(p, id_field="title", stats=stats))
    assert [d.text for d in docs] == [a["text"] for a in articles]
    assert [d.doc_id for d in docs] == [a["title"] for a in articles]
    assert stats.skipped == 2
    with pytest.raises(IngestError, match=r"train\.parquet:6: empty text"):
        list(read_parquet(p, strict=True))


def test_parquet_written_by_datasets_itself(tmp_path, articles):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"text": a["text"], "title": a["title"]} for a in articles])
    p = tmp_path / "ds.parquet"
    ds.to_parquet(str(p))
    assert [d.text for d in read_documents(p)] == [a["text"] for a in articles]
