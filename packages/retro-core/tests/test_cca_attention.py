"""Tests of ``capture_cca_attention``: CCA's own attention probabilities, recorded beside the forward.

Independent truths: the forward without capture (logits equal bit for bit), the CCA output
rebuilt by hand from the recorded probabilities and the layer's values and output projection
(so the probabilities are the ones the layer used), and the definition of a probability
distribution over the real neighbour tokens.
"""

import math

import pytest
import torch

from retro_core.config import RetroConfig
from retro_core.model import ChunkedCrossAttention, Retro, capture_cca_attention

V, M, K = 37, 4, 2
R = 2 * M


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(seed: int = 0) -> Retro:
    torch.manual_seed(seed)
    cfg = RetroConfig(
        vocab_size=V,
        d_model=32,
        n_heads=2,
        n_layers=4,
        chunk_size=M,
        num_neighbours=K,
        max_seq_len=64,
        cca_layers=(2, 4),
    )
    return Retro(cfg).eval()


def _inputs(seed: int, n: int, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (batch, n), generator=g)
    nb = torch.randint(0, V, (batch, math.ceil(n / M), K, R), generator=g)
    lengths = torch.randint(1, R + 1, (batch, math.ceil(n / M), K), generator=g)
    return x, nb, lengths


def test_capture_leaves_the_logits_bit_for_bit():
    model = _model()
    x, nb, lengths = _inputs(0, 15)
    with torch.no_grad():
        plain = model(x, nb, lengths)
        with capture_cca_attention(model) as records:
            captured = model(x, nb, lengths)
        after = model(x, nb, lengths)
    assert torch.equal(plain, captured) and torch.equal(plain, after)
    assert [r.name for r in records] == ["blocks.1.cca", "blocks.3.cca"]
    # Incremental decoding with a cache: the same logits with and without capture.
    with torch.no_grad():
        outs = []
        for capture in (False, True):
            cache = model.new_cache()
            steps = []
            with capture_cca_attention(model) if capture else _nothing():
                for t in range(x.shape[1]):
                    steps.append(model(x[:, t : t + 1], nb, lengths, cache=cache))
            outs.append(torch.cat(steps, 1))
    assert torch.equal(outs[0], outs[1])


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_probabilities_sum_to_one_over_real_neighbour_tokens():
    model = _model()
    n = 15
    x, nb, lengths = _inputs(1, n)
    with torch.no_grad(), capture_cca_attention(model) as records:
        model(x, nb, lengths)
    for rec in records:
        assert rec.probs.shape == (2, n, 2, K, R)
        assert rec.chunks.tolist() == [-1] * (M - 1) + [(t - (M - 1)) // M for t in range(M - 1, n)]
        sums = rec.probs.sum(dim=(-1, -2))  # (B, T, h)
        attending = rec.chunks >= 0
        torch.testing.assert_close(sums[:, attending], torch.ones_like(sums[:, attending]))
        assert (rec.probs[:, ~attending] == 0).all()
        # padding tokens (beyond each neighbour's length) get no mass
        real = torch.arange(R) < lengths[:, rec.chunks[attending], :, None]  # (B, Ta, K, R)
        pad = (~real)[:, :, None].expand(-1, -1, 2, -1, -1)  # (B, Ta, h, K, R)
        assert (rec.probs[:, attending][pad] == 0).all()
        assert (rec.probs[:, attending][~pad] > 0).all()
        torch.testing.assert_close(rec.head_weights.sum(), torch.tensor(1.0))


def test_probabilities_rebuild_the_cca_output():
    """The recorded probabilities times the layer's own values, through its output projection,
    give the CCA output token by token (also with a start offset, as in cached decoding)."""
    torch.manual_seed(3)
    cfg = RetroConfig(
        vocab_size=V, d_model=16, n_heads=4, n_layers=2, chunk_size=M, num_neighbours=K,
        max_seq_len=64, enc_d_model=8,
    )  # fmt: skip
    model = Retro(cfg).eval()
    cca = model.blocks[1].cca
    assert isinstance(cca, ChunkedCrossAttention)
    B, U = 2, 4
    enc = torch.randn(B, U, K, R, 8)
    mask = torch.arange(R)[None, None, None, :] < torch.randint(1, R + 1, (B, U, K, 1))
    mask[1, 2] = False  # a chunk with no real neighbour token: CCA adds nothing there
    kv = cca.kv(enc, model.rope)
    for start, T in ((0, 13), (5, 7), (9, 1), (0, 2)):
        xq = torch.randn(B, T, 16)
        with torch.no_grad(), capture_cca_attention(cca) as records:
            y = cca(xq, start, mask, kv, model.rope)
        (rec,) = records
        assert rec.start == start and rec.name == ""
        values = kv[1]  # (B, U, h, k·r, hs)
        for b in range(B):
            for i in range(T):
                u = int(rec.chunks[i])
                if u < 0 or not mask[b, u].any():
                    assert (rec.probs[b, i] == 0).all() and (y[b, i] == 0).all()
                    continue
                p = rec.probs[b, i].reshape(4, K * R)  # (h, k·r)
                heads = torch.einsum("hj,hjd->hd", p, values[b, u])  # (h, hs)
                want = cca.attn.out_proj(heads.reshape(-1))
                torch.testing.assert_close(y[b, i], want, rtol=1e-5, atol=1e-5)


def test_replacing_a_neighbour_changes_the_attention():
    model = _model()
    x, nb, lengths = _inputs(2, 12, batch=1)
    with torch.no_grad(), capture_cca_attention(model) as before:
        model(x, nb, lengths)
    nb2 = nb.clone()
    nb2[0, 1, 1] = (nb2[0, 1, 1] + 7) % V  # chunk 1's second neighbour, every token changed
    with torch.no_grad(), capture_cca_attention(model) as after:
        model(x, nb2, lengths)
    for a, b in zip(before, after, strict=True):
        reads_1 = a.chunks == 1
        reads_0 = a.chunks == 0
        mass_a = a.probs[0, reads_1].sum(dim=-1)  # (tokens, h, K) mass per neighbour
        mass_b = b.probs[0, reads_1].sum(dim=-1)
        assert (mass_a - mass_b).abs().max() > 1e-3
        # the tokens reading chunk 0's (unchanged) neighbours are not affected by chunk 1's
        torch.testing.assert_close(a.probs[0, reads_0], b.probs[0, reads_0], rtol=0, atol=0)


def test_retrofit_base_attention_cca_with_sink(tmp_path):
    """A retro-fit's BaseAttentionCCA: probabilities + the sink's mass make 1, and the gated
    head-weighted probabilities rebuild its output; logits equal with and without capture."""
    transformers = pytest.importorskip("transformers")
    from retro_core.retrofit import retrofit

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    base = tmp_path / "llama"
    transformers.LlamaForCausalLM(hf_cfg).eval().save_pretrained(str(base))
    model = retrofit(base, cca_layers=(2,), chunk_size=M, k=K, cca_from_base=True, seed=0)
    with torch.no_grad():
        cca = model.cca_layers["2"]
        cca.gate.copy_(torch.tensor([1.0, 0.0, 0.5, 0.0]))
        cca.sink.fill_(0.5)
    model.eval()
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 61, (1, 11), generator=g)
    nb = torch.randint(0, 61, (1, 3, K, R), generator=g)
    with torch.no_grad():
        plain = model(x, nb)
        with capture_cca_attention(model) as records:
            captured = model(x, nb)
    assert torch.equal(plain, captured)
    (rec,) = records
    assert rec.name == "cca_layers.2"
    torch.testing.assert_close(rec.head_weights, torch.tensor([2 / 3, 0.0, 1 / 3, 0.0]))
    sums = rec.probs.sum(dim=(-1, -2))[0, rec.chunks >= 0]  # (tokens, h)
    assert (sums < 1).all() and (sums > 0).all()  # the rest is on the sink
