"""Benchmark readers on the shipped packs and on native-format local files (the ``datasets`` path too)."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from retro_eval.benchmarks import (
    BenchmarkError,
    load_benchmark,
    read_nq_open,
    read_passages,
    read_pile,
    read_squad,
    read_wikitext,
    wikitext_detokenize,
    wikitext_word_count,
)
from retro_eval.packs import PACKS, pack_path

PILE_SUBSETS = {"Wikipedia (en)", "Gutenberg (PG-19)", "US presidential speeches", "DM Mathematics"}


def _raw_lines(split_file):
    with gzip.open(
        pack_path("wikitext-mini") / split_file, "rt", encoding="utf-8", newline=""
    ) as fh:
        return fh.readlines()


# ----------------------------------------------------------------------------- wikitext


@pytest.mark.parametrize(
    "split,fname",
    [("train", "wiki.train.raw.gz"), ("valid", "wiki.valid.raw.gz"), ("test", "wiki.test.raw.gz")],
)
def test_wikitext_pack_articles_are_the_title_lines(split, fname):
    lines = _raw_lines(fname)
    titles = [ln.strip()[2:-2] for ln in lines if re.fullmatch(r" = [^=].* = \n", ln)]
    docs = read_wikitext(pack_path("wikitext-mini"), split, detokenize=False)
    assert [d.meta["title"] for d in docs] == titles
    assert len(docs) >= 10
    # the split is lossless: the pages concatenate back to the file (after its leading blank line)
    assert lines[0] == " \n"
    assert "".join(d.text for d in docs) == "".join(lines[1:])
    for d in docs:
        assert d.text.startswith(f" = {d.meta['title']} = \n")


def test_wikitext_pack_is_in_raw_format():
    lines = _raw_lines("wiki.test.raw.gz")
    assert all(ln.endswith("\n") and ln.startswith(" ") for ln in lines)
    assert all(ln == " \n" or ln.strip() for ln in lines)  # blank lines are one space
    text = "".join(lines)
    assert " = = " in text and " @-@ " in text and " @,@ " in text and " @.@ " in text
    assert " , " in text and " . \n" in text
    # every heading is surrounded by blank lines
    for i, ln in enumerate(lines):
        if ln.startswith(" = "):
            assert lines[i - 1] == " \n" and lines[i + 1] == " \n"


def test_wikitext_word_counts_and_detokeniser_match_lm_eval():
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer

    raw = read_wikitext(pack_path("wikitext-mini"), "test", detokenize=False)
    detok = read_wikitext(pack_path("wikitext-mini"), "test")
    assert [d.doc_id for d in raw] == [d.doc_id for d in detok]
    for r, d in zip(raw, detok, strict=True):
        expected = process_results({"page": r.text}, [0.0])
        assert d.meta["words"] == wikitext_word_count(r.text) == expected["word_perplexity"][1]
        assert d.meta["raw_bytes"] == expected["bits_per_byte"][1]
        assert d.text == wikitext_detokenizer({"page": r.text})
        assert " @-@ " not in d.text


def test_wikitext_detokenize_hand_case():
    # " @-@ " -> "-", " @,@ " -> ",", " , " -> ", ", " 's" -> "'s", "( x )" -> "(x)"
    assert wikitext_detokenize("a @-@ b , c @,@ d") == "a-b, c,d"
    assert wikitext_detokenize("Boulter 's ( film )") == "Boulter's (film)"


def test_wikitext_parquet_export_and_datasets_path_match_raw(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    lines = _raw_lines("wiki.valid.raw.gz")
    # the datasets export: one line per row, blank lines as ""
    rows = ["" if not ln.strip() else ln for ln in lines]
    (tmp_path / "hf").mkdir()
    pfile = tmp_path / "hf" / "validation-00000-of-00001.parquet"
    pq.write_table(pa.table({"text": rows}), pfile)
    ref = read_wikitext(pack_path("wikitext-mini"), "validation")
    via_dir = read_wikitext(tmp_path / "hf", "valid")
    via_file = read_wikitext(pfile)
    via_datasets = load_benchmark(
        "wikitext/wikitext-103-raw-v1",
        "validation",
        data_files={"validation": str(pfile)},
        cache_dir=tmp_path / "c",
    )
    assert via_datasets.kind == "lm" and via_datasets.split == "validation"
    for docs in (via_dir, via_file, via_datasets.documents):
        assert [(d.doc_id, d.text, d.meta) for d in docs] == [
            (d.doc_id, d.text, d.meta) for d in ref
        ]


def test_wikitext_missing_split_and_empty_file(tmp_path):
    (tmp_path / "wiki.test.raw").write_text(" \n = A = \n \n x . \n", encoding="utf-8")
    assert len(read_wikitext(tmp_path, "test")) == 1
    with pytest.raises(BenchmarkError, match=r"validation.*wiki\.valid\.raw") as err:
        load_benchmark(str(tmp_path), "validation")
    assert "\n" not in str(err.value)
    empty = tmp_path / "e"
    empty.mkdir()
    (empty / "wiki.test.raw").write_text(" \n \n", encoding="utf-8")
    with pytest.raises(BenchmarkError, match="empty Wikitext"):
        read_wikitext(empty, "test")
    with pytest.raises(BenchmarkError, match="unknown split 'dev2'"):
        read_wikitext(tmp_path, "dev2")


# ----------------------------------------------------------------------------- pile


def test_pile_pack_subsets_and_record_counts():
    import zstandard

    total = 0
    for split, fname in (
        ("train", "train.jsonl.zst"),
        ("val", "val.jsonl.zst"),
        ("test", "test.jsonl.zst"),
    ):
        raw = (
            zstandard.ZstdDecompressor()
            .decompress((pack_path("pile-mini") / fname).read_bytes())
            .decode()
        )
        records = [json.loads(line) for line in raw.splitlines()]
        bench = load_benchmark("pile-mini", split)
        assert bench.kind == "lm"
        assert [d.text for d in bench.documents] == [r["text"] for r in records]
        groups = bench.by_subset()
        assert set(groups) == PILE_SUBSETS  # every subset is in every split
        assert all(d.text.strip() for d in bench.documents)
        total += len(bench)
    assert total >= 150
    # nothing crosses splits
    ids = [
        {d.text for d in load_benchmark("pile-mini", s).documents}
        for s in ("train", "validation", "test")
    ]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])


def test_pile_release_layout_plain_jsonl_and_subset_filter(tmp_path):
    recs = [
        {"text": "alpha", "meta": {"pile_set_name": "ArXiv"}},
        {"text": "beta", "meta": {"pile_set_name": "Enron Emails"}},
        {"text": "gamma", "meta": {"pile_set_name": "ArXiv"}},
    ]
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "00.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:2]))
    (tmp_path / "train" / "01.jsonl").write_text(json.dumps(recs[2]) + "\n")
    docs = read_pile(tmp_path, "train")
    assert [d.text for d in docs] == ["alpha", "beta", "gamma"]
    assert [d.text for d in read_pile(tmp_path, "train", subsets=["ArXiv"])] == ["alpha", "gamma"]
    with pytest.raises(BenchmarkError, match="no Pile split 'test'"):
        read_pile(tmp_path, "test")
    with pytest.raises(BenchmarkError, match="empty Pile"):
        read_pile(tmp_path, "train", subsets=["Nope"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(BenchmarkError, match=r"bad\.jsonl:1: expected 'meta'"):
        read_pile(bad)
    # load_benchmark reads a {"text"} JSONL without Pile meta as the user's own text.
    own = load_benchmark(str(bad))
    assert own.kind == "lm" and [d.text for d in own.documents] == ["x"]


def test_pile_datasets_path_reads_same_schema(tmp_path):
    src = pack_path("pile-mini") / "test.jsonl.zst"
    ref = load_benchmark("pile-mini", "test")
    via = load_benchmark("pile", "test", data_files={"test": str(src)}, cache_dir=tmp_path / "c")
    assert [d.text for d in via.documents] == [d.text for d in ref.documents]
    assert [d.meta["pile_set_name"] for d in via.documents] == [
        d.meta["pile_set_name"] for d in ref.documents
    ]


# ----------------------------------------------------------------------------- QA


def test_squad_open_pack_formats_agree():
    bench = load_benchmark("squad-open-mini")
    assert bench.kind == "qa" and bench.split == "validation"
    assert len(bench.examples) == 10565
    nested = read_squad(pack_path("squad-open-mini") / "dev-v1.1.json.gz")
    by_id = {e.id: e for e in nested}
    for e in bench.examples:
        n = by_id[e.id]
        assert (n.question, n.answers) == (e.question, e.answers)
        for text, start in zip(n.answers, n.meta["answer_starts"], strict=True):
            assert n.meta["context"][start : start + len(text)] == text
    corpus = bench.corpus
    assert corpus is not None and len(corpus) == 2067
    passages = {d.doc_id: d.text for d in corpus}
    # every question's paragraph is in the corpus and holds its answers
    for e in bench.examples[:500]:
        assert all(a in passages[e.meta["passage_id"]] for a in e.answers)
    assert (
        read_passages(pack_path("squad-open-mini") / "passages.jsonl.gz")[0].doc_id
        == corpus[0].doc_id
    )
    with pytest.raises(BenchmarkError, match="no QA split 'test'"):
        load_benchmark("squad-open-mini", "test")


def test_qa_datasets_schemas(tmp_path):
    nested = read_squad(pack_path("squad-open-mini") / "dev-v1.1.json.gz")[:50]
    # rajpurkar/squad rows: one per question, answers as {text: [..], answer_start: [..]}
    rows = [
        {
            "id": e.id,
            "title": e.meta["title"],
            "context": e.meta["context"],
            "question": e.question,
            "answers": {"text": e.answers, "answer_start": e.meta["answer_starts"]},
        }
        for e in nested
    ]
    f = tmp_path / "squad.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    via = load_benchmark(
        "squad", "validation", data_files={"validation": str(f)}, cache_dir=tmp_path / "c"
    )
    assert [(e.id, e.question, e.answers, e.meta) for e in via.examples] == [
        (e.id, e.question, e.answers, e.meta) for e in nested
    ]
    # google-research-datasets/nq_open rows: {question, answer: [..]}
    nq = tmp_path / "nq.jsonl"
    nq.write_text(
        "".join(json.dumps({"question": e.question, "answer": e.answers}) + "\n" for e in nested)
    )
    via_nq = load_benchmark("nq_open", data_files=str(nq), cache_dir=tmp_path / "c")
    assert [(e.question, e.answers) for e in via_nq.examples] == [
        (e.question, e.answers) for e in nested
    ]
    assert [(e.question, e.answers) for e in read_nq_open(nq)] == [
        (e.question, e.answers) for e in nested
    ]


def test_qa_bad_inputs(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"question": "who?", "answer": []}\n')
    with pytest.raises(BenchmarkError, match=r"x\.jsonl:1: expected 'answer'"):
        read_nq_open(f)
    j = tmp_path / "dev-v1.1.json"
    j.write_text('{"data": [{"title": "t", "paragraphs": [{"context": "c"}]}]}')
    with pytest.raises(BenchmarkError, match=r"paragraphs\[0\] needs 'context' and 'qas'"):
        read_squad(j)
    e = tmp_path / "empty.json"
    e.write_text('{"data": []}')
    with pytest.raises(BenchmarkError, match="empty QA"):
        load_benchmark(str(e))


# ----------------------------------------------------------------------------- load_benchmark


def test_unknown_names_and_offline_hub(tmp_path):
    with pytest.raises(BenchmarkError, match="not a pack, an existing path or a known benchmark"):
        load_benchmark("no-such-benchmark")
    with pytest.raises(ValueError, match="unknown pack"):
        pack_path("nope")
    assert set(PACKS) == {"wikitext-mini", "pile-mini", "squad-open-mini"}
    with pytest.raises(BenchmarkError, match="no split 'test' on the hub"):
        load_benchmark("nq_open", "test")
    with pytest.raises(BenchmarkError, match="no hub copy"):
        load_benchmark("pile", "test")
    # tests run offline (conftest): the hub path fails with one line naming the benchmark
    with pytest.raises(BenchmarkError, match=r"^wikitext-103: cannot load split 'test'") as err:
        load_benchmark("wikitext-103", "test", cache_dir=tmp_path)
    assert "\n" not in str(err.value)
