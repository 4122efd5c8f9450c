"""The comparison rows of issue 17: in-context retrieval (In-Context RALM) and kNN-LM.

Independent truths: the harness's own base-model scores (score_token_documents), hand-built
forward rows, brute-force numpy neighbour votes, and hand-computed interpolations.
"""

import math

import numpy as np
import pytest
import torch

from retro_core.config import RetroConfig
from retro_core.model import Retro
from retro_eval.causal import readout_hidden
from retro_eval.incontext import incontext_items, score_incontext
from retro_eval.knnlm import (
    Datastore,
    build_datastore,
    interpolate,
    knn_logprob,
    matching_database_documents,
    score_knnlm,
)
from retro_eval.perplexity import (
    DocumentNeighbours,
    retrieve_document_neighbours,
    score_token_documents,
)
from retro_eval.testing import ByteTokenizer, InMemoryRetriever

TOK = ByteTokenizer()
LN2 = math.log(2.0)
TEXTS = [
    "The cat sat on the mat and looked at the dog for a long while, then slept.",
    "Dogs bark at cats all day long.",
    "x",
]
DB_TEXTS = ["The dog sat on a mat.", "Cats and dogs bark all day.", "A cat slept on the mat."]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _baseline(max_seq_len: int = 32, chunk_size: int = 8) -> Retro:
    torch.manual_seed(0)
    return Retro(
        RetroConfig(
            vocab_size=258,
            d_model=32,
            n_heads=2,
            n_layers=3,
            chunk_size=chunk_size,
            enc_layers=1,
            max_seq_len=max_seq_len,
            cca_layers=(),
            tokenizer_id=TOK.id,
        )  # fmt: skip
    ).eval()


def _hf_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=1,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def _docs():
    return [TOK.encode(t) for t in TEXTS]


def _neighbours(docs, k=2):
    db = InMemoryRetriever([TOK.encode(t) for t in DB_TEXTS], chunk_size=8)
    return retrieve_document_neighbours(db, docs, chunk_size=8, k=k, pad_id=0, progress=False)


def _direct_bits(model, row, first):
    """-log2 p of row[first:] from one forward pass of the whole row (an independent path)."""
    with torch.inference_mode():
        out = model(torch.tensor([row]))
        logits = out if isinstance(out, torch.Tensor) else out.logits
        logp = torch.log_softmax(logits[0].double(), -1)
    return np.array([-logp[p - 1, row[p]].item() / LN2 for p in range(first, len(row))])


# ---- in-context retrieval ---------------------------------------------------------------------


def test_incontext_with_empty_neighbours_equals_the_base_model_bit_for_bit():
    model, docs = _baseline(), _docs()
    nb = _neighbours(docs)
    empty = [DocumentNeighbours(n.tokens, np.zeros_like(n.lengths), n.chunk_ids) for n in nb]
    base = score_token_documents(model, docs, decode=TOK.decode, prefix_id=1, progress=False)
    for neighbours in (empty, None):
        ic = score_incontext(
            model, docs, neighbours, decode=TOK.decode, prefix_id=1, progress=False
        )
        assert np.array_equal(ic.bits, base.bits)
        assert np.array_equal(ic.bytes, base.bytes)
        assert np.array_equal(ic.chunk_tokens, base.chunk_tokens)
    # with real neighbours the scores move, over the same chunks
    ic = score_incontext(model, docs, nb, decode=TOK.decode, prefix_id=1, progress=False)
    assert ic.num_chunks == base.num_chunks and not np.allclose(ic.bits, base.bits)
    # chunk 0 has no previous chunk: the base's scores (other row shapes: float rounding only)
    np.testing.assert_allclose(
        ic.bits[base.chunk_index == 0], base.bits[base.chunk_index == 0], rtol=1e-6
    )


def test_incontext_rows_hand_checked():
    """m = 4, n = 16, s = 8; the neighbour of chunk u-1 (its real tokens) leads chunk u's row."""
    doc = list(range(10, 30))  # T = 20: chunks [10..13] [14..17] [18..21] [22..25] [26..29]
    c = 5
    tokens = np.zeros((c, 1, 8), dtype=np.int64)
    lengths = np.zeros((c, 1), dtype=np.int64)
    tokens[0, 0, :3] = [200, 201, 202]
    lengths[0, 0] = 3  # chunk 1 reads a 3-token neighbour
    tokens[2, 0, :8] = np.arange(100, 108)
    lengths[2, 0] = 8  # chunk 3 reads an 8-token one
    nb = [DocumentNeighbours(tokens, lengths, np.zeros((c, 1), np.int64))]
    items = incontext_items([doc], nb, chunk_size=4, window=16, stride=8)
    got = {(it.target_from, it.tokens, it.first) for it in items}
    # window 0 = t[0:16] scores 1..15: chunk 0 (1..3), chunk 1 (4..7) after [200 201 202],
    # chunk 2 (8..11), chunk 3 (12..15) after 100..107 with the context cut to fit 16 tokens.
    want = {
        (1, tuple(doc[0:4]), 1),
        (4, (200, 201, 202, *doc[0:8]), 7),
        (8, tuple(doc[0:12]), 8),
        (12, (*range(100, 108), *doc[8:16]), 12),
        # window 1 = t[8:20] scores 16..19 (chunk 4, whose previous chunk 3 has no neighbour);
        # being the window's only chunk and neighbour-less it is the base's window itself.
        (16, tuple(doc[8:20]), 8),
    }
    assert got == want
    assert all(len(it.tokens) <= 16 for it in items)
    # and the scores are the model's probabilities of those rows
    model = _baseline(max_seq_len=16, chunk_size=4)
    res = score_incontext(
        model, [doc], nb, decode=TOK.decode, prefix_id=1, chunk_size=4, window=16, stride=8,
        progress=False,
    )  # fmt: skip
    token_bits = np.zeros(20)
    with torch.inference_mode():
        token_bits[0] = (
            -torch.log_softmax(model(torch.tensor([[1]]))[0, 0].double(), -1)[doc[0]].item() / LN2
        )
    for t0, row, first in want:
        token_bits[t0 : t0 + len(row) - first] = _direct_bits(model, list(row), first)
    np.testing.assert_allclose(res.bits, token_bits.reshape(5, 4).sum(1), rtol=1e-5)


def test_incontext_reads_a_hugging_face_model_like_its_retrofitted_wrapper():
    from retro_core.retrofit import retrofit

    hf, docs = _hf_llama(), _docs()
    nb = _neighbours(docs, k=1)
    plain = score_incontext(
        hf, docs, nb, decode=TOK.decode, prefix_id=1, chunk_size=8, window=32, stride=16,
        progress=False,
    )  # fmt: skip
    fitted = retrofit(hf, cca_layers=(2,), k=1, chunk_size=8, pad_id=0, tokenizer_id=TOK.id)
    wrapped = score_incontext(
        fitted, docs, nb, decode=TOK.decode, prefix_id=1, window=32, stride=16, progress=False
    )
    assert np.array_equal(wrapped.bits, plain.bits)
    # rows may be longer than RETRO's max_seq_len: the base's own limit (64 here)
    longer = score_incontext(
        fitted, docs, nb, decode=TOK.decode, prefix_id=1, window=16, stride=8, progress=False
    )
    assert longer.meta["max_length"] == 64
    assert max(len(it.tokens) for it in incontext_items(
        docs, nb, chunk_size=8, window=16, stride=8, max_length=64
    )) > 16  # fmt: skip
    # a document within one window without neighbours: the LM's probabilities of [eos] + doc
    one = score_incontext(
        hf, [docs[1]], None, decode=TOK.decode, prefix_id=1, chunk_size=8, window=32,
        progress=False,
    )  # fmt: skip
    direct = _direct_bits(hf, [1, *docs[1]], 1)
    np.testing.assert_allclose(one.total_bits(), direct.sum(), rtol=1e-5)


def test_lm_eval_model_arg_retrieval_incontext():
    from types import SimpleNamespace

    from retro_eval.lm import RetroLM, parse_retrieval

    assert parse_retrieval("incontext") == "incontext" and parse_retrieval("kNNLM") == "knnlm"
    model, docs = _baseline(), _docs()
    db = InMemoryRetriever([TOK.encode(t) for t in DB_TEXTS], chunk_size=8)
    lm = RetroLM(model=model, retriever=db, tokenizer=TOK, retrieval="incontext", batch_size=4)
    got = lm.loglikelihood_rolling([SimpleNamespace(args=(t,)) for t in TEXTS])
    ic = score_incontext(
        model, docs, _neighbours(docs, k=1), decode=TOK.decode, prefix_id=1, progress=False
    )
    np.testing.assert_allclose(got, ic.doc_loglikelihood(), rtol=1e-12)
    with pytest.raises(ValueError, match="loglikelihood_rolling only"):
        lm.loglikelihood([SimpleNamespace(args=("The cat", " sat"))])
    with pytest.raises(ValueError, match="retrieval=knnlm needs a database"):
        RetroLM(model=model, tokenizer=TOK, retrieval="knnlm")


# ---- kNN-LM -------------------------------------------------------------------------------------


def test_knn_probability_and_interpolation_against_hand_computation():
    keys = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 3.0]], dtype=np.float32)
    values = np.array([5, 7, 5, 9])
    store = Datastore.from_arrays(keys, values, keep_keys=True)
    q = np.array([[0.5, 0.0]], dtype=np.float32)
    dist, vals = store.search(q, 1024)  # k capped by the datastore's size
    assert dist.shape == (1, 4)
    # squared L2: 0.25 (v5), 0.25 (v7), 4.25 (v5), 15.25 (v9)
    np.testing.assert_allclose(np.sort(dist[0]), [0.25, 0.25, 4.25, 15.25], rtol=1e-6)
    e = np.exp(-np.array([0.25, 0.25, 4.25, 15.25]))
    p5 = (e[0] + e[2]) / e.sum()
    p9 = e[3] / e.sum()
    assert knn_logprob(dist, vals, np.array([5]), 4)[0] == pytest.approx(math.log(p5), rel=1e-9)
    assert knn_logprob(dist, vals, np.array([9]), 4)[0] == pytest.approx(math.log(p9), rel=1e-9)
    assert knn_logprob(dist, vals, np.array([3]), 4)[0] == -np.inf
    # k = 3 drops the farthest; temperature divides the distances
    e3 = np.exp(-np.array([0.25, 0.25, 4.25]) / 2.0)
    got = knn_logprob(dist, vals, np.array([5]), 3, temperature=2.0)[0]
    assert got == pytest.approx(math.log((e3[0] + e3[2]) / e3.sum()), rel=1e-9)
    # p = lambda p_kNN + (1 - lambda) p_LM
    p_lm = 0.01
    mix = interpolate(np.array([math.log(p_lm)]), np.array([math.log(p5)]), 0.25)[0]
    assert mix == pytest.approx(math.log(0.25 * p5 + 0.75 * p_lm), rel=1e-12)
    mix = interpolate(np.array([math.log(p_lm)]), np.array([-np.inf]), 0.25)[0]
    assert mix == pytest.approx(math.log(0.75 * p_lm), rel=1e-12)
    x = np.array([-3.3, -0.1])
    assert np.array_equal(interpolate(x, np.array([-np.inf, 0.0]), 0.0), x)
    with pytest.raises(ValueError, match="lambda"):
        interpolate(x, x, 1.5)


def test_knn_search_excludes_a_document_exactly():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(50, 4)).astype(np.float32)
    docs = np.repeat(np.arange(5), 10)
    store = Datastore.from_arrays(keys, np.arange(50), docs)
    q = rng.normal(size=(6, 4)).astype(np.float32)
    dist, vals = store.search(q, 7, exclude_doc=2)
    d2 = ((q[:, None, :] - keys[None]) ** 2).sum(-1)
    d2[:, docs == 2] = np.inf
    want = np.argsort(d2, axis=1, kind="stable")[:, :7]
    assert np.array_equal(vals, want)  # values are the entry numbers here
    assert not np.isin(vals, np.flatnonzero(docs == 2)).any()
    np.testing.assert_allclose(dist, np.take_along_axis(d2, want, 1), rtol=1e-5)
    assert store.search(q, 100, exclude_doc=2)[0].shape == (6, 40)


def test_knnlm_lambda_zero_is_the_base_model_bit_for_bit():
    model, docs = _baseline(), _docs()
    db_docs = [TOK.encode(t) for t in DB_TEXTS]
    store = build_datastore(model, db_docs, prefix_id=1, progress=False)
    assert store.size == sum(map(len, db_docs))  # one entry per database token
    base = score_token_documents(model, docs, decode=TOK.decode, prefix_id=1, progress=False)
    scores = score_knnlm(
        model, docs, store, decode=TOK.decode, prefix_id=1, ks=(4, 1024), progress=False
    )
    assert np.array_equal(scores.result(0.0).bits, base.bits)
    assert np.array_equal(scores.result(0.0, 4).bits, base.bits)
    assert np.array_equal(scores.result(0.25).bytes, base.bytes)
    assert not np.allclose(scores.result(0.25).bits, base.bits)
    rows = scores.sweep((0.0, 0.25))
    assert {(r["lambda"], r["k"]) for r in rows} == {(0.0, 4), (0.25, 4), (0.0, 1024), (0.25, 1024)}


def _hidden_and_logp(model, doc):
    """The harness's contexts, computed directly: token 0 after the prefix token alone, token
    p >= 1 after doc[:p] (one forward pass of the document). Hidden [T, d], log p [T, V]."""
    with torch.inference_mode(), readout_hidden(model) as seen:
        first = model(torch.tensor([[1]]))[0]
        h0 = seen[-1][0]
        rest = model(torch.tensor([doc]))[0]
        h = seen[-1][0]
    hidden = torch.cat([h0, h[:-1]]).double().numpy()
    logp = torch.log_softmax(torch.cat([first, rest[:-1]]).double(), -1).numpy()
    return hidden, logp


def test_knnlm_end_to_end_against_a_brute_force_computation():
    """Short documents (one window each): read-out hidden states computed directly, numpy
    distances to every datastore key, softmax vote, interpolation at lambda = 0.25."""
    model = _baseline(max_seq_len=64)
    db_docs = [TOK.encode(t) for t in DB_TEXTS]
    store = build_datastore(model, db_docs, prefix_id=1, keep_keys=True, progress=False)
    # the keys of database document 0 are the hidden states of its tokens' contexts
    h_db0, _ = _hidden_and_logp(model, db_docs[0])
    np.testing.assert_allclose(
        np.sort(store.keys[store.docs == 0], axis=0), np.sort(h_db0, axis=0), atol=1e-5
    )
    assert sorted(store.values[store.docs == 0].tolist()) == sorted(db_docs[0])
    doc = TOK.encode("The cat sat on a mat.")
    scores = score_knnlm(
        model, [doc], store, decode=TOK.decode, prefix_id=1, ks=(8,), progress=False
    )
    h, logp_lm = _hidden_and_logp(model, doc)
    keys = store.keys.astype(np.float64)
    bits = 0.0
    for p, y in enumerate(doc):
        d2 = ((keys - h[p]) ** 2).sum(1)
        near = np.argsort(d2, kind="stable")[:8]
        w = np.exp(-(d2[near] - d2[near].min()))
        p_knn = (w * (store.values[near] == y)).sum() / w.sum()
        bits -= math.log2(0.25 * p_knn + 0.75 * math.exp(logp_lm[p, y]))
    assert scores.result(0.25, 8).total_bits() == pytest.approx(bits, rel=1e-4)


def test_knnlm_excludes_the_evaluated_document_from_the_datastore():
    """Scoring a database document with its own entries excluded = scoring it against a
    datastore built without that document; without the exclusion it reads itself."""
    model = _baseline()
    db_docs = [TOK.encode(t) for t in DB_TEXTS]
    full = build_datastore(model, db_docs, prefix_id=1, progress=False)
    rest = build_datastore(model, db_docs[1:], np.array([1, 2]), prefix_id=1, progress=False)
    target = [db_docs[0]]
    excl = matching_database_documents(target, db_docs, np.arange(3))
    assert excl.tolist() == [0]
    kw = dict(decode=TOK.decode, prefix_id=1, ks=(1, 16), progress=False)
    a = score_knnlm(model, target, full, exclude_doc_ids=excl, **kw)
    b = score_knnlm(model, target, rest, **kw)
    leak = score_knnlm(model, target, full, **kw)
    for k in (1, 16):
        np.testing.assert_allclose(a.result(0.25, k).bits, b.result(0.25, k).bits, rtol=1e-9)
        assert leak.result(0.25, k).bpb() < a.result(0.25, k).bpb()
    # k = 1 without exclusion: every token's nearest key is its own entry (distance 0)
    assert np.all(np.isclose(np.exp(leak.knn[1][0]), 1.0))


def test_knnlm_on_a_retrofitted_model_reads_its_frozen_base():
    from retro_core.retrofit import retrofit

    hf, docs = _hf_llama(), _docs()
    db_docs = [TOK.encode(t) for t in DB_TEXTS]
    kw = dict(decode=TOK.decode, prefix_id=1, ks=(8,), window=32, stride=16, progress=False)
    store = build_datastore(hf, db_docs, prefix_id=1, chunk_size=8, window=32, progress=False)
    plain = score_knnlm(hf, docs, store, chunk_size=8, **kw)
    fitted = retrofit(hf, cca_layers=(2,), k=1, chunk_size=8, pad_id=0, tokenizer_id=TOK.id)
    wrapped = score_knnlm(fitted, docs, store, **kw)
    assert np.array_equal(wrapped.result(0.25).bits, plain.result(0.25).bits)
    # and lambda = 0 is the retro-fitted model's RETRO[OFF] (its base) bit for bit
    off = score_token_documents(
        fitted, docs, decode=TOK.decode, prefix_id=1, window=32, stride=16, progress=False
    )
    assert np.array_equal(wrapped.result(0.0).bits, off.bits)
    with pytest.raises(ValueError, match="chunk_size"):
        score_knnlm(hf, docs, store, **kw)


# ---- retro-eval run: the comparison rows and table ---------------------------------------------

RUN_TRAIN = [
    "The river flows through the old town and past the mill near the bridge.",
    "Cats are small carnivorous mammals kept as pets in many households.",
    "Call me Ishmael. Some years ago, never mind how long precisely.",
]
RUN_EVAL = [
    "The river flows through the old town and past the mill near the bridge.",
    "It was the best of times, it was the worst of times, said he.",
]


@pytest.fixture(scope="module")
def run_setup(tmp_path_factory):
    import json

    import yaml

    from retro_core.checkpoint import save_checkpoint
    from retro_db.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("compare-run")
    tok = load_tokenizer(None)
    for split, texts in (("train", RUN_TRAIN), ("test", RUN_EVAL)):
        (root / "docs").mkdir(exist_ok=True)
        (root / "docs" / f"{split}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in texts)
        )
    common = dict(
        vocab_size=tok.vocab_size, d_model=16, n_heads=2, n_layers=3, chunk_size=8, enc_layers=1,
        max_seq_len=32, tokenizer_id=tok.id, pad_id=tok.pad_id,
    )  # fmt: skip
    torch.manual_seed(0)
    save_checkpoint(Retro(RetroConfig(**common)), root / "retro")
    save_checkpoint(Retro(RetroConfig(**{**common, "cca_layers": ()})), root / "base")
    cfg = {
        "retro": "retro",
        "baseline": "base",
        # no dedup: the evaluated document 0 is in the database (kNN-LM must exclude it)
        "database": {"path": "db", "build_from": ["docs:train"], "embedder": "hash:32"},
        "benchmarks": [{"name": "docs", "split": "test"}],
        "k": 2,
        "k_sweep": [],
        "overlap": ["rc"],
        "batch_size": 2,
        "bootstrap_samples": 200,
        "methods": ["knnlm", "incontext", "bm25"],
        "knnlm": {"lambdas": [0, 0.25], "ks": [4, 1024]},
        "output": "out",
    }
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    return root


@pytest.mark.slow
def test_run_adds_the_comparison_rows_and_table(run_setup, capsys):
    import json

    from retro_core.checkpoint import load_checkpoint
    from retro_db.database import Database
    from retro_eval.cli import main
    from retro_eval.knnlm import database_documents

    root = run_setup
    assert main(["run", "--config", str(root / "run.yaml")]) == 0, capsys.readouterr().err
    results = json.loads((root / "out" / "results.json").read_text())
    bench = results["benchmarks"]["docs"]
    assert {"knnlm", "incontext", "retro_on", "retro_off", "baseline"} <= set(bench["models"])
    assert bench["methods"]["reads"] == "baseline"
    knn = bench["methods"]["knnlm"]
    assert knn["excluded_documents"] == 1  # the evaluated document the database holds
    assert {(r["lambda"], r["k"]) for r in knn["sweep"]} == {
        (0.0, 4), (0.25, 4), (0.0, 1024), (0.25, 1024),
    }  # fmt: skip
    # the rows equal the methods called directly (baseline model, the database's neighbours)
    db = Database.open(root / "db")
    base = load_checkpoint(root / "base")
    docs = [db.tokenizer.encode(t) for t in RUN_EVAL]
    nb = retrieve_document_neighbours(db, docs, chunk_size=8, k=1, pad_id=0, progress=False)
    ic = score_incontext(
        base, docs, nb, decode=db.tokenizer.decode, prefix_id=db.tokenizer.eos_id, batch_size=2,
        progress=False,
    )  # fmt: skip
    assert bench["models"]["incontext"]["bpb"] == pytest.approx(ic.bpb(), rel=1e-9)
    db_docs, db_index = database_documents(db)
    assert sorted(map(len, db_docs)) == sorted(len(db.tokenizer.encode(t)) for t in RUN_TRAIN)
    store = build_datastore(base, db_docs, db_index, prefix_id=db.tokenizer.eos_id, progress=False)
    excl = matching_database_documents(docs, db_docs, db_index)
    assert (excl >= 0).tolist() == [True, False]
    kn = score_knnlm(
        base, docs, store, decode=db.tokenizer.decode, prefix_id=db.tokenizer.eos_id,
        ks=(1024,), exclude_doc_ids=excl, batch_size=2, progress=False,
    )  # fmt: skip
    assert bench["models"]["knnlm"]["bpb"] == pytest.approx(kn.result(0.25).bpb(), rel=1e-9)
    # the lm-eval model arg retrieval=knnlm scores the same (rolling loglikelihood)
    from types import SimpleNamespace

    from retro_eval.lm import RetroLM

    lm = RetroLM(model=base, retriever=db, retrieval="knnlm", batch_size=2)
    got = lm.loglikelihood_rolling([SimpleNamespace(args=(t,)) for t in RUN_EVAL])
    np.testing.assert_allclose(got, kn.result(0.25).doc_loglikelihood(), rtol=1e-12)
    # lambda = 0 in the sweep is the baseline row
    zero = next(r for r in knn["sweep"] if r["lambda"] == 0.0)
    assert zero["bpb"] == pytest.approx(bench["models"]["baseline"]["bpb"], rel=1e-12)
    # the table: every row, all chunks + each rc bin, bpb inside its interval, a speed
    table = bench["comparison"]
    order = [r["model"] for r in table["rows"]]
    assert order == [
        "baseline", "retro_off", "retro_on", "retro_shuffled", "retro_bm25", "knnlm", "incontext",
    ]  # fmt: skip
    # RETRO[ON] with BM25's neighbours = the scorer fed retro_db.bm25's neighbours directly
    from retro_db.bm25 import BM25Retriever
    from retro_eval.perplexity import score_documents

    retro = load_checkpoint(root / "retro")
    bm_nb = retrieve_document_neighbours(
        BM25Retriever(db), docs, chunk_size=8, k=2, pad_id=retro.config.pad_id, progress=False
    )
    bm = score_documents(retro, db.tokenizer, RUN_EVAL, neighbours=bm_nb, batch_size=2,
                         progress=False)  # fmt: skip
    assert bench["models"]["retro_bm25"]["bpb"] == pytest.approx(bm.bpb(), rel=1e-9)
    assert [c["bin"] for c in table["columns"]][0] == "all chunks" and len(table["columns"]) == 4
    speed = results["speed"]["docs"]
    for r in table["rows"]:
        assert r["all"]["bpb"] == pytest.approx(bench["models"][r["model"]]["bpb"], rel=1e-9)
        assert r["all"]["ci95"][0] <= r["all"]["bpb"] <= r["all"]["ci95"][1]
        assert speed[r["model"]]["tokens_per_s"] > 0 and not speed[r["model"]]["cached"]
        assert sum(b["chunks"] for b in r["bins"]["rc"]) == bench["chunks"]
    assert set(bench["vs_off"]) >= {"knnlm", "incontext", "retro_bm25"}
    report = (root / "out" / "report.md").read_text()
    assert "### Comparison" in report and "kNN-LM sweep" in report
    assert "| in-context retrieval |" in report
    # a second run reads every row from the cache: the same results, and no speed
    assert main(["run", "--config", str(root / "run.yaml")]) == 0
    again = json.loads((root / "out" / "results.json").read_text())
    assert again["benchmarks"]["docs"] == bench
    assert all(
        sp["cached"] and sp["tokens_per_s"] is None for sp in again["speed"]["docs"].values()
    )
    assert "| kNN-LM |" in (root / "out" / "report.md").read_text()
    # --methods selects the rows
    assert main(["run", "--config", str(root / "run.yaml"), "--methods", "none"]) == 0
    none = json.loads((root / "out" / "results.json").read_text())["benchmarks"]["docs"]
    assert "knnlm" not in none["models"] and "comparison" not in none


def test_run_rejects_a_bad_method_in_one_line(run_setup, capsys):
    from retro_eval.cli import main

    root = run_setup
    assert main(["run", "--config", str(root / "run.yaml"), "--methods", "knnlm,bogus"]) == 2
    err = capsys.readouterr().err
    assert "--methods: unknown method(s) bogus" in err and err.count("\n") == 1
    import yaml

    cfg = yaml.safe_load((root / "run.yaml").read_text())
    cfg["knnlm"] = {"lambda": 2}
    bad = root / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    assert main(["run", "--config", str(bad)]) == 2
    assert "knnlm.lambda: expected a weight in [0, 1], got 2" in capsys.readouterr().err


def test_datastore_under_a_token_budget_equals_the_unbounded_one():
    """max_batch_tokens bounds every forward pass (B x row length) and changes no entry: the
    same keys (to float rounding), values and owners as batches of 4 without a bound."""
    from retro_eval import causal

    model = _baseline(max_seq_len=64)
    db_docs = [TOK.encode(t * 3) for t in DB_TEXTS]  # rows of 64-72 tokens: 1 per pass at 100
    shapes = []
    real = causal._logits

    def spy(lm, tokens, keep, keeps):
        shapes.append(tuple(tokens.shape))
        return real(lm, tokens, keep, keeps)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(causal, "_logits", spy)
        free = build_datastore(
            model, db_docs, prefix_id=1, keep_keys=True, max_batch_tokens=None, progress=False
        )
        free_shapes, shapes[:] = list(shapes), []
        tight = build_datastore(
            model, db_docs, prefix_id=1, keep_keys=True, max_batch_tokens=100, progress=False
        )
    assert max(b for b, _ in free_shapes) > 1  # unbounded, rows share a pass
    assert shapes and all(b * t <= 100 or b == 1 for b, t in shapes)
    assert max(b for b, _ in shapes) == 1
    np.testing.assert_array_equal(tight.values, free.values)
    np.testing.assert_array_equal(tight.docs, free.docs)
    np.testing.assert_allclose(tight.keys, free.keys, atol=1e-5)
