"""Tests of retro_core.induction and ``retrofit(..., cca_from_base=True)`` on tiny random Llamas.

Independent truths: the unmodified Hugging Face model (its hidden states, its logits), and a
reference attention computed with transformers' own rotary embedding and key/value repetition.
"""

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import (  # noqa: E402
    apply_rotary_pos_emb,
    repeat_kv,
)

from retro_core.induction import induction_heads, induction_scores  # noqa: E402
from retro_core.retrofit import (  # noqa: E402
    RetrofitError,
    load_retrofitted,
    retrofit,
    save_retrofitted,
)

V, M, K = 61, 4, 2
R = 2 * M
P = (2, 4)  # CCA after layers 2 and 4: copies of layers 3 and 5


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _llama(n_layers: int = 5, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg).eval().to(dtype)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("llama") / "tiny-llama"
    _llama().save_pretrained(str(d))
    return d


def _model(base, heads=((0, 1), (2,)), seed=0):
    model = retrofit(base, cca_layers=P, chunk_size=M, k=K, cca_from_base=True, seed=seed)
    # the tiny random model has no induction heads: open the chosen gates by hand
    with torch.no_grad():
        for cca, hh in zip(model.cca_layers.values(), heads, strict=True):
            cca.gate.zero_()
            cca.gate[list(hh)] = 1.0
            cca.sink.fill_(0.5)
            cca.null_key.copy_(
                torch.randn(cca.null_key.shape, generator=torch.Generator().manual_seed(7))
            )
    return model.eval()


def _inputs(seed: int, n: int, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (batch, n), generator=g)
    nb = torch.randint(0, V, (batch, math.ceil(n / M), K, R), generator=g)
    lengths = torch.randint(0, R + 1, (batch, math.ceil(n / M), K), generator=g)
    return x, nb, lengths, g


def test_encoded_neighbours_are_the_base_models_own_hidden_states(base_dir):
    model = _model(base_dir)
    _, nb, _, _ = _inputs(0, 3 * M, batch=2)
    enc, mask = model.encode_neighbours(nb)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
    with torch.no_grad():
        hs = hf(nb.reshape(-1, R), output_hidden_states=True).hidden_states
    for p in P:
        torch.testing.assert_close(enc[p].reshape(-1, R, 32), hs[p], rtol=1e-5, atol=1e-5)
    assert mask.all() and mask.shape == nb.shape


def test_cca_is_the_copied_attention_over_the_neighbours(base_dir):
    """Reference: layer p+1's own weights, transformers' rotary and repeat_kv, a sink column."""
    model = _model(base_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
    x, nb, _, _ = _inputs(1, 2 * M)
    p = 2
    cca = model.cca_layers[str(p)]
    layer = hf.model.layers[p]  # layer p + 1 (1-indexed)
    with torch.no_grad():
        h = hf(x, output_hidden_states=True).hidden_states[p]  # (1, 2m, d) leaving layer p
        nh = hf(nb[0, 0], output_hidden_states=True).hidden_states[p].reshape(1, K * R, 32)
        att, hs = layer.self_attn, 8
        xq, xk = layer.input_layernorm(h), layer.input_layernorm(nh)
        q = att.q_proj(xq).view(1, 2 * M, 4, hs).transpose(1, 2)
        k = att.k_proj(xk).view(1, K * R, 2, hs).transpose(1, 2)
        v = att.v_proj(xk).view(1, K * R, 2, hs).transpose(1, 2)
        cos_k, sin_k = hf.model.rotary_emb(xk, torch.arange(K * R)[None])
        k, _ = apply_rotary_pos_emb(k, k, cos_k, sin_k)
        # tokens m-1 .. 2m-2 attend chunk 0's neighbours, at positions k·r + 0 .. m-1
        qq = q[:, :, M - 1 : 2 * M - 1]
        cos_q, sin_q = hf.model.rotary_emb(xq, (K * R + torch.arange(M))[None])
        qq, _ = apply_rotary_pos_emb(qq, qq, cos_q, sin_q)
        s = qq @ repeat_kv(k, 2).transpose(-1, -2) / math.sqrt(hs)  # (1, 4, m, k·r)
        q0 = q[:, :, M - 1 : 2 * M - 1]  # the sink reads the unrotated query
        sink = (q0 * cca.null_key[None, :, None, :]).sum(-1, keepdim=True) / math.sqrt(hs) + 0.5
        s = torch.cat([s, sink], -1)
        a = s.softmax(-1)[..., :-1]
        y = (a @ repeat_kv(v, 2)) * torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 4, 1, 1)
        want = att.o_proj(y.transpose(1, 2).reshape(1, M, 32))
        enc, mask = model.encode_neighbours(nb[:, :1])
        kv = cca.kv(enc[p], model._base_rope)
        got = cca(h[:, : 2 * M - 1], 0, mask, kv, model._base_rope)  # tokens 0 .. 2m-2
    torch.testing.assert_close(got[:, M - 1 :], want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[:, : M - 1], torch.zeros_like(got[:, : M - 1]))


def test_off_and_closed_gates_equal_the_base_model(base_dir):
    model = _model(base_dir, heads=((), ()))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
    x, nb, lengths, _ = _inputs(2, 3 * M + 1)
    with torch.no_grad():
        want = hf(x).logits
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)
        torch.testing.assert_close(model(x, nb, lengths), want, rtol=1e-6, atol=1e-6)
    opened = _model(base_dir)
    with torch.no_grad():
        assert (opened(x, nb, lengths) - want).abs().max() > 1e-3


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(M, 5 * M), data=st.data())
def test_neighbours_of_chunk_u_reach_only_tokens_from_the_shift_on(seed, n, data):
    model = _CAUSAL
    x, nb, lengths, g = _inputs(seed, n)
    lengths.clamp_(min=1)
    u = data.draw(st.integers(0, n // M - 1))
    nb2 = nb.clone()
    nb2[:, u] = torch.randint(0, V, nb2[:, u].shape, generator=g)
    with torch.no_grad():
        a, b = model(x, nb, lengths), model(x, nb2, lengths)
    first = (u + 1) * M - 1
    torch.testing.assert_close(a[:, :first], b[:, :first], rtol=0, atol=1e-12)
    t = data.draw(st.integers(0, n - 1))  # and no token reads the future
    x2 = x.clone()
    x2[:, t + 1 :] = torch.randint(0, V, (1, n - t - 1), generator=g)
    with torch.no_grad():
        c = model(x2, nb, lengths)
    torch.testing.assert_close(a[:, : t + 1], c[:, : t + 1], rtol=0, atol=1e-12)


_CAUSAL = _model(_llama(dtype=torch.float64))


def test_cached_prefix_encoded_and_incremental_equal_the_full_forward(base_dir):
    model = _model(base_dir)
    x, nb, lengths, _ = _inputs(4, 3 * M + 2, batch=2)
    with torch.no_grad():
        full = model(x, nb, lengths)
        n = 3 * M
        enc = model.encode_neighbours(nb[:, :3], lengths[:, :3])
        got = model(x[:, :n], nb, lengths, prefix=model.frozen_prefix(x[:, :n]), encoded=enc)
        torch.testing.assert_close(got, full[:, :n], rtol=1e-5, atol=1e-5)
        cache = model.new_cache()
        parts = [model(x[:, : M + 2], nb[:, :1], lengths[:, :1], cache=cache)]
        for t in range(M + 2, x.shape[1]):  # one token at a time
            done = (t + 1) // M
            parts.append(model(x[:, t : t + 1], nb[:, :done], lengths[:, :done], cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.num_encoded == 3


def test_only_the_copies_gates_and_sinks_train_and_save_load_is_exact(base_dir, tmp_path):
    model = _model(base_dir)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("cca_layers.") for n in names)
    assert {n.rsplit(".", 1)[-1] for n in names} >= {"gate", "sink", "null_key"}
    x, nb, lengths, _ = _inputs(5, 3 * M)
    model.train()
    model(x, nb, lengths).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("base."))
    model.eval()
    out = save_retrofitted(model, tmp_path / "rf")
    loaded = load_retrofitted(out)
    assert loaded.config == model.config and loaded.config.cca_from_base
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, nb, lengths), model(x, nb, lengths), rtol=0, atol=0)


def test_induction_heads_are_picked_by_threshold_and_layer():
    scores = torch.tensor(
        [[0.9, 0.0], [0.1, 0.5], [0.45, 0.41], [0.2, 0.1], [0.0, 0.95]]
    )  # (L=5, h=2)
    # layer 1 is never chosen (no layer below it to place the CCA after)
    assert induction_heads(scores, threshold=0.4) == {2: (1,), 3: (0, 1), 5: (1,)}
    assert induction_heads(scores, threshold=0.4, max_layers=2) == {2: (1,), 5: (1,)}
    assert induction_heads(scores, threshold=0.99) == {}


def test_induction_scores_measure_attention_to_the_token_after_the_first_copy():
    """A hand-built 1-layer model whose head 0 attends exactly to position t - L + 1."""
    hf = _llama(n_layers=1)
    s = induction_scores(hf, length=8, batch=2)
    assert s.shape == (1, 4) and ((0 <= s) & (s <= 1)).all()
    # uniform causal attention over 2L positions gives about mean(1/(t+1)) for t in L..2L-2
    with torch.no_grad():
        hf.model.layers[0].self_attn.q_proj.weight.zero_()
    s0 = induction_scores(hf, length=8, batch=2)
    want = sum(1 / (t + 1) for t in range(8, 15)) / 7
    torch.testing.assert_close(s0, torch.full((1, 4), want), rtol=1e-5, atol=1e-5)


def test_bad_uses_are_refused(base_dir, tmp_path):
    with pytest.raises(RetrofitError, match="copies layer p"):
        retrofit(base_dir, cca_layers=(5,), chunk_size=M, cca_from_base=True)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    )
    with pytest.raises(RetrofitError, match="Llama"):
        retrofit(gpt2, cca_layers=(1,), chunk_size=M, cca_from_base=True)
    with pytest.raises(RetrofitError, match="cca_from_base"):
        retrofit(base_dir, cca_layers=(2,), chunk_size=M).encode_neighbours(
            torch.zeros(1, 1, K, R, dtype=torch.long)
        )


def test_train_with_cached_prefix_and_encodings_equals_plain_training(tmp_path):
    """TrainConfig.cache_prefix also caches the base's neighbour encodings: same weights."""
    import numpy as np
    from dataset_writer import chunk_documents, write_dataset

    from retro_core.train import TrainConfig, train

    d = tmp_path / "tiny-llama"
    _llama().save_pretrained(str(d))
    rng = np.random.default_rng(0)
    docs = [[int(v) for v in rng.integers(1, V, rng.integers(6, 24))] for _ in range(10)]
    tokens, lengths, doc_ids = chunk_documents(docs, M, 0)
    N = tokens.shape[0]
    nb_lengths = rng.integers(1, R + 1, (N, K))
    nb = rng.integers(1, V, (N, K, R)) * (np.arange(R) < nb_lengths[..., None])
    ds = write_dataset(
        tmp_path / "ds",
        tokens=tokens,
        lengths=lengths,
        doc_ids=doc_ids,
        neighbours=nb,
        neighbour_lengths=nb_lengths,
        neighbour_ids=np.tile(np.arange(K), (N, 1)),
        tokenizer_id="tiny-words",
        vocab_size=V,
        pad_id=0,
        source_db=None,
    )
    runs, seen = {}, []
    for name, kw in {"plain": {}, "cached": {"cache_prefix": True}}.items():
        model = _model(d)
        if kw:  # record what each training forward is given: the cache must reach the model
            forward = model.forward

            def spy(*args, _f=forward, **kwargs):
                seen.append(("prefix" in kwargs, "encoded" in kwargs))
                return _f(*args, **kwargs)

            model.forward = spy
        tc = TrainConfig(
            steps=3, batch_size=2, lr=1e-2, warmup_steps=1, seq_chunks=3, eval_every=0,
            eval_batches=1, valid_fraction=0.2, checkpoint_every=3, log_every=1, seed=1, **kw,
        )  # fmt: skip
        train(model, tc, ds, tmp_path / name, progress=False)
        runs[name] = model.new_state_dict()
    assert seen[:3] == [(True, True)] * 3, seen  # the 3 steps (validation runs uncached)
    start = _model(d).new_state_dict()
    assert any(not torch.equal(runs["plain"][k], start[k]) for k in start)  # it trained
    for key in runs["plain"]:
        torch.testing.assert_close(runs["plain"][key], runs["cached"][key], rtol=1e-4, atol=1e-5)


def test_gates_sinks_and_null_keys_get_their_own_faster_optimizer_group(base_dir):
    from retro_core.induction import GATE_LR_SCALE
    from retro_core.train import _param_groups

    model = _model(base_dir)
    groups = _param_groups(model, weight_decay=0.1)
    fast = [g for g in groups if g["lr_scale"] == GATE_LR_SCALE]
    assert len(fast) == 1 and fast[0]["weight_decay"] == 0.0
    want = {
        id(p)
        for n, p in model.named_parameters()
        if n.rsplit(".", 1)[-1] in ("gate", "sink", "null_key")
    }
    assert {id(p) for p in fast[0]["params"]} == want and len(want) == 3 * len(P)
    frozen = retrofit(base_dir, cca_layers=P, chunk_size=M, cca_from_base=True, train_copies=False)
    names = {n.rsplit(".", 1)[-1] for n, p in frozen.named_parameters() if p.requires_grad}
    assert names == {"gate", "sink", "null_key"}


def test_negatives_swap_every_neighbour_field_together():
    from retro_core.train import TrainConfig
    from retro_core.train_data import swap_neighbours

    B = 8
    ids = torch.arange(B)
    batch = {
        "tokens": ids[:, None].expand(B, 5).clone(),
        "loss_mask": torch.ones(B, 5, dtype=torch.bool),
        "neighbours": ids[:, None, None, None].expand(B, 2, K, R).clone(),
        "neighbour_lengths": 10 * ids[:, None, None].expand(B, 2, K).clone(),
        "encoded.3": ids.float()[:, None].expand(B, 4).clone(),
        "encoded_mask": (ids[:, None] % 2 == 0).expand(B, 3).clone(),
    }
    out = swap_neighbours(batch, 0.5, seed=3)
    src = out["neighbours"][:, 0, 0, 0]
    assert ((src == ids) | (src == (ids + 1) % B)).all()
    assert 0 < int((src != ids).sum()) < B  # some swapped, some kept (this seed)
    assert torch.equal(out["neighbour_lengths"][:, 0, 0], 10 * src)
    assert torch.equal(out["encoded.3"][:, 0], src.float())
    assert torch.equal(out["encoded_mask"][:, 0], src % 2 == 0)
    assert torch.equal(out["tokens"], batch["tokens"])  # the sequences themselves stay
    same = swap_neighbours(batch, 0.0, seed=3)
    assert all(torch.equal(same[key], batch[key]) for key in batch)
    with pytest.raises(ValueError, match="negative_share"):
        TrainConfig(negative_share=1.0)


def test_cli_trains_and_resumes_a_cca_from_base_model_exactly(tmp_path):
    import json

    import numpy as np
    from dataset_writer import chunk_documents, write_dataset

    from retro_core.cli import main

    d = tmp_path / "tiny-llama"
    _llama().save_pretrained(str(d))
    rng = np.random.default_rng(1)
    docs = [[int(v) for v in rng.integers(1, V, rng.integers(8, 24))] for _ in range(10)]
    tokens, lengths, doc_ids = chunk_documents(docs, M, 0)
    N = tokens.shape[0]
    ds = write_dataset(
        tmp_path / "ds", tokens=tokens, lengths=lengths, doc_ids=doc_ids,
        neighbours=rng.integers(1, V, (N, K, R)), neighbour_lengths=np.full((N, K), R),
        neighbour_ids=np.tile(np.arange(K), (N, 1)), tokenizer_id="tiny-words", vocab_size=V,
        pad_id=0, source_db=None,
    )  # fmt: skip
    common = ["--data", str(ds), "--no-progress", "--seq-chunks", "3", "--batch-size", "2"]
    common += ["--eval-every", "0", "--checkpoint-every", "1", "--log-every", "1"]
    rf = ["--retrofit", str(d), "--cca-from-base", "--cca-layers", "2,4"]
    rf += ["--induction-threshold", "0.0", "--steps", "3"]  # every head of the random model open
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*common, "--out", str(a), *rf]) == 0
    assert main([*common, "--out", str(b), *rf, "--stop-after", "2"]) == 0
    assert main([*common, "--out", str(b), "--resume", "--steps", "3"]) == 0
    cfg = json.loads((a / "checkpoints" / "step_00000003" / "retrofit.json").read_text())
    assert cfg["config"]["cca_from_base"] and cfg["config"]["cca_heads"] == [[0, 1, 2, 3]] * 2
    loss = [json.loads(x)["loss"] for x in (a / "metrics.jsonl").read_text().splitlines()]
    loss2 = [json.loads(x)["loss"] for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert loss2 == pytest.approx(loss, rel=1e-5)
