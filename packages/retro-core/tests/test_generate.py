"""Tests of retro_core.generate: KV-cached generation == full recompute, sampling, retrieval calls."""

from itertools import pairwise

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retro_core.config import RetroConfig
from retro_core.generate import generate, sample_next
from retro_core.model import Retro
from retro_core.retrieval import Neighbours, RetrieverMismatchError

V, M, K = 41, 4, 2
R = 2 * M


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FakeRetriever:
    """Deterministic neighbours: a function of the query chunk only; some rows padded or absent."""

    chunk_size = M
    tokenizer_id = "fake-tok"

    def __init__(self, pad_id: int = -1):
        self.pad_id = pad_id
        self.calls: list[np.ndarray] = []

    def retrieve(self, chunks, k, exclude_doc_ids=None):
        chunks = np.asarray(chunks)
        self.calls.append(chunks.copy())
        q = chunks.shape[0]
        s = chunks.sum(axis=1)  # (q,)
        j = np.arange(R)
        tokens = (s[:, None, None] * 7 + np.arange(k)[None, :, None] * 13 + j * 3) % V  # (q, k, r)
        lengths = np.full((q, k), R, dtype=np.int32)
        lengths[:, -1] = s % (R + 1)  # the last row: 0..r real tokens, 0 = no neighbour
        tokens = np.where(j < lengths[..., None], tokens, self.pad_id)  # pad outside |V|
        ids = np.where(lengths > 0, s[:, None] * 10 + np.arange(k), -1).astype(np.int64)
        return Neighbours(tokens=tokens, lengths=lengths, chunk_ids=ids, pad_id=self.pad_id)


def model_for_generation(dtype=torch.float32, **kw) -> Retro:
    torch.manual_seed(11)
    args = dict(
        vocab_size=V,
        d_model=32,
        n_heads=2,
        n_layers=4,
        chunk_size=M,
        num_neighbours=K,
        max_seq_len=64,
        tokenizer_id="fake-tok",
    )
    args.update(kw)
    model = Retro(RetroConfig(**args)).to(dtype)
    with torch.no_grad():  # make retrieval matter for the generated tokens
        for block in model.blocks:
            if block.cca is not None:
                block.cca.attn.out_proj.weight.mul_(30.0)
    return model.eval()


@pytest.mark.parametrize("prompt_len", [1, 3, 4, 5, 9])
def test_cached_greedy_equals_full_recompute(prompt_len):
    model = model_for_generation()
    prompt = [(5 * i + 2) % V for i in range(prompt_len)]
    cached = generate(model, prompt, FakeRetriever(), max_new_tokens=22, use_cache=True)
    full = generate(model, prompt, FakeRetriever(), max_new_tokens=22, use_cache=False)
    assert len(cached) == 22
    assert cached == full
    # Retrieval changed the continuation (so the test exercises the neighbours path).
    assert generate(model, prompt, None, max_new_tokens=22) != cached


def test_cached_equals_full_for_the_baseline_and_retro_off():
    model = model_for_generation()
    baseline = model_for_generation(cca_layers=())
    prompt = [3, 1, 4, 1, 5]
    for mdl, ret in ((model, None), (baseline, None), (baseline, FakeRetriever())):
        a = generate(mdl, prompt, ret, max_new_tokens=15, use_cache=True)
        b = generate(mdl, prompt, ret, max_new_tokens=15, use_cache=False)
        assert a == b


def test_cached_logits_match_full_forward():
    # The cache path reproduces the full forward's logits at every step (not only the argmax).
    model = model_for_generation(dtype=torch.float64)
    x = torch.randint(0, V, (1, 19))
    ret = FakeRetriever(pad_id=0)
    n_chunks = 19 // M
    nb = ret.retrieve(x[0, : n_chunks * M].reshape(n_chunks, M).numpy(), K)
    tokens, lengths = torch.as_tensor(nb.tokens)[None], torch.as_tensor(nb.lengths)[None].long()
    full = model(x, tokens, lengths)
    cache = model.new_cache()
    parts = [model(x[:, :6], tokens, lengths, cache=cache)]  # prefill, then mixed block sizes
    for lo, hi in ((6, 7), (7, 11), (11, 12), (12, 19)):
        parts.append(model(x[:, lo:hi], tokens, lengths, cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-12)


def test_retrieval_once_per_completed_chunk_with_the_right_tokens():
    model = model_for_generation()
    ret = FakeRetriever()
    prompt = [1, 2, 3, 4, 5, 6]
    out = generate(model, prompt, ret, max_new_tokens=11)
    seq = prompt + out  # 17 tokens: chunks 0..3 complete; the last token is never fed back
    queried = np.concatenate(ret.calls)
    expected = np.array(seq[: 4 * M]).reshape(4, M)
    np.testing.assert_array_equal(queried, expected)
    assert [c.shape[0] for c in ret.calls] == [1, 1, 1, 1]  # prefill: chunk 0; then one per chunk


def test_sampling_is_seeded_and_cache_independent():
    model = model_for_generation(dtype=torch.float64)
    prompt = [7, 8, 9]
    kw = dict(max_new_tokens=20, temperature=1.3, top_k=10, top_p=0.9)
    a = generate(model, prompt, FakeRetriever(), generator=torch.Generator().manual_seed(3), **kw)
    b = generate(model, prompt, FakeRetriever(), generator=torch.Generator().manual_seed(3), **kw)
    c = generate(
        model,
        prompt,
        FakeRetriever(),
        generator=torch.Generator().manual_seed(3),
        use_cache=False,
        **kw,
    )
    d = generate(model, prompt, FakeRetriever(), generator=torch.Generator().manual_seed(4), **kw)
    assert a == b == c
    assert a != d


def test_sample_next_filters():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9, -1.0])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits) == 1
    assert {sample_next(logits, temperature=1.0, top_k=1, generator=g) for _ in range(20)} == {1}
    assert {sample_next(logits, temperature=5.0, top_k=2, generator=g) for _ in range(200)} == {
        1,
        3,
    }
    # top_p: p(1) ~ 0.47, p(3) ~ 0.43: a nucleus of 0.5 needs both, of 0.4 only the first.
    assert {sample_next(logits, temperature=1.0, top_p=0.5, generator=g) for _ in range(200)} == {
        1,
        3,
    }
    assert {sample_next(logits, temperature=1.0, top_p=0.4, generator=g) for _ in range(50)} == {1}
    seen = {sample_next(logits, temperature=1.0, generator=g) for _ in range(2000)}
    assert seen == {0, 1, 2, 3, 4}


def test_eos_stops_generation():
    model = model_for_generation()
    full = generate(model, [1, 2, 3], FakeRetriever(), max_new_tokens=12)
    eos = full[5]
    first = full.index(eos)
    for use_cache in (True, False):
        out = generate(
            model, [1, 2, 3], FakeRetriever(), max_new_tokens=12, eos_id=eos, use_cache=use_cache
        )
        assert out == full[: first + 1]


def test_bad_arguments():
    model = model_for_generation()
    with pytest.raises(RetrieverMismatchError, match="chunk_size"):
        bad = FakeRetriever()
        bad.chunk_size = 8
        generate(model, [1], bad, max_new_tokens=4)
    with pytest.raises(RetrieverMismatchError, match="tokenizer"):
        bad = FakeRetriever()
        bad.tokenizer_id = "other"
        generate(model, [1], bad, max_new_tokens=4)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [1] * 10, None, max_new_tokens=60)
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(model, [], None)
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(model, [V], None)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [1], None, 4, temperature=1.0, top_p=0.0)
    assert generate(model, torch.tensor([1, 2]), None, max_new_tokens=0) == []


_F64 = model_for_generation(dtype=torch.float64)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 23), data=st.data())
def test_cache_any_split_equals_full_forward(seed, n, data):
    # Feeding a sequence to the cache in arbitrary blocks gives the full forward's logits.
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (2, n), generator=g)
    n_chunks = -(-n // M)
    nb = torch.randint(0, V, (2, n_chunks, K, R), generator=g)
    lengths = torch.randint(0, R + 1, (2, n_chunks, K), generator=g)
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=5))) if n > 1 else []
    with torch.no_grad():
        full = _F64(x, nb, lengths)
        cache = _F64.new_cache()
        bounds = [0, *cuts, n]
        parts = [_F64(x[:, a:b], nb, lengths, cache=cache) for a, b in pairwise(bounds)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-10)
    assert cache.length == n and cache.num_encoded == n // M
