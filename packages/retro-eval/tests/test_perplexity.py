"""Sliding-window scoring: equals an independent hand loop over windows; bpb by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from retro_core.config import RetroConfig
from retro_core.model import Retro
from retro_core.retrieval import RetrieverMismatchError
from retro_eval.perplexity import (
    has_retrieval,
    model_device,
    model_geometry,
    plan_windows,
    score_documents,
    sweep_k,
)
from retro_eval.testing import ByteTokenizer, InMemoryRetriever

torch.set_num_threads(1)

M = 8
N = 32
TEXTS = [
    "The cat sat on the mat and looked at the dog across the room, then slept.",
    "Short doc.",
    "Caf\u00e9 na\u00efve \u2014 unicode bytes split across chunks: \u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9!",
    "x",
    "A" * 40 + " " + "b" * 33,
]
DB_TEXTS = [
    "The dog slept on the mat in the room across the hall.",
    "Unicode caf\u00e9 text and na\u00efve words.",
    "AAAAAAAA bbbbbbbb cccccccc dddddddd eeeeeeee",
]


def tiny_model(cca=None, seed=0) -> Retro:
    torch.manual_seed(seed)
    cfg = RetroConfig(
        vocab_size=258,
        d_model=32,
        n_heads=2,
        n_layers=3,
        chunk_size=M,
        enc_layers=1,
        cca_layers=cca,
        max_seq_len=N,
        tokenizer_id=ByteTokenizer.id,
    )
    return Retro(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


@pytest.fixture(scope="module")
def retriever(tok):
    return InMemoryRetriever([tok.encode(t) for t in DB_TEXTS], chunk_size=M)


def hand_bits(model, tok, text, retriever, k, window, stride):
    """Independent reference: one window at a time, batch 1, retrieval done per window."""
    t = tok.encode(text)
    bits = np.full(len(t), np.nan)
    with torch.no_grad():
        logits = model(torch.tensor([[tok.eos_id]]))
        bits[0] = -torch.log_softmax(logits[0, 0], -1)[t[0]].item() / math.log(2)
        done = 1
        begin = 0
        while done < len(t):
            end = min(begin + window, len(t))
            if end > done:
                w = t[begin:end]
                kwargs = {}
                if retriever is not None:
                    chunks = [w[i : i + M] for i in range(0, len(w), M)]
                    chunks = np.array([c + [0] * (M - len(c)) for c in chunks])
                    nb = retriever.retrieve(chunks, k)
                    kwargs = dict(
                        neighbours=torch.from_numpy(nb.tokens)[None],
                        neighbour_lengths=torch.from_numpy(nb.lengths)[None],
                    )
                lp = torch.log_softmax(model(torch.tensor([w]), **kwargs)[0], -1)
                for j in range(done, end):
                    bits[j] = -lp[j - 1 - begin, t[j]].item() / math.log(2)
                done = end
            begin += stride
    assert not np.isnan(bits).any()
    return bits


def test_plan_windows_scores_each_token_once():
    for T in [1, 2, 7, 8, 31, 32, 33, 64, 100]:
        for n, s in [(32, 16), (32, 8), (32, 31), (16, 8), (5, 3)]:
            seen = np.zeros(T, dtype=int)
            seen[0] = 1
            for w in plan_windows(T, n, s):
                assert w.end - w.begin <= n and w.begin % s == 0
                seen[w.score_from : w.end] += 1
            assert (seen == 1).all(), (T, n, s)


@pytest.mark.parametrize("mode", ["on", "off", "baseline"])
@pytest.mark.parametrize(("window", "stride"), [(None, None), (32, 8), (16, 8), (24, 16)])
def test_scorer_equals_hand_loop(tok, retriever, mode, window, stride):
    torch.set_num_threads(1)
    model = tiny_model(cca=() if mode == "baseline" else None)
    ret = retriever if mode == "on" else None
    res = score_documents(
        model,
        tok,
        TEXTS,
        retriever=ret,
        k=2,
        window=window,
        stride=stride,
        batch_size=3,
        progress=False,
    )
    n = window or N
    s = stride or N // 2
    assert (res.window, res.stride) == (n, s)
    for d, text in enumerate(TEXTS):
        ref = hand_bits(model, tok, text, ret, 2, n, s)
        c = math.ceil(len(ref) / M)
        ref_chunks = np.add.reduceat(ref, np.arange(0, len(ref), M))
        got = res.bits[res.doc_index == d]
        assert len(got) == c
        np.testing.assert_allclose(got, ref_chunks, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(res.doc_bits()[d], ref.sum(), rtol=1e-4)


def test_retrieval_matters_and_is_cached(tok, retriever):
    model = tiny_model()
    on = score_documents(model, tok, TEXTS, retriever=retriever, k=2, progress=False)
    off = score_documents(model, tok, TEXTS, progress=False)
    assert not np.allclose(on.bits, off.bits)
    assert on.neighbour_tokens.shape == (on.num_chunks, 2, 2 * M)
    assert off.neighbour_tokens is None
    # Neighbours stored per chunk are those of the chunk itself (query = the chunk's tokens).
    for i in range(on.num_chunks):
        q = on.chunk_tokens[i : i + 1]
        np.testing.assert_array_equal(retriever.retrieve(q, 2).tokens[0], on.neighbour_tokens[i])


def test_bytes_tokens_and_bpb_by_hand(tok):
    model = tiny_model()
    res = score_documents(model, tok, TEXTS, progress=False)
    for d, text in enumerate(TEXTS):
        ids = tok.encode(text)
        sel = res.doc_index == d
        assert res.tokens[sel].sum() == len(ids)
        exp_bytes = [len(tok.decode(ids[i : i + M]).encode()) for i in range(0, len(ids), M)]
        np.testing.assert_array_equal(res.bytes[sel], exp_bytes)
        np.testing.assert_array_equal(res.chunk_tokens[sel].reshape(-1)[: len(ids)], ids)
    mask = res.tokens == M
    assert res.bpb(mask) == pytest.approx(res.bits[mask].sum() / res.bytes[mask].sum())
    assert math.isnan(res.bpb(np.zeros(res.num_chunks, bool)))
    words = [len(t.split()) for t in TEXTS]
    assert res.word_perplexity(words) == pytest.approx(
        math.exp(res.bits.sum() * math.log(2) / sum(words))
    )


def test_sweep_k_matches_single_runs(tok, retriever):
    model = tiny_model()
    sweep = sweep_k(model, tok, TEXTS, retriever, ks=(1, 3), progress=False)
    for k in (1, 3):
        single = score_documents(model, tok, TEXTS, retriever=retriever, k=k, progress=False)
        np.testing.assert_allclose(sweep[k].bits, single.bits, rtol=1e-5)
        assert sweep[k].k == k


def test_mismatched_retriever_is_refused(tok):
    model = tiny_model()
    bad_m = InMemoryRetriever([tok.encode(DB_TEXTS[0])], chunk_size=M * 2)
    with pytest.raises(RetrieverMismatchError, match="chunk_size"):
        score_documents(model, tok, TEXTS, retriever=bad_m, progress=False)
    bad_tok = InMemoryRetriever([tok.encode(DB_TEXTS[0])], chunk_size=M, tokenizer_id="gpt2-x")
    with pytest.raises(RetrieverMismatchError, match="tokenizer"):
        score_documents(model, tok, TEXTS, retriever=bad_tok, progress=False)


def test_bad_window_and_empty_document(tok):
    model = tiny_model()
    with pytest.raises(ValueError, match="stride"):
        score_documents(model, tok, TEXTS, window=32, stride=12, progress=False)
    with pytest.raises(ValueError, match="stride"):
        score_documents(model, tok, TEXTS, window=16, stride=16, progress=False)
    with pytest.raises(ValueError, match="max_seq_len"):
        score_documents(model, tok, TEXTS, window=64, progress=False)
    with pytest.raises(ValueError, match="document 1"):
        score_documents(model, tok, ["ok", ""], progress=False)


class _FullLogitsOnly(torch.nn.Module):
    """A model whose forward has no ``logits_to_keep``: the scorer must read all positions."""

    def __init__(self, model: Retro):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, tokens, neighbours=None, neighbour_lengths=None):
        return self.model(tokens, neighbours, neighbour_lengths)


def test_models_without_logits_to_keep_score_the_same(tok, retriever):
    model = tiny_model()
    kw = dict(retriever=retriever, k=2, window=24, stride=8, batch_size=3, progress=False)
    fast = score_documents(model, tok, TEXTS, **kw)
    full = score_documents(_FullLogitsOnly(model), tok, TEXTS, **kw)
    np.testing.assert_allclose(fast.bits, full.bits, rtol=1e-5, atol=1e-5)


def test_model_geometry_and_has_retrieval():
    from types import SimpleNamespace

    assert model_geometry(tiny_model()) == (N, M, 2 * M, 0)
    assert model_device(tiny_model()) == torch.device("cpu")
    assert has_retrieval(tiny_model())
    assert not has_retrieval(tiny_model(cca=()))  # the decoder-only baseline
    # A config without cca_layers (a plain LM) does not read neighbours (issue 15).
    assert not has_retrieval(SimpleNamespace(config=SimpleNamespace(chunk_size=M)))
