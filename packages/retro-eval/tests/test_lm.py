"""lm-eval integration: RetroLM through simple_evaluate agrees with retro-eval's own scorer."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from retro_core.config import RetroConfig
from retro_core.model import Retro
from retro_eval.lm import RetroLM, parse_bool, parse_retrieval
from retro_eval.perplexity import (
    retrieve_document_neighbours,
    score_documents,
    shuffle_document_neighbours,
)
from retro_eval.tasks import TASKS_DIR, write_rolling_task
from retro_eval.testing import ByteTokenizer, InMemoryRetriever

torch.set_num_threads(1)

M = 8
N = 32
DOCS = [
    "The cat sat on the mat and looked at the dog across the room, then slept soundly.",
    "Short doc with  double  spaces.",
    "Unicode: caf\u00e9 na\u00efve \u2014 and so on, for a while longer than one window of text.",
]
DB = ["The dog slept on the mat in the room.", "caf\u00e9 and na\u00efve words, unicode text."]


def tiny_model(cca=None) -> Retro:
    torch.manual_seed(0)
    cfg = RetroConfig(
        vocab_size=258, d_model=32, n_heads=2, n_layers=3, chunk_size=M, enc_layers=1,
        cca_layers=cca, max_seq_len=N, tokenizer_id=ByteTokenizer.id,
    )  # fmt: skip
    return Retro(cfg).eval()


@pytest.fixture
def offline_hf(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path


def _words(text: str) -> int:
    import re

    return len(re.split(r"\s+", text))


def _shuffled_reference(model, tok, retriever, docs, seed=0, **kw):
    """retro-eval run's RETRO[shuffled]: the scorer fed the seeded derangement of the neighbours."""
    full = retrieve_document_neighbours(
        retriever, [tok.encode(d) for d in docs], chunk_size=M, k=2, pad_id=0, progress=False
    )
    nbs = shuffle_document_neighbours(full, seed=seed)
    return score_documents(model, tok, docs, neighbours=nbs, progress=False, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("retrieval", [True, False, "shuffled"])
def test_simple_evaluate_matches_scorer(offline_hf, retrieval):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    torch.set_num_threads(1)
    tok = ByteTokenizer()
    model = tiny_model()
    retriever = InMemoryRetriever([tok.encode(t) for t in DB], chunk_size=M)
    yaml_path = write_rolling_task("retro_unit_docs", DOCS, offline_hf / "tasks")
    lm = RetroLM(
        model=model, retriever=retriever, tokenizer=tok, retrieval=retrieval, k=2, batch_size=2,
        max_length=N, stride=16,
    )  # fmt: skip
    out = simple_evaluate(
        model=lm,
        tasks=["retro_unit_docs"],
        task_manager=TaskManager(include_path=str(yaml_path.parent), include_defaults=False),
        log_samples=False,
    )
    got = out["results"]["retro_unit_docs"]
    if retrieval == "shuffled":
        ours = _shuffled_reference(model, tok, retriever, DOCS, window=N, stride=16)
    else:
        ours = score_documents(
            model, tok, DOCS, retriever=retriever if retrieval else None, k=2, window=N,
            stride=16, progress=False,
        )  # fmt: skip
    nats = ours.total_bits() * math.log(2)
    words = sum(_words(d) for d in DOCS)
    nbytes = sum(len(d.encode()) for d in DOCS)
    assert got["word_perplexity,none"] == pytest.approx(math.exp(nats / words), rel=1e-5)
    assert got["bits_per_byte,none"] == pytest.approx(ours.total_bits() / nbytes, rel=1e-5)


def test_rolling_equals_scorer_and_retrieval_is_used():
    tok = ByteTokenizer()
    model = tiny_model()
    retriever = InMemoryRetriever([tok.encode(t) for t in DB], chunk_size=M)
    reqs = [SimpleNamespace(args=(d,)) for d in DOCS] + [SimpleNamespace(args=("",))]
    on = RetroLM(model=model, retriever=retriever, tokenizer=tok, k=2)
    off = RetroLM(model=model, retriever=retriever, tokenizer=tok, retrieval="off")
    ll_on = on.loglikelihood_rolling(reqs)
    ll_off = off.loglikelihood_rolling(reqs)
    ours = score_documents(model, tok, DOCS, retriever=retriever, k=2, progress=False)
    np.testing.assert_allclose(ll_on[:-1], ours.doc_loglikelihood(), rtol=1e-6)
    assert ll_on[-1] == 0.0
    assert not np.allclose(ll_on[:-1], ll_off[:-1])


def test_rolling_shuffled_equals_run_control():
    """retrieval=shuffled in loglikelihood_rolling = retro-eval run's RETRO[shuffled] scoring."""
    tok = ByteTokenizer()
    model = tiny_model()
    retriever = InMemoryRetriever([tok.encode(t) for t in DB], chunk_size=M)
    reqs = [SimpleNamespace(args=(d,)) for d in DOCS]
    lm = RetroLM(
        model=model, retriever=retriever, tokenizer=tok, k=2, retrieval="shuffled", shuffle_seed=3
    )
    got = lm.loglikelihood_rolling(reqs)
    ref = _shuffled_reference(model, tok, retriever, DOCS, seed=3)
    np.testing.assert_allclose(got, ref.doc_loglikelihood(), rtol=1e-6)
    on = RetroLM(model=model, retriever=retriever, tokenizer=tok, k=2).loglikelihood_rolling(reqs)
    assert not np.allclose(got, on)
    # A single chunk in all: no other chunk to take neighbours from.
    with pytest.raises(ValueError, match="at least 2 evaluation chunks"):
        lm.loglikelihood_rolling([SimpleNamespace(args=("tiny",))])


def test_parse_retrieval_and_shuffled_needs_a_database():
    assert parse_retrieval("shuffled") == "shuffled" and parse_retrieval("Shuffle") == "shuffled"
    assert parse_retrieval(True) == "on" and parse_retrieval("off") == "off"
    with pytest.raises(ValueError, match="on, off or shuffled"):
        parse_retrieval("maybe")
    with pytest.raises(ValueError, match="needs a database"):
        RetroLM(model=tiny_model(), tokenizer=ByteTokenizer(), retrieval="shuffled")


def test_loglikelihood_and_generation_shuffled():
    """Every complete chunk of the inputs gets the neighbours retrieved for another chunk."""
    tok = ByteTokenizer()
    model = tiny_model()
    retriever = InMemoryRetriever([tok.encode(t) for t in DB], chunk_size=M)
    lm = RetroLM(
        model=model, retriever=retriever, tokenizer=tok, retrieval="shuffled", k=2, batch_size=2
    )
    pairs = [
        ("The cat sat on the mat and looked", " at the dog"),
        ("Question: what did the cat do?", " It slept"),
        ("", "hello"),
    ]
    got = lm.loglikelihood([SimpleNamespace(args=p) for p in pairs])
    donor = lm._shuffled.donor
    assert donor and all(d != key for key, d in donor.items())
    assert sorted(donor.values()) == sorted(donor)  # a permutation of the distinct chunks
    for (ctx, cont), (ll, _) in zip(pairs, got, strict=True):
        c = tok.encode(ctx) if ctx else [tok.eos_id]
        x = tok.encode(cont)
        inp = (c + x)[-(N + 1) :][:-1]
        kwargs = {}
        full = len(inp) // M
        if full:
            chunks = [tuple(inp[u * M : (u + 1) * M]) for u in range(full)]
            nb = retriever.retrieve(np.array([donor[ch] for ch in chunks]), 2)
            kwargs = dict(
                neighbours=torch.from_numpy(nb.tokens)[None],
                neighbour_lengths=torch.from_numpy(nb.lengths)[None],
            )
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([inp]), **kwargs)[0], -1)
        pos = range(len(inp) - len(x), len(inp))
        ref = sum(lp[p, t].item() for p, t in zip(pos, x, strict=True))
        assert ll == pytest.approx(ref, rel=1e-4, abs=1e-4)
    # Generation: the prompts' chunks are paired; a chunk completed while generating gets another
    # chunk's neighbours too.
    gen = [
        SimpleNamespace(args=("The cat sat on the mat", {"max_gen_toks": 12, "until": ["\n"]})),
        SimpleNamespace(args=("Unicode caf\u00e9 text", {"max_gen_toks": 12})),
    ]
    texts = lm.generate_until(gen)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    unseen = tuple(range(2, 2 + M))
    nb = lm._shuffled.retrieve(np.array([unseen]), 2)
    assert nb.tokens.shape == (1, 2, 2 * M) and lm._shuffled.donor[unseen] != unseen


@pytest.mark.parametrize("retrieval", [True, False])
def test_loglikelihood_equals_hand_computation(retrieval):
    tok = ByteTokenizer()
    model = tiny_model()
    retriever = InMemoryRetriever([tok.encode(t) for t in DB], chunk_size=M)
    lm = RetroLM(
        model=model, retriever=retriever, tokenizer=tok, retrieval=retrieval, k=2, batch_size=3
    )
    pairs = [
        ("The cat sat on the mat and looked", " at the dog"),
        ("Question: what did the cat do?", " It slept"),
        ("", "hello"),
        ("ctx ", "x"),
        ("A much longer context that does not fit in the thirty-two token window at all", " yes"),
    ]
    got = lm.loglikelihood([SimpleNamespace(args=p) for p in pairs])
    for (ctx, cont), (ll, greedy) in zip(pairs, got, strict=True):
        if ctx.endswith(" "):
            ctx, cont = ctx.rstrip(), " " + cont
        c = tok.encode(ctx) if ctx else [tok.eos_id]
        x = tok.encode(cont)
        seq = (c + x)[-(N + 1) :]
        inp = seq[:-1]
        kwargs = {}
        if retrieval:
            full = len(inp) // M
            chunks = np.array([inp[u * M : (u + 1) * M] for u in range(full)])
            nb = retriever.retrieve(chunks, 2)
            kwargs = dict(
                neighbours=torch.from_numpy(nb.tokens)[None],
                neighbour_lengths=torch.from_numpy(nb.lengths)[None],
            )
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([inp]), **kwargs)[0], -1)
        pos = range(len(inp) - len(x), len(inp))
        ref = sum(lp[p, t].item() for p, t in zip(pos, x, strict=True))
        assert ll == pytest.approx(ref, rel=1e-4, abs=1e-4)
        assert greedy == all(lp[p].argmax().item() == t for p, t in zip(pos, x, strict=True))


def test_model_args_and_registration():
    from lm_eval.api.registry import get_model

    assert get_model("retro") is RetroLM
    assert parse_bool("off") is False and parse_bool("On") is True
    with pytest.raises(ValueError, match="retrieval"):
        parse_bool("maybe")
    with pytest.raises(ValueError, match="do_sample='maybe'"):
        parse_bool("maybe", "do_sample")
    with pytest.raises(ValueError, match="checkpoint"):
        RetroLM()
    assert (TASKS_DIR / "retro_wikitext_mini.yaml").exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_pack_tasks_load(offline_hf):
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    for name in ["retro_wikitext_mini", "retro_pile_mini_gutenberg_pg19"]:
        assert name in tm.all_tasks
    task = tm.load_task_or_group(["retro_pile_mini_gutenberg_pg19"])  # the 0.4.13 API
    (t,) = task.values()
    docs = list(t.test_docs())
    assert docs and all(d["subset"] == "Gutenberg (PG-19)" for d in docs)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_pack_task_matches_scorer(offline_hf):
    """lm-eval on a shipped pack task (custom_dataset) equals the scorer on the same documents."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from retro_eval.benchmarks import load_benchmark

    tok = ByteTokenizer()
    model = tiny_model()
    retriever = InMemoryRetriever([tok.encode(t) for t in DB], chunk_size=M)
    task = "retro_pile_mini_dm_mathematics"
    lm = RetroLM(model=model, retriever=retriever, tokenizer=tok, k=2, batch_size=8)
    out = simple_evaluate(
        model=lm,
        tasks=[task],
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
    )
    got = out["results"][task]
    docs = [
        d
        for d in load_benchmark("pile-mini", "test").documents
        if d.meta["pile_set_name"] == "DM Mathematics"
    ]
    ours = score_documents(
        model, tok, [d.text for d in docs], retriever=retriever, k=2, progress=False
    )
    nbytes = sum(len(d.text.encode()) for d in docs)
    words = sum(_words(d.text) for d in docs)
    assert got["bits_per_byte,none"] == pytest.approx(ours.total_bits() / nbytes, rel=1e-5)
    assert got["word_perplexity,none"] == pytest.approx(
        math.exp(ours.total_bits() * math.log(2) / words), rel=1e-5
    )


def test_create_from_arg_obj_with_checkpoint(tmp_path):
    """The lm-eval CLI path: model args win over --batch_size; the tokenizer must match the model."""
    from retro_core.checkpoint import save_checkpoint

    save_checkpoint(tiny_model(), tmp_path / "ckpt")
    args = {"checkpoint": str(tmp_path / "ckpt"), "batch_size": "4", "k": "3", "retrieval": "off"}
    lm = RetroLM.create_from_arg_obj(
        {**args, "tokenizer": ByteTokenizer()}, {"batch_size": 1, "device": "cpu"}
    )
    assert lm.batch_size == 4 and lm.k == 3 and lm.retriever is None
    reqs = [SimpleNamespace(args=(d,)) for d in DOCS[:1]]
    assert math.isfinite(lm.loglikelihood_rolling(reqs)[0])
    with pytest.raises(ValueError, match="tokenizer"):
        RetroLM.create_from_arg_string(f"checkpoint={tmp_path / 'ckpt'}", {"batch_size": 1})


def test_bad_do_sample_is_named_in_the_error():
    lm = RetroLM(model=tiny_model(), tokenizer=ByteTokenizer(), retrieval=False)
    req = SimpleNamespace(args=("The cat sat", {"max_gen_toks": 4, "do_sample": "maybe"}))
    with pytest.raises(ValueError, match="^do_sample='maybe'"):
        lm.generate_until([req])
