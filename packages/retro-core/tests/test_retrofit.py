"""Tests of retro_core.retrofit: RETRO-fitting tiny random GPT-2 and Llama models (transformers).

The independent truth is always the unmodified Hugging Face model, loaded afresh from the same
directory with ``from_pretrained``.
"""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

from dataset_writer import chunk_documents, write_dataset  # noqa: E402

from retro_core.generate import generate  # noqa: E402
from retro_core.interface import RetrievalLM  # noqa: E402
from retro_core.retrieval import Neighbours, RetrieverMismatchError  # noqa: E402
from retro_core.retrofit import (  # noqa: E402
    RetrofitError,
    RetrofittedLM,
    base_weights_sha256,
    hf_tokenizer_id,
    load_new_weights,
    load_retrofitted,
    retrofit,
    save_retrofitted,
)
from retro_core.train import TrainConfig, train  # noqa: E402

V, M, K = 61, 4, 2  # vocabulary, chunk size m, neighbours k
R = 2 * M
FAMILIES = ("gpt2", "llama")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _hf_model(family: str, n_layers: int = 4):
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=V,
            n_embd=32,
            n_layer=n_layers,
            n_head=2,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _save_tokenizer(directory: Path) -> None:
    """A tiny word-level tokenizer (V ids) saved as a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(V)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="w0", unk_token="w1"
    )
    fast.save_pretrained(str(directory))


@pytest.fixture(scope="module", params=FAMILIES)
def base_dir(request, tmp_path_factory) -> Path:
    """A tiny random model of each family + a tokenizer, saved with save_pretrained (fp32)."""
    d = tmp_path_factory.mktemp(request.param) / f"tiny-{request.param}"
    _hf_model(request.param).save_pretrained(str(d))
    _save_tokenizer(d)
    return d


def _fresh_base(directory: Path, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype).eval()


def _randomise_new_weights(model: RetrofittedLM, seed: int = 1, scale: float = 1.0) -> None:
    """Give every new weight (including the zero-initialised CCA outputs) a random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("base."):
                if p.ndim == 1:  # norms: around 1
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
                else:
                    p.copy_(scale * 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _inputs(seed: int, n: int, k: int = K, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (batch, n), generator=g)
    nb = torch.randint(0, V, (batch, math.ceil(n / M), k, R), generator=g)
    return x, nb, g


# ---------------------------------------------------------------------------------------------
# Structure, RETRO[OFF] == base, frozen base


def test_default_cca_layers_follow_the_retro_config_rule(base_dir):
    model = retrofit(base_dir, chunk_size=M)  # 4 layers: every 3rd back from the last
    assert model.config.cca_layers == (1, 4)
    assert sorted(model.cca_layers.keys()) == ["1", "4"]
    deep = retrofit(_hf_model("llama", n_layers=12), chunk_size=M)
    assert deep.config.cca_layers == (6, 9, 12)  # the paper's 12-layer choice
    assert deep.base_ref is None  # built from an in-memory model: nothing to reference
    narrow = retrofit(base_dir, chunk_size=M, enc_d_model=16)  # base head size 16: 1 head
    assert (narrow.config.enc_d_model, narrow.config.enc_n_heads) == (16, 1)


def test_retrofitted_lm_is_a_retrieval_lm(base_dir):
    model = retrofit(base_dir, chunk_size=M, k=K)
    assert isinstance(model, RetrievalLM)
    assert model.geometry == (M, K, R)


def test_logits_without_neighbours_equal_the_base_model(base_dir):
    truth = _fresh_base(base_dir)
    model = retrofit(base_dir, chunk_size=M, k=K)
    x, nb, _ = _inputs(0, 19)
    with torch.no_grad():
        want = truth(x).logits
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)
        # Zero-initialised CCA outputs: before training, even WITH neighbours it is the base.
        torch.testing.assert_close(model(x, nb), want, rtol=0, atol=0)
        _randomise_new_weights(model)
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)  # RETRO[OFF]
        assert (model(x, nb) - want).abs().max() > 1e-3  # ...and the new weights now matter
        # The base object itself is untouched: its own forward and generate are the base's.
        torch.testing.assert_close(model.base(x).logits, want, rtol=0, atol=0)
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        a = model.base.generate(x[:1, :5], **kw)
        b = truth.generate(x[:1, :5], **kw)
    assert a.tolist() == b.tolist()


def test_logits_to_keep_matches_the_full_logits(base_dir):
    model = retrofit(base_dir, chunk_size=M, k=K)
    _randomise_new_weights(model)
    x, nb, _ = _inputs(2, 13)
    with torch.no_grad():
        full = model(x, nb)
        torch.testing.assert_close(model(x, nb, logits_to_keep=5), full[:, -5:])
        idx = torch.tensor([1, 7, 12])
        torch.testing.assert_close(model(x, nb, logits_to_keep=idx), full[:, idx])


def test_only_new_parameters_are_trainable_and_get_gradients(base_dir):
    model = retrofit(base_dir, chunk_size=M, k=K)
    base_names = {f"base.{n}" for n, _ in model.base.named_parameters()}
    for name, p in model.named_parameters():
        assert p.requires_grad == (name not in base_names), name
    s = model.trainable_parameters()
    new = sum(p.numel() for n, p in model.named_parameters() if n not in base_names)
    assert s["trainable"] == new == s["encoder"] + s["cca"]
    assert s["total"] == sum(p.numel() for p in model.base.parameters()) + new
    assert s["share"] == pytest.approx(new / s["total"])
    assert set(model.new_state_dict()) == {
        n for n, _ in model.named_parameters() if n not in base_names
    }

    _randomise_new_weights(model, scale=0.3)
    model.train()
    assert not model.base.training  # the frozen base never enters training mode (no dropout)
    x, nb, _ = _inputs(1, 16)
    logits = model(x, nb)
    torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1)
    ).backward()
    for name, p in model.named_parameters():
        if name in base_names:
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_zero_initialised_cca_learns_from_its_output_projection(base_dir):
    model = retrofit(base_dir, chunk_size=M, k=K)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, nb, _ = _inputs(2, 16)
    for _ in range(2):
        opt.zero_grad()
        logits = model(x, nb)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1)
        )
        loss.backward()
        opt.step()
    assert all(
        layer.cca.attn.out_proj.weight.abs().sum() > 0 for layer in model.cca_layers.values()
    )
    with torch.no_grad():
        truth = _fresh_base(base_dir)
        torch.testing.assert_close(model(x), truth(x).logits, rtol=0, atol=0)
        assert (model(x, nb) - truth(x).logits).abs().max() > 0


def test_bad_arguments_are_refused(base_dir):
    with pytest.raises(RetrofitError, match="cca_layers"):
        retrofit(base_dir, cca_layers=(5,))
    with pytest.raises(RetrofitError, match="cca_layers is empty"):
        retrofit(base_dir, cca_layers=())
    with pytest.raises(RetrofitError, match="not a Hugging Face model directory"):
        retrofit(base_dir / "missing")
    with pytest.raises(RetrofitError, match="expected a Hugging Face causal LM"):
        retrofit(torch.nn.Linear(2, 2))
    model = retrofit(base_dir, chunk_size=M)
    with pytest.raises(ValueError, match="neighbours"):
        model(torch.randint(0, V, (1, 9)), torch.randint(0, V, (1, 1, K, R)))


# ---------------------------------------------------------------------------------------------
# Causality (issue 3's properties, on the retro-fitted model; float64 so "unchanged" is exact)


def _causal_model(family: str) -> RetrofittedLM:
    model = retrofit(_hf_model(family).to(torch.float64), chunk_size=M, k=K, seed=5)
    _randomise_new_weights(model, seed=7)
    return model.eval()


_CAUSAL = {f: _causal_model(f) for f in FAMILIES}


@settings(max_examples=15, deadline=None)
@given(
    family=st.sampled_from(FAMILIES),
    seed=st.integers(0, 2**31),
    n=st.integers(1, 20),
    data=st.data(),
)
def test_logits_do_not_depend_on_future_tokens(family, seed, n, data):
    model = _CAUSAL[family]
    x, nb, g = _inputs(seed, n, batch=1)
    t = data.draw(st.integers(0, n - 1))
    x2 = x.clone()
    x2[:, t + 1 :] = torch.randint(0, V, (1, n - t - 1), generator=g)
    with torch.no_grad():
        a, b = model(x, nb), model(x2, nb)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(
    family=st.sampled_from(FAMILIES),
    seed=st.integers(0, 2**31),
    n=st.integers(M, 20),
    data=st.data(),
)
def test_neighbours_of_chunk_u_reach_only_tokens_from_the_shift_on(family, seed, n, data):
    model = _CAUSAL[family]
    x, nb, g = _inputs(seed, n, batch=1)
    u = data.draw(st.integers(0, n // M - 1))  # a complete chunk: (u+1)m-1 < n
    nb2 = nb.clone()
    nb2[:, u] = torch.randint(0, V, nb2[:, u].shape, generator=g)
    with torch.no_grad():
        a, b = model(x, nb), model(x, nb2)
    first = (u + 1) * M - 1  # the last token of chunk u is the first to attend its neighbours
    torch.testing.assert_close(a[:, :first], b[:, :first], rtol=0, atol=1e-12)
    assert (a[:, first:] - b[:, first:]).abs().max() > 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_first_m_minus_1_tokens_ignore_all_neighbours(family):
    model = _CAUSAL[family]
    x, nb, _ = _inputs(3, 13, batch=1)
    with torch.no_grad():
        a, b = model(x, nb), model(x)
    torch.testing.assert_close(a[:, : M - 1], b[:, : M - 1], rtol=0, atol=0)
    assert (a[:, M - 1 :] - b[:, M - 1 :]).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------
# Tokenizer identity and retriever checks


class FakeRetriever:
    """Deterministic neighbours, a function of the query chunk only; the last row sometimes empty."""

    def __init__(self, tokenizer_id: str | None, chunk_size: int = M):
        self.tokenizer_id = tokenizer_id
        self.chunk_size = chunk_size
        self.calls = 0

    def retrieve(self, chunks, k, exclude_doc_ids=None):
        self.calls += 1
        chunks = np.asarray(chunks)
        q, j = chunks.shape[0], np.arange(R)
        s = chunks.sum(axis=1)
        tokens = (s[:, None, None] * 7 + np.arange(k)[None, :, None] * 13 + j * 3) % V
        lengths = np.full((q, k), R, dtype=np.int32)
        lengths[:, -1] = s % (R + 1)
        tokens = np.where(j < lengths[..., None], tokens, -1)  # padding outside |V|
        ids = np.where(lengths > 0, s[:, None] * 10 + np.arange(k), -1).astype(np.int64)
        return Neighbours(tokens=tokens, lengths=lengths, chunk_ids=ids, pad_id=-1)


def test_tokenizer_id_is_retro_db_s(base_dir):
    tok_id = hf_tokenizer_id(base_dir)
    assert tok_id is not None and tok_id.startswith(base_dir.name + "-")
    assert retrofit(base_dir, chunk_size=M).config.tokenizer_id == tok_id
    assert hf_tokenizer_id(base_dir / "nothing-here") is None
    # that retro_db's load_tokenizer reports the same id: tests/test_retrofit_tokenizer.py


def test_mismatched_retriever_is_refused(base_dir):
    model = retrofit(base_dir, chunk_size=M, k=K)
    tok_id = model.config.tokenizer_id
    model.check_retriever(FakeRetriever(tok_id))
    with pytest.raises(RetrieverMismatchError, match="tokenizer"):
        generate(model, [1, 2, 3], FakeRetriever("gpt2-0123456789ab"), max_new_tokens=2)
    with pytest.raises(RetrieverMismatchError, match="chunk_size"):
        model.check_retriever(FakeRetriever(tok_id, chunk_size=2 * M))


# ---------------------------------------------------------------------------------------------
# Generation with the base model's KV cache


@pytest.mark.parametrize("prompt_len", [1, 4, 6])
def test_cached_greedy_equals_full_recompute(base_dir, prompt_len):
    model = retrofit(base_dir, chunk_size=M, k=K, seed=2)
    _randomise_new_weights(model, seed=3)
    retriever = FakeRetriever(model.config.tokenizer_id)
    prompt = [(5 * i + 2) % V for i in range(prompt_len)]
    cached = generate(model, prompt, retriever, max_new_tokens=14)
    full = generate(model, prompt, retriever, max_new_tokens=14, use_cache=False)
    assert cached == full
    off = generate(model, prompt, None, max_new_tokens=14)
    with torch.no_grad():  # RETRO[OFF] generation is the base model's own greedy generation
        ids = torch.tensor([prompt])
        want = _fresh_base(base_dir).generate(
            ids, max_new_tokens=14, do_sample=False, pad_token_id=0, eos_token_id=None
        )
    assert off == want[0, prompt_len:].tolist()


def test_cached_logits_match_the_full_forward(base_dir):
    model = retrofit(base_dir, chunk_size=M, k=K, seed=2)
    _randomise_new_weights(model, seed=4)
    x, nb, _ = _inputs(5, 15, batch=1)
    with torch.no_grad():
        full = model(x, nb)
        cache = model.new_cache()
        parts = [model(x[:, :6], nb[:, :1], cache=cache)]  # prefill completes chunk 0
        for t in range(6, 15):  # one token at a time; neighbours passed when a chunk completes
            done = (t + 1) // M
            parts.append(model(x[:, t : t + 1], nb[:, :done], cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 15 and cache.num_encoded == 3


# ---------------------------------------------------------------------------------------------
# Save / load


def test_save_load_round_trip_is_exact(base_dir, tmp_path):
    model = retrofit(base_dir, chunk_size=M, k=K, enc_layers=1, enc_d_model=16, seed=1)
    _randomise_new_weights(model, seed=9)
    out = save_retrofitted(model, tmp_path / "rf", extra={"note": "x"})
    meta = json.loads((out / "retrofit.json").read_text())
    assert meta["base"]["path"] == str(base_dir.resolve())
    assert meta["base"]["sha256"] == base_weights_sha256(base_dir)
    from safetensors import safe_open

    with safe_open(str(out / "retrofit.safetensors"), "pt") as f:
        assert set(f.keys()) == set(model.new_state_dict())  # the new weights only
    loaded = load_retrofitted(out)
    assert loaded.config == model.config and loaded.checkpoint_extra == {"note": "x"}
    x, nb, _ = _inputs(6, 17)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, nb), model(x, nb), rtol=0, atol=0)
        torch.testing.assert_close(loaded(x), _fresh_base(base_dir)(x).logits, rtol=0, atol=0)


def test_load_refuses_a_different_base(base_dir, tmp_path):
    copy = tmp_path / "base-copy"
    shutil.copytree(base_dir, copy)
    model = retrofit(copy, chunk_size=M, k=K)
    out = save_retrofitted(model, tmp_path / "rf")
    changed = _fresh_base(copy)
    with torch.no_grad():
        next(changed.parameters()).add_(1e-3)
    changed.save_pretrained(str(copy))
    with pytest.raises(RetrofitError, match="sha256"):
        load_retrofitted(out)


def test_load_refuses_flipped_new_weights_and_edited_config(base_dir, tmp_path):
    model = retrofit(base_dir, chunk_size=M, k=K, enc_layers=1, enc_d_model=16, seed=1)
    out = save_retrofitted(model, tmp_path / "rf")
    w = out / "retrofit.safetensors"
    pristine = w.read_bytes()
    raw = bytearray(pristine)
    raw[-3] ^= 0x10  # inside the last tensor's data
    w.write_bytes(bytes(raw))
    with pytest.raises(RetrofitError, match=r"retrofit\.safetensors: sha256 .* differs"):
        load_retrofitted(out)
    with pytest.raises(RetrofitError, match=r"retrofit\.safetensors: sha256 .* differs"):
        load_new_weights(model, out)
    w.write_bytes(pristine)
    meta = json.loads((out / "retrofit.json").read_text())
    meta["extra"] = {"edited": True}
    (out / "retrofit.json").write_text(json.dumps(meta))
    with pytest.raises(RetrofitError, match=r"retrofit\.json: contents differ from the recorded"):
        load_retrofitted(out)
    assert load_retrofitted(out, verify=False).checkpoint_extra == {"edited": True}


# ---------------------------------------------------------------------------------------------
# Training through retro_core.train (the same loop and dataset format as RETRO)


def _dataset(directory: Path, tokenizer_id: str) -> Path:
    rng = np.random.default_rng(0)
    docs = [
        [int(v) for v in (rng.integers(0, 31) + np.arange(rng.integers(6, 24))) % 31 + 1]
        for _ in range(10)
    ]
    tokens, lengths, doc_ids = chunk_documents(docs, M, 0)
    N = tokens.shape[0]
    nb = np.zeros((N, K, R), dtype=np.int64)
    for i in range(N):
        nb[i] = [1 + (int(tokens[i, 0]) - 1 + t) % 31 for t in range(R)]
    return write_dataset(
        directory,
        tokens=tokens,
        lengths=lengths,
        doc_ids=doc_ids,
        neighbours=nb,
        neighbour_lengths=np.full((N, K), R),
        neighbour_ids=np.tile(np.arange(K), (N, 1)),
        tokenizer_id=tokenizer_id,
        vocab_size=V,
        pad_id=0,
        source_db=None,
    )


def _tc(**kw) -> TrainConfig:
    fields = dict(
        steps=3,
        batch_size=2,
        lr=1e-2,
        warmup_steps=1,
        seq_chunks=3,
        eval_every=0,
        eval_batches=1,
        valid_fraction=0.2,
        checkpoint_every=2,
        log_every=1,
        seed=1,
    )
    fields.update(kw)
    return TrainConfig(**fields)


def test_train_updates_only_new_weights_and_checkpoints_them(base_dir, tmp_path):
    ds = _dataset(tmp_path / "ds", hf_tokenizer_id(base_dir))
    model = retrofit(base_dir, chunk_size=M, k=K, enc_layers=1, seed=0)
    before = {k: v.clone() for k, v in model.base.state_dict().items()}
    final = train(model, _tc(), ds, tmp_path / "run", progress=False)
    assert final["step"] == 3
    for k, v in model.base.state_dict().items():
        assert torch.equal(v, before[k]), k
    ckpt = Path(final["checkpoint"])
    assert (ckpt / "retrofit.json").is_file() and not (ckpt / "model.safetensors").exists()
    loaded = load_retrofitted(ckpt)
    x, nb, _ = _inputs(7, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, nb), model.eval()(x, nb), rtol=0, atol=0)


def test_train_refuses_a_dataset_of_another_tokenizer(base_dir, tmp_path):
    ds = _dataset(tmp_path / "ds", "gpt2-0123456789ab")
    model = retrofit(base_dir, chunk_size=M, k=K, enc_layers=1)
    with pytest.raises(ValueError, match="tokenizer_id"):
        train(model, _tc(), ds, tmp_path / "run", progress=False)


def test_cli_retrofit_trains_and_resumes(base_dir, tmp_path, capsys):
    from retro_core.cli import main

    ds = _dataset(tmp_path / "ds", hf_tokenizer_id(base_dir))
    out = tmp_path / "run"
    common = ["--data", str(ds), "--out", str(out), "--no-progress", "--seq-chunks", "3"]
    common += [
        "--batch-size",
        "2",
        "--eval-every",
        "0",
        "--checkpoint-every",
        "1",
        "--log-every",
        "1",
    ]
    assert main([*common, "--retrofit", str(base_dir), "--enc-layers", "1", "--steps", "3"]) == 0
    capsys.readouterr()
    rc = main([*common, "--retrofit", str(base_dir), "--steps", "3"])
    assert rc == 2  # out holds checkpoints: refused without --resume
    assert "holds checkpoints" in capsys.readouterr().err
    uninterrupted = (out / "metrics.jsonl").read_text().splitlines()
    out2 = tmp_path / "run2"
    args2 = [a if a != str(out) else str(out2) for a in common]
    assert main([*args2, "--retrofit", str(base_dir), "--enc-layers", "1", "--steps", "3",
                 "--stop-after", "2"]) == 0  # fmt: skip
    assert main([*args2, "--resume", "--steps", "3"]) == 0  # rebuilt from retrofit.json
    resumed = (out2 / "metrics.jsonl").read_text().splitlines()
    loss = [json.loads(line)["loss"] for line in uninterrupted]
    loss2 = [json.loads(line)["loss"] for line in resumed]
    assert loss2 == pytest.approx(loss, rel=1e-5)
    other = _dataset(tmp_path / "ds-other", "gpt2-0123456789ab")
    rc = main(["--data", str(other), "--out", str(tmp_path / "run3"), "--retrofit", str(base_dir)])
    assert rc == 2 and "tokenizer_id" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The frozen prefix (layers below min(P) computed once) and sampled loss positions


def test_forward_from_the_frozen_prefix_equals_the_full_forward(tmp_path):
    d = tmp_path / "tiny-llama"
    _hf_model("llama", n_layers=6).save_pretrained(str(d))
    model = retrofit(d, cca_layers=(3, 6), chunk_size=M, k=K, enc_layers=1, seed=0)
    _randomise_new_weights(model)
    assert model.prefix_depth == 2
    x, nb, _ = _inputs(3, 3 * M)
    with torch.no_grad():
        h = model.frozen_prefix(x)
        assert h.shape == (2, 3 * M, 32)
        full = model(x, nb)
        torch.testing.assert_close(model(x, nb, prefix=h), full, rtol=0, atol=0)
        keep = torch.tensor([M - 1, M + 2, 3 * M - 1])
        torch.testing.assert_close(
            model(x, nb, prefix=h, logits_to_keep=keep), full[:, keep], rtol=0, atol=0
        )
        # the prefix is the base's own hidden state entering layer min(P) = 3
        ref = model.base(x, output_hidden_states=True).hidden_states[2]
        torch.testing.assert_close(h, ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="prefix"):
        model(x, nb, prefix=h[:, :-1])


def test_gpt2_has_no_frozen_prefix(tmp_path):
    d = tmp_path / "tiny-gpt2"
    _hf_model("gpt2").save_pretrained(str(d))
    model = retrofit(d, chunk_size=M, k=K, enc_layers=1, seed=0)
    with pytest.raises(RetrofitError, match="Llama"):
        model.frozen_prefix(torch.zeros(1, M, dtype=torch.long))


def test_cached_prefix_and_sampled_loss_train_the_same_weights(tmp_path):
    """cache_prefix changes nothing but speed; loss_share draws positions >= m-1 only."""
    d = tmp_path / "tiny-llama"
    _hf_model("llama", n_layers=4).save_pretrained(str(d))
    _save_tokenizer(d)
    ds = _dataset(tmp_path / "ds", hf_tokenizer_id(d))
    runs = {}
    for name, kw in {
        "plain": {"loss_share": 0.5},
        "cached": {"loss_share": 0.5, "cache_prefix": True},
    }.items():
        model = retrofit(d, cca_layers=(3, 4), chunk_size=M, k=K, enc_layers=1, seed=0)
        final = train(model, _tc(steps=4, **kw), ds, tmp_path / name, progress=False)
        runs[name] = (model.new_state_dict(), final)
    (a, fa), (b, fb) = runs["plain"], runs["cached"]
    assert fa["tokens_total"] == fb["tokens_total"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    full = retrofit(d, cca_layers=(3, 4), chunk_size=M, k=K, enc_layers=1, seed=0)
    ff = train(full, _tc(steps=4), ds, tmp_path / "full", progress=False)
    # half of the real positions t >= m-1 (n = 3m per sequence, short documents) carry a loss
    assert 0.15 * ff["tokens_total"] < fa["tokens_total"] < 0.5 * ff["tokens_total"]


def test_sampled_positions_avoid_the_first_chunk():
    from retro_core.train_data import sample_positions

    mask = torch.ones(2, 4 * M, dtype=torch.bool)
    out = sample_positions({"loss_mask": mask}, 0.25, M - 1, seed=5)["loss_mask"]
    assert not out[:, : M - 1].any()
    assert torch.equal(out[0], out[1])
    assert int(out[0].sum()) == round(0.25 * (4 * M - (M - 1)))


def test_load_model_opens_either_kind_and_a_run_directory(base_dir, tmp_path):
    from retro_core import load_model

    ds = _dataset(tmp_path / "ds", hf_tokenizer_id(base_dir))
    model = retrofit(base_dir, chunk_size=M, k=K, enc_layers=1, seed=0)
    train(model, _tc(), ds, tmp_path / "run", progress=False)
    loaded = load_model(tmp_path / "run")  # the run directory: its latest checkpoint
    assert isinstance(loaded, RetrofittedLM)
    x, nb, _ = _inputs(7, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, nb), model.eval()(x, nb), rtol=0, atol=0)


def test_train_on_a_subset_of_sequences(tmp_path):
    from retro_core.train import TrainError

    d = tmp_path / "tiny-llama"
    _hf_model("llama", n_layers=4).save_pretrained(str(d))
    _save_tokenizer(d)
    ds = _dataset(tmp_path / "ds", hf_tokenizer_id(d))
    model = retrofit(d, cca_layers=(3, 4), chunk_size=M, k=K, enc_layers=1, seed=0)
    tc = _tc(steps=2, valid_fraction=0.0, eval_batches=0, sequences=(0, 2))
    train(model, tc, ds, tmp_path / "sub", progress=False)
    saved = json.loads((tmp_path / "sub" / "train_config.json").read_text())
    assert saved["sequences"] == [0, 2] and TrainConfig.from_dict(saved) == tc
    with pytest.raises(TrainError, match="out of range"):
        train(model, _tc(sequences=(10_000,)), ds, tmp_path / "bad", progress=False)
    with pytest.raises(TrainError, match="sequences"):
        _tc(sequences=())


def test_encoder_input_norm_gives_the_neighbours_unit_scale(tmp_path):
    """enc_input_norm: the encoder's input has RMS 1 however small the frozen embeddings are."""
    d = tmp_path / "tiny-llama"
    _hf_model("llama").save_pretrained(str(d))
    plain = retrofit(d, chunk_size=M, k=K, enc_layers=1, enc_d_model=16, seed=0)
    assert not any("in_norm" in n for n in plain.new_state_dict())  # old checkpoints still load
    model = retrofit(d, chunk_size=M, k=K, enc_layers=1, enc_d_model=16, enc_input_norm=True)
    assert model.config.enc_input_norm and "encoder.in_norm.weight" in model.new_state_dict()
    with torch.no_grad():  # SmolLM2's embedding scale: the projected input has RMS ~0.015
        model.tok_emb.weight.normal_(0.0, 0.136, generator=torch.Generator().manual_seed(0))
    seen = []
    model.encoder.in_norm.register_forward_hook(lambda _m, _a, out: seen.append(out))
    x, nb, _ = _inputs(2, 3 * M)
    with torch.no_grad():
        model(x, nb)
    rms = seen[0].pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=0.02, atol=0.02)
