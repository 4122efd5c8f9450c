"""`retro-eval run` end to end on tiny checkpoints, a tiny retro_db database and local benchmarks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from retro_core.checkpoint import save_checkpoint
from retro_core.config import RetroConfig
from retro_core.model import Retro
from retro_eval.cli import main

torch.set_num_threads(1)

M = 8
N = 32

TRAIN = [
    ("Wikipedia (en)", "The river flows through the old town and past the mill near the bridge."),
    ("Wikipedia (en)", "Cats are small carnivorous mammals kept as pets in many households."),
    ("Gutenberg (PG-19)", "Call me Ishmael. Some years ago, never mind how long precisely."),
]
EVAL = [
    ("Wikipedia (en)", "The river flows through the old town and past the mill near the bridge."),
    ("Gutenberg (PG-19)", "It was the best of times, it was the worst of times, said he."),
    ("Wikipedia (en)", "Dogs are loyal animals."),
]


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from retro_db.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("run")
    tok = load_tokenizer(None)
    pile = root / "pile"
    _jsonl(pile / "train.jsonl", [{"text": t, "meta": {"pile_set_name": s}} for s, t in TRAIN])
    _jsonl(pile / "test.jsonl", [{"text": t, "meta": {"pile_set_name": s}} for s, t in EVAL])
    qa = root / "qa"
    _jsonl(
        qa / "mini.dev.jsonl",
        [
            {"question": "Where does the river flow?", "answer": ["through the old town"]},
            {"question": "What are cats?", "answer": ["mammals"]},
        ],
    )
    _jsonl(
        qa / "passages.jsonl",
        [{"id": i, "title": "t", "text": t} for i, (_, t) in enumerate(TRAIN)],
    )
    common = dict(
        vocab_size=tok.vocab_size, d_model=16, n_heads=2, n_layers=3, chunk_size=M, enc_layers=1,
        max_seq_len=N, tokenizer_id=tok.id, pad_id=tok.pad_id,
    )  # fmt: skip
    torch.manual_seed(0)
    save_checkpoint(Retro(RetroConfig(**common)), root / "retro")
    save_checkpoint(Retro(RetroConfig(**{**common, "cca_layers": ()})), root / "base")
    return root


def _config(root, **over):
    cfg = {
        "retro": "retro",
        "baseline": "base",
        "database": {
            "path": "db",
            "build_from": ["pile:train"],
            "dedup": True,
            "embedder": "hash:32",
        },
        "benchmarks": [{"name": "pile", "split": "test"}, {"name": "qa", "max_questions": 2}],
        "k": 2,
        "k_sweep": [1, 2],
        "overlap": [],
        "batch_size": 2,
        "max_new_tokens": 4,
        "output": "out",
    }
    cfg.update(over)
    path = root / f"run-{cfg['output']}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_run_end_to_end(setup, capsys):
    from retro_db.database import Database
    from retro_eval.perplexity import (
        retrieve_document_neighbours,
        score_documents,
        shuffle_document_neighbours,
    )

    pytest.importorskip("retro_eval.metrics")
    root = setup
    assert main(["run", "--config", str(_config(root))]) == 0, capsys.readouterr().err
    out = root / "out"
    results = json.loads((out / "results.json").read_text())
    pile = results["benchmarks"]["pile"]
    assert set(pile["models"]) == {"retro_on", "retro_shuffled", "retro_off", "baseline"}
    assert pile["shuffle"]["seed"] == 0
    assert set(pile["vs_off"]) == {"retro_on", "retro_shuffled"}
    for d in pile["vs_off"].values():
        assert d["ci95"][0] <= d["delta"] <= d["ci95"][1]
    assert [r["k"] for r in pile["k_sweep"]] == [1, 2]
    assert set(pile["subsets"]) == {"Wikipedia (en)", "Gutenberg (PG-19)"}
    qa = results["benchmarks"]["qa"]
    assert qa["kind"] == "qa" and qa["questions"] == 2
    assert set(qa["models"]) == {"retro_on", "retro_off", "baseline"}
    assert (out / "report.md").exists() and (out / "subsets_pile.png").exists()
    # Dedup removed the training document identical to an evaluation document.
    dedup = json.loads((out / "dedup.json").read_text())
    assert dedup["num_removed"] == 1 and dedup["removed"][0]["train_index"] == 0
    db = Database.open(root / "db")
    assert db.num_documents == len(TRAIN) - 1
    # The numbers equal retro-eval's scorer called directly.
    from retro_core.checkpoint import load_checkpoint

    retro = load_checkpoint(root / "retro")
    texts = [t for _, t in EVAL]
    on = score_documents(retro, db.tokenizer, texts, retriever=db, k=2, progress=False)
    assert pile["models"]["retro_on"]["bpb"] == pytest.approx(on.bpb(), rel=1e-6)
    # RETRO[shuffled] = the scorer fed the same neighbours, permuted by the seeded derangement.
    token_docs = [db.tokenizer.encode(t) for t in texts]
    full = retrieve_document_neighbours(
        db, token_docs, chunk_size=M, k=2, pad_id=retro.config.pad_id, progress=False
    )
    shuffled = score_documents(
        retro, db.tokenizer, texts, neighbours=shuffle_document_neighbours(full), progress=False
    )
    assert pile["models"]["retro_shuffled"]["bpb"] == pytest.approx(shuffled.bpb(), rel=1e-6)
    assert pile["vs_off"]["retro_on"]["delta"] == pytest.approx(
        on.bpb() - pile["models"]["retro_off"]["bpb"], abs=1e-9
    )
    # The demo's summary table has the control's column.
    from retro_eval.demo import summary_table

    table = summary_table(results)
    assert "| RETRO[ON] | RETRO[shuffled] | RETRO[OFF] | baseline | ON - OFF [95%] |" in table
    sub = on.select_documents([0, 2])
    assert pile["subsets"]["Wikipedia (en)"]["retro_on"] == pytest.approx(on.bpb(sub), rel=1e-6)
    assert math.isfinite(pile["models"]["baseline"]["bpb"])
    assert results["stage_times"]["build database"] > 0
    # `retro-eval report` renders the same report again.
    before = (out / "report.md").read_text()
    assert main(["report", str(out / "results.json")]) == 0
    assert (out / "report.md").read_text() == before


@pytest.mark.slow
def _lcs(a, b):
    """Brute-force longest common contiguous substring length."""
    best = 0
    for i in range(len(a)):
        for j in range(len(b)):
            n = 0
            while i + n < len(a) and j + n < len(b) and a[i + n] == b[j + n]:
                n += 1
            best = max(best, n)
    return best


def test_run_with_leakage_buckets(setup):
    """bpb(alpha) of the run equals bits / bytes summed by hand over the chunks with r(C) <= alpha."""
    pytest.importorskip("retro_eval.overlap")
    from retro_core.checkpoint import load_checkpoint
    from retro_db.database import Database
    from retro_eval.perplexity import score_documents

    root = setup
    cfg = _config(
        root,
        database={"path": "db-leak", "build_from": ["pile:train"], "embedder": "hash:32"},
        overlap=["rc", "minhash"],
        output="out2",
        k_sweep=[],
        baseline=None,
        benchmarks=[{"name": "pile", "split": "test"}],
    )
    assert main(["run", "--config", str(cfg)]) == 0
    results = json.loads((root / "out2" / "results.json").read_text())
    pile = results["benchmarks"]["pile"]
    for measure in ("rc", "minhash"):
        bins = pile["bins"][measure]
        assert [b["bin"] for b in bins] == ["[0%, 12.5%]", "(12.5%, 50%]", "(50%, 100%]"]
        assert sum(b["chunks"] for b in bins) == pile["chunks"]
        assert sum(b["bytes"] for b in bins) == pile["bytes"]
        assert set(bins[0]["bpb"]) == {"retro_on", "retro_shuffled", "retro_off"}
        rows = pile["buckets"][measure]
        assert [r["alpha"] for r in rows] == [0.0, 0.125, 0.25, 0.5, 0.75, 1.0]
        assert rows[-1]["chunks"] == pile["chunks"]
        assert rows[-1]["bpb"]["retro_on"] == pytest.approx(pile["models"]["retro_on"]["bpb"])
        for r in rows:
            assert (r["chunks"] == 0) == (r["bpb"]["retro_on"] is None)

    # By hand: score, retrieve 10 neighbours of each chunk, brute-force r(C), sum bits and bytes.
    db = Database.open(root / "db-leak")
    retro = load_checkpoint(root / "retro")
    texts = [t for _, t in EVAL]
    on = score_documents(retro, db.tokenizer, texts, retriever=db, k=2, progress=False)
    off = score_documents(retro, db.tokenizer, texts, progress=False)
    rc = []
    for c in range(on.num_chunks):
        chunk = list(on.chunk_tokens[c, : on.tokens[c]])
        nb = db.retrieve(on.chunk_tokens[c : c + 1], 10, lengths=on.tokens[c : c + 1])
        best = max(_lcs(chunk, list(nb.tokens[0, j, : nb.lengths[0, j]])) for j in range(10))
        rc.append(best / M)
    rc = np.array(rc)
    assert rc.max() == 1.0  # the evaluation document that is also in the database
    # Per bin, by hand: chunk counts, bpb per model, ON - OFF and its interval.
    bins = pile["bins"]["rc"]
    edges = [(0.0, 0.125), (0.125, 0.5), (0.5, 1.0)]
    for b, (lo, hi) in zip(bins, edges, strict=True):
        sel = (rc <= hi) & ((rc > lo) if lo > 0 else (rc >= 0))
        assert b["chunks"] == int(sel.sum())
        if not sel.any():
            assert b["bpb"]["retro_on"] is None and b["vs_off"] == {}
            continue
        for key, res in (("retro_on", on), ("retro_off", off)):
            assert b["bpb"][key] == pytest.approx(res.bits[sel].sum() / res.bytes[sel].sum())
        d = b["vs_off"]["retro_on"]
        assert d["delta"] == pytest.approx(
            (on.bits[sel].sum() - off.bits[sel].sum()) / off.bytes[sel].sum(), abs=1e-9
        )
        assert d["ci95"][0] <= d["delta"] <= d["ci95"][1]
    assert bins[-1]["chunks"] > 0  # the evaluation document the database holds
    for r in pile["buckets"]["rc"]:
        sel = rc <= r["alpha"]
        assert r["chunks"] == int(sel.sum())
        if sel.any():
            for key, res in (("retro_on", on), ("retro_off", off)):
                hand = res.bits[sel].sum() / res.bytes[sel].sum()
                assert r["bpb"][key] == pytest.approx(hand, rel=1e-6)


def test_run_errors_are_one_line(setup, capsys):
    root = setup
    # A database built with another chunk size than the model.
    from retro_db.build import build_database
    from retro_db.ingest import Document

    if not (root / "db16" / "manifest.json").exists():
        build_database(
            [Document("a", "some words here to chunk " * 8, {})],
            root / "db16",
            embedder="hash:16",
            chunk_size=16,
            progress=False,
        )
    cases = [
        (_config(root, database="db16", output="o1"), "chunk_size=16"),
        (
            _config(root, benchmarks=[{"name": "pile", "split": "validation"}], output="o2"),
            "validation",
        ),
        (_config(root, benchmarks=["no/such/bench"], output="o3"), "no/such/bench"),
        (_config(root, retro="missing-ckpt", output="o4"), "missing-ckpt"),
    ]
    for cfg, needle in cases:
        assert main(["run", "--config", str(cfg)]) == 2, needle
        err = capsys.readouterr().err.strip()
        assert err.startswith("retro-eval: error:") and "\n" not in err and needle in err, err
    empty = root / "empty"
    _jsonl(empty / "test.jsonl", [])
    assert main(["run", "--config", str(_config(root, benchmarks=["empty"], output="o5"))]) == 2
    assert "empty" in capsys.readouterr().err
    # a failed run leaves no results behind (outputs resolve under root, as in the end-to-end test)
    for out in ("o1", "o2", "o3", "o4", "o5"):
        assert not (root / out / "results.json").exists(), out


class _ExactPrefix:
    """The test's own retriever: exact L2 search, in numpy, over the keys of some chunk ids."""

    def __init__(self, db, ids):
        self.db, self.ids = db, np.asarray(ids)
        self.chunk_size, self.tokenizer_id = db.chunk_size, db.tokenizer_id
        self.keys = db.keys(self.ids).astype(np.float64)

    def retrieve(self, chunks, k, exclude_doc_ids=None):
        from retro_db.database import RetrievedNeighbours

        q = self.db.embed_chunks(chunks).astype(np.float64)
        d = ((q[:, None] - self.keys[None]) ** 2).sum(-1)
        pos = np.argsort(d, axis=1, kind="stable")[:, :k]
        ids = self.ids[pos]
        rows, lens = self.db.store.neighbour_rows(ids.reshape(-1))
        return RetrievedNeighbours(
            tokens=rows.reshape(len(q), k, -1),
            lengths=lens.reshape(len(q), k),
            chunk_ids=ids,
            distances=np.take_along_axis(d, pos, 1).astype(np.float32),
            pad_id=self.db.pad_id,
        )


def test_run_db_fractions(setup, capsys):
    """The database-size sweep: fraction 1 is RETRO[ON] bit for bit (all chunks and per bin); a
    smaller fraction scores as RETRO[ON] fed exact neighbours from its documents alone, the first
    of the documents in a random order seeded by the run's seed (nested)."""
    from retro_core.checkpoint import load_checkpoint
    from retro_db.database import Database
    from retro_eval.perplexity import score_documents

    root = setup
    cfg = _config(
        root,
        database={"path": "db-frac", "build_from": ["pile:train"], "embedder": "hash:32"},
        overlap=["rc"],
        output="out-frac",
        k_sweep=[],
        baseline=None,
        shuffled=False,
        benchmarks=[{"name": "pile", "split": "test"}],
    )
    capsys.readouterr()
    assert main(["run", "--config", str(cfg), "--db-fractions", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--db-fractions: 'x' is not a fraction" in err
    assert main(["run", "--config", str(cfg), "--db-fractions", "1,1/3,2/3"]) == 0
    out = root / "out-frac"
    pile = json.loads((out / "results.json").read_text())["benchmarks"]["pile"]
    rows = pile["db_fractions"]
    db = Database.open(root / "db-frac")
    assert [r["fraction"] for r in rows] == ["1/3", "2/3", "1"]
    assert [r["documents"] for r in rows] == [1, 2, 3] == [1, 2, db.num_documents]
    n = [r["chunks"] for r in rows]
    assert n[0] < n[1] < n[2] == db.num_chunks
    order = np.random.default_rng(0).permutation(db.num_documents)  # the run's seed, 0
    subsets = [np.flatnonzero(np.isin(db.doc_ids, order[:d])) for d in (1, 2)]
    assert [len(ids) for ids in subsets] == n[:2] and set(subsets[0]) <= set(subsets[1])
    whole = rows[-1]
    assert whole["bpb"] == pile["models"]["retro_on"]["bpb"]
    assert whole["vs_off"] == pile["vs_off"]["retro_on"]
    for mine, theirs in zip(whole["bins"]["rc"], pile["bins"]["rc"], strict=True):
        assert mine["chunks"] == theirs["chunks"]
        assert mine["bpb"] == theirs["bpb"]["retro_on"]
        assert mine["vs_off"] == theirs["vs_off"].get("retro_on")
    retro = load_checkpoint(root / "retro")
    texts = [t for _, t in EVAL]
    for r, ids in zip(rows[:2], subsets, strict=True):
        exact = _ExactPrefix(db, ids)
        res = score_documents(retro, db.tokenizer, texts, retriever=exact, k=2, progress=False)
        assert r["bpb"] == pytest.approx(res.bpb(), rel=1e-6)
    assert rows[0]["bpb"] != whole["bpb"]  # another database, other neighbours
    report = (out / "report.md").read_text()
    assert "### RETRO[ON] against database size" in report and "| 1/3 |" in report
    assert (out / "bpb_vs_db_fraction_pile.png").stat().st_size > 0
