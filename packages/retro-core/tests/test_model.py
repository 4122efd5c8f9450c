"""Tests of retro_core.model: causality, the CCA shift, padding, RETRO[OFF], golden logits, learning."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retro_core.config import RetroConfig
from retro_core.interface import KVCache, RetrievalLM
from retro_core.model import Retro

V, M, K = 37, 4, 2  # vocabulary, chunk size m, neighbours k
R = 2 * M


@pytest.fixture(autouse=True)
def _one_thread():
    # The test machine is shared: one thread is much faster than two contended ones.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**kw) -> RetroConfig:
    base = dict(
        vocab_size=V,
        d_model=32,
        n_heads=2,
        n_layers=4,
        chunk_size=M,
        num_neighbours=K,
        max_seq_len=64,
    )
    base.update(kw)
    return RetroConfig(**base)


def tiny_model(seed: int = 0, dtype=torch.float64, **kw) -> Retro:
    torch.manual_seed(seed)
    return Retro(tiny_config(**kw)).to(dtype).eval()


def test_forward_shapes_any_length_and_k():
    model = tiny_model(dtype=torch.float32)
    for n in (1, 3, 4, 5, 8, 15):
        n_chunks = math.ceil(n / M)
        for k in (1, 2, 3):
            x = torch.randint(0, V, (2, n))
            nb = torch.randint(0, V, (2, n_chunks, k, R))
            out = model(x, nb)
            assert out.shape == (2, n, V)
            assert torch.isfinite(out).all()
    assert model(torch.randint(0, V, (1, 7))).shape == (1, 7, V)


def test_logits_to_keep_selects_positions_of_the_full_logits():
    # Independent truth: the full (B, n, |V|) logits, sliced afterwards.
    model = tiny_model()
    x, nb, _ = _random_inputs(3, 11)
    full = model(x, nb)
    torch.testing.assert_close(model(x, nb, logits_to_keep=0), full, rtol=0, atol=0)
    torch.testing.assert_close(model(x, nb, logits_to_keep=4), full[:, -4:], rtol=0, atol=1e-12)
    idx = torch.tensor([0, 5, 6, 10])
    torch.testing.assert_close(model(x, nb, logits_to_keep=idx), full[:, idx], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(x, logits_to_keep=-1)
    with pytest.raises(ValueError, match="1-D"):
        model(x, logits_to_keep=torch.zeros(2, 2, dtype=torch.long))


def test_bad_inputs_raise_clear_errors():
    model = tiny_model(dtype=torch.float32)
    x = torch.randint(0, V, (2, 9))
    with pytest.raises(ValueError, match="neighbours"):
        model(x, torch.randint(0, V, (2, 1, K, R)))  # 2 complete chunks need l >= 2
    with pytest.raises(ValueError, match="neighbour_lengths"):
        model(x, torch.randint(0, V, (2, 3, K, R)), torch.zeros(2, 3, K + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.randint(0, V, (1, 65)))
    with pytest.raises(ValueError, match="tokens"):
        model(torch.rand(2, 9))


# ---------------------------------------------------------------------------------------------
# Causality and the CCA shift (property tests, float64 so that "unchanged" can be exact)

_MODEL = tiny_model(seed=3)  # float64, 4 layers, CCA at (1, 4)
with torch.no_grad():  # make retrieval's effect large enough to see clearly (init is GPT-2 small)
    for block in _MODEL.blocks:
        if block.cca is not None:
            block.cca.attn.out_proj.weight.mul_(20.0)


def _random_inputs(seed: int, n: int, k: int = K):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (1, n), generator=g)
    nb = torch.randint(0, V, (1, math.ceil(n / M), k, R), generator=g)
    return x, nb, g


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 20), data=st.data())
def test_logits_do_not_depend_on_future_tokens(seed, n, data):
    x, nb, g = _random_inputs(seed, n)
    t = data.draw(st.integers(0, n - 1))
    x2 = x.clone()
    x2[:, t + 1 :] = torch.randint(0, V, (1, n - t - 1), generator=g)
    with torch.no_grad():
        a, b = _MODEL(x, nb), _MODEL(x2, nb)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(M, 20), data=st.data())
def test_neighbours_of_chunk_u_reach_only_tokens_from_the_shift_on(seed, n, data):
    x, nb, g = _random_inputs(seed, n)
    u = data.draw(st.integers(0, n // M - 1))  # a complete chunk: (u+1)m-1 < n
    nb2 = nb.clone()
    nb2[:, u] = torch.randint(0, V, nb2[:, u].shape, generator=g)
    with torch.no_grad():
        a, b = _MODEL(x, nb), _MODEL(x, nb2)
    first = (u + 1) * M - 1  # the last token of chunk u is the first to attend its neighbours
    torch.testing.assert_close(a[:, :first], b[:, :first], rtol=0, atol=1e-12)
    assert (a[:, first:] - b[:, first:]).abs().max() > 1e-4
    # ...and the very first attending token already sees them.
    assert (a[:, first] - b[:, first]).abs().max() > 1e-6


def test_first_m_minus_1_tokens_ignore_all_neighbours():
    x, nb, _ = _random_inputs(0, 13)
    with torch.no_grad():
        a = _MODEL(x, nb)
        b = _MODEL(x)
    torch.testing.assert_close(a[:, : M - 1], b[:, : M - 1], rtol=0, atol=0)
    assert (a[:, M - 1 :] - b[:, M - 1 :]).abs().max() > 1e-4


def test_partial_last_chunk_neighbours_are_ignored():
    x, nb, g = _random_inputs(1, 10)  # chunks 0, 1 complete; chunk 2 partial (2 tokens)
    nb2 = nb.clone()
    nb2[:, 2] = torch.randint(0, V, nb2[:, 2].shape, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(_MODEL(x, nb), _MODEL(x, nb2), rtol=0, atol=0)
        torch.testing.assert_close(_MODEL(x, nb), _MODEL(x, nb[:, :2]), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Padding and RETRO[OFF]


def test_padding_tokens_beyond_lengths_do_not_matter():
    x, nb, g = _random_inputs(2, 16, k=3)
    lengths = torch.tensor([[[8, 5, 0], [3, 8, 1], [0, 0, 0], [8, 8, 8]]])
    real = torch.arange(R) < lengths[..., None]
    nb2 = torch.where(real, nb, torch.randint(0, V, nb.shape, generator=g))
    with torch.no_grad():
        torch.testing.assert_close(_MODEL(x, nb, lengths), _MODEL(x, nb2, lengths), rtol=0, atol=0)
        out = _MODEL(x, nb, lengths)
    assert torch.isfinite(out).all()


def test_all_padding_neighbours_equal_no_neighbours():
    model = tiny_model(seed=4, dtype=torch.float32)
    x, nb, _ = _random_inputs(3, 15)
    with torch.no_grad():
        off = model(x)
        padded = model(x, nb, torch.zeros(1, 4, K, dtype=torch.long))
        assert torch.equal(off, padded)
        # One chunk (u = 1) all padding == that chunk without neighbours: the tokens attending
        # chunk 1 (positions 7..10) get exactly the residual stream, however the padding looks.
        lengths = torch.full((1, 4, K), R)
        lengths[:, 1] = 0
        a = model(x, nb, lengths)
        nb2 = nb.clone()
        nb2[:, 1] = model.config.pad_id
        b = model(x, nb2, lengths)
        # Chunks 0 and 1 all padding: everything before the first token attending chunk 2
        # (position 3m-1) is exactly RETRO[OFF].
        lengths[:, 0] = 0
        c = model(x, nb, lengths)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert torch.equal(c[:, : 3 * M - 1], off[:, : 3 * M - 1])
    assert not torch.equal(c, off)


def test_retro_off_equals_the_baseline_with_the_same_weights():
    model = tiny_model(seed=5, dtype=torch.float32, n_layers=6, cca_layers=(2, 4, 6))
    baseline = Retro(model.config.baseline()).eval()
    retro_sd = model.state_dict()
    base_keys = set(baseline.state_dict())
    assert base_keys < set(retro_sd)  # the baseline's parameters are a strict subset
    assert all(retro_sd[k].shape == v.shape for k, v in baseline.state_dict().items())
    baseline.load_state_dict({k: retro_sd[k] for k in base_keys}, strict=True)
    x = torch.randint(0, V, (3, 23))
    with torch.no_grad():
        assert torch.equal(model(x), baseline(x))
    assert model.num_parameters() > baseline.num_parameters()
    assert set(model.retrieval_parameter_names()) == set(dict(model.named_parameters())) - base_keys
    assert baseline.retrieval_parameter_names() == []


def test_retro_is_a_retrieval_lm():
    model = tiny_model()
    assert isinstance(model, RetrievalLM)
    assert model.geometry == (M, K, R)
    assert isinstance(model.new_cache(), KVCache)


def test_baseline_ignores_neighbours():
    baseline = tiny_model(seed=6, dtype=torch.float32, cca_layers=())
    assert baseline.encoder is None
    x, nb, _ = _random_inputs(4, 9)
    with torch.no_grad():
        assert torch.equal(baseline(x), baseline(x, nb))


# ---------------------------------------------------------------------------------------------
# Golden logits


def test_golden_logits():
    # GOLDEN: produced once by this very code (torch 2.13.0 CPU) and frozen, so that any change of
    # the architecture, initialisation order or numerics shows up. Regenerate deliberately only.
    torch.manual_seed(1234)
    model = Retro(tiny_config()).eval()  # float32, CCA at (1, 4)
    x = torch.tensor([[4, 11, 18, 22, 6, 20, 34, 17, 9, 13]])
    nb = torch.tensor(
        [
            [
                [[3, 19, 16, 31, 24, 30, 3, 7], [35, 20, 15, 29, 34, 28, 27, 11]],
                [[11, 15, 15, 32, 34, 23, 14, 30], [1, 28, 9, 24, 6, 18, 23, 16]],
                [[2, 15, 19, 19, 13, 22, 34, 6], [29, 3, 32, 34, 34, 20, 8, 12]],
            ]
        ]
    )
    lengths = torch.tensor([[[8, 5], [0, 8], [3, 0]]])
    with torch.no_grad():
        y = model(x, nb, lengths)[0]
        y_off = model(x)[0]
    expected = torch.tensor(
        [
            [-0.2681220, -0.0178045, -0.1611620, -0.1453789],  # t = 0
            [0.0464099, -0.0753388, 0.0303681, -0.1125235],  # t = 3
            [-0.0286318, 0.0006161, -0.1189368, 0.1024907],  # t = 4
            [-0.1306450, 0.1635067, 0.0425471, -0.1059096],  # t = 9
        ]
    )
    torch.testing.assert_close(y[[0, 3, 4, 9]][:, [0, 1, 2, 36]], expected, rtol=0, atol=1e-5)
    expected_off = torch.tensor([-0.1082088, 0.1687015, 0.0516147, -0.0999746])  # t = 9, RETRO[OFF]
    torch.testing.assert_close(y_off[9, [0, 1, 2, 36]], expected_off, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Learnability: a synthetic retrieval-copy task


def _copy_task_batch(g: torch.Generator, batch: int, v: int, m: int, n_chunks: int):
    """Random tokens; chunk u's neighbours: one row = a noisy copy of chunk u followed by the true
    chunk u+1 (its continuation), the other row = random tokens, in random order."""
    n = m * n_chunks
    x = torch.randint(1, v, (batch, n + m), generator=g)  # one extra chunk continues the last one
    chunks = x.view(batch, n_chunks + 1, m)
    noisy = chunks[:, :n_chunks].clone()
    flip = torch.rand(noisy.shape, generator=g) < 0.25
    noisy[flip] = torch.randint(1, v, (int(flip.sum()),), generator=g)
    true = torch.cat([noisy, chunks[:, 1:]], dim=-1)  # (B, l, r)
    distractor = torch.randint(1, v, true.shape, generator=g)
    swap = torch.rand(batch, n_chunks, 1, generator=g) < 0.5
    nb = torch.stack([torch.where(swap, distractor, true), torch.where(swap, true, distractor)], 2)
    return x[:, :n], nb  # (B, n), (B, l, 2, r)


def _train_copy_task(cca_layers, steps: int) -> float:
    v, m, n_chunks = 32, 4, 6
    torch.manual_seed(0)
    cfg = RetroConfig(
        vocab_size=v,
        d_model=32,
        n_heads=2,
        n_layers=2,
        chunk_size=m,
        num_neighbours=2,
        max_seq_len=m * n_chunks,
        enc_layers=1,
        cca_layers=cca_layers,
    )
    model = Retro(cfg)
    use_nb = cfg.is_retro
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, nb = _copy_task_batch(g, 16, v, m, n_chunks)
        logits = model(x[:, :-1], nb if use_nb else None)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, v), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, nb = _copy_task_batch(torch.Generator().manual_seed(99), 64, v, m, n_chunks)
    with torch.no_grad():
        logits = model(x[:, :-1], nb if use_nb else None)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, v), x[:, 1:].reshape(-1)).item()


@pytest.mark.slow
def test_retro_learns_to_copy_from_neighbours_and_the_baseline_cannot():
    retro = _train_copy_task(None, steps=300)
    base = _train_copy_task((), steps=300)
    assert base > 0.9 * math.log(31)  # random tokens: nothing to learn without retrieval
    assert retro < 0.5 * base, (retro, base)
