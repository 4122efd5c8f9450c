"""``retro-eval run --config run.yaml``: evaluate RETRO[ON], RETRO[OFF] and a baseline on benchmarks.

With a database, each language-modelling benchmark also gets the control RETRO[shuffled] (RETRO[ON]
fed the neighbours retrieved for another chunk of the same benchmark: ``shuffle_document_neighbours``)
and, per overlap measure, disjoint overlap bins ([0, 12.5%], (12.5%, 50%], (50%, 100%]) with bpb per
model and bpb(model) - bpb(RETRO[OFF]) with a seeded bootstrap 95% interval over chunks. A benchmark
of a single chunk has no shuffled row (there is no other chunk to take neighbours from; logged).

run.yaml (paths relative to the YAML file)::

    retro: runs/retro            # retro_core checkpoint directory (required)
    baseline: runs/baseline      # decoder-only checkpoint (optional)
    tokenizer: null              # tokenizer directory; default the database's, else GPT-2
    database:
      path: runs/db              # an existing retro_db database, or where to build one
      build_from:                # optional: build `path` from these if it holds no database
        - wikitext-mini:train    #   "<benchmark>:<split>" (a pack, path or hub name) or a file/dir
      dedup: true                # first drop build documents whose 13-gram Jaccard >= threshold with
      dedup_threshold: 0.8       #   any evaluation document (retro_db.minhash.dedup_documents)
      embedder: null             # build option (null = all-MiniLM-L6-v2, "hash:64" for tests)
      index_factory: null
    benchmarks:
      - name: wikitext-mini      # a pack, a path in a native format or a hub name
        split: test
        max_documents: null      # keep the first N documents (quick runs)
        max_chars: null          # truncate each document to N characters (quick runs)
      - name: pile-mini          # Pile documents are also reported per pile_set_name
      - name: squad-open-mini    # QA; retrieves from its own `database:` path (built from the
        split: validation        #   benchmark's passage corpus when missing; default
                                 #   <output>/passages-db-<name>), else from `database`
        max_questions: 50
    k: 2                         # neighbours per chunk for RETRO[ON]
    shuffled: true               # also RETRO[shuffled]: RETRO[ON] fed the neighbours retrieved for
                                 #   another chunk of the same benchmark (a seeded derangement)
    seed: 0                      # seeds the shuffle and the bootstrap intervals
    bootstrap_samples: 1000      # resamples for the 95% intervals of bpb(model) - bpb(RETRO[OFF])
    k_sweep: [1, 2, 4, 10]       # extra RETRO[ON] runs (bpb against k); [] to skip
    overlap_k: 10                # neighbours per chunk used for r(C) (the paper: 10)
    window: null                 # n (default the model's max_seq_len)
    stride: null                 # s (default n/2)
    alphas: [0, 0.125, 0.25, 0.5, 0.75, 1.0]
    overlap: [rc, minhash]       # leakage measures for bpb(alpha)
    batch_size: 4
    max_new_tokens: 24           # QA answer length
    methods: [knnlm, incontext, bm25]  # comparison rows (issue 17; default none): kNN-LM and
                                 #   in-context retrieval, read by the baseline (else RETRO with
                                 #   retrieval off, a retro-fitted model's frozen base), and bm25:
                                 #   RETRO[ON] fed BM25's neighbours from the same database's chunks
                                 #   (retro_db.bm25; the model trained with its usual keys);
                                 #   `--methods` overrides
    db_fractions: [1/16, 1/4, 1] # database-size sweep (the paper's figure 1; default none):
                                 #   RETRO[ON] retrieving from that share of the database's
                                 #   documents only (the first of a random order seeded by
                                 #   `seed`), through a real index of those chunks alone
                                 #   (retro_db.prefix; nested; 1 = the database itself), all chunks
                                 #   and per overlap bin; `--db-fractions` overrides
    knnlm:                       # kNN-LM settings (the paper's defaults)
      lambda: 0.25               #   interpolation weight of the row
      k: 1024                    #   neighbours of the row (capped by the datastore's size)
      lambdas: [0, 0.1, 0.25, 0.5]   # the sweep (every lambda x every ks)
      ks: [16, 64, 1024]
      temperature: 1.0
      max_tokens: null           #   datastore over a seeded random subset of the database's
                                 #   documents holding at most this many tokens (null: all its text)
      index_factory: null        #   faiss factory string for a compressed index (null: exact L2)
    output: runs/eval            # results.json, report.md, PNGs, cache/
    cache: true                  # per-document results cached in <output>/cache (resumable)
    cache_group: 8               # documents (questions) per cache entry; 1 = one per document

``retro`` and ``baseline`` each take a training run directory (its latest checkpoint is used and
logged), a checkpoint directory or a retro-fitted checkpoint. A benchmark may be a user's own text
(``{"text"}`` JSONL, ``.txt`` / ``.md`` files or a folder of them; ``text_field: body`` and
``subset_field: source`` name the fields, dotted paths allowed) or a flat QA JSONL whose answers are
NQ-open's ``answer`` list or SQuAD's ``answers`` (a list, or ``{"text": [...]}``).

Resuming (:mod:`retro_eval.cache`): documents are scored in fixed groups of ``cache_group``
consecutive documents and each group's per-document results are stored under ``<output>/cache``,
keyed by the model's checksum, the database's manifest, the settings and the group's own input.
A second run (or a run killed halfway and started again) reuses every stored group and computes the
rest, with identical numbers; progress bars show documents done and the time left.

:func:`run_evaluation` writes ``results.json`` (schema in :mod:`retro_eval.report`), ``report.md`` and
the plots, and returns the results dict.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from retro_core.interface import RetrievalLM

from .compare import METHODS, KnnSettings
from .perplexity import (
    ScoreResult,
    check_retriever_for,
    retrieve_document_neighbours,
    score_token_documents,
    shuffle_document_neighbours,
    shuffled_slots,
)

logger = logging.getLogger(__name__)

__all__ = ["RunConfig", "RunConfigError", "load_run_config", "run_evaluation"]

DEFAULT_ALPHAS = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)


class RunConfigError(ValueError):
    """run.yaml is malformed: the message names the field and what was expected."""


@dataclass
class BenchmarkSpec:
    name: str  # what load_benchmark reads (pack name, resolved path or hub name)
    label: str = ""  # the name shown in results and reports
    split: str | None = None
    max_documents: int | None = None
    max_chars: int | None = None
    max_questions: int | None = None
    database: Path | None = None
    text_field: str = "text"
    subset_field: str | None = None


@dataclass
class DatabaseSpec:
    path: Path
    build_from: list[str] = field(default_factory=list)
    dedup: bool = False
    dedup_threshold: float = 0.8
    embedder: str | None = None
    index_factory: str | None = None


@dataclass
class RunConfig:
    """A parsed run.yaml (see the module docstring)."""

    retro: Path
    output: Path
    benchmarks: list[BenchmarkSpec]
    baseline: Path | None = None
    tokenizer: str | None = None
    database: DatabaseSpec | None = None
    k: int | None = None
    k_sweep: list[int] = field(default_factory=lambda: [1, 2, 4, 10])
    overlap_k: int = 10
    window: int | None = None
    stride: int | None = None
    alphas: list[float] = field(default_factory=lambda: list(DEFAULT_ALPHAS))
    overlap: list[str] = field(default_factory=lambda: ["rc", "minhash"])
    batch_size: int = 4
    max_new_tokens: int = 24
    shuffled: bool = True
    seed: int = 0
    bootstrap_samples: int = 1000
    cache: bool = True
    cache_group: int = 8
    methods: list[str] = field(default_factory=list)
    db_fractions: list[str] = field(default_factory=list)
    knnlm: KnnSettings = field(default_factory=KnnSettings)
    source: str = "run.yaml"

    def to_dict(self) -> dict[str, Any]:
        db = self.database
        return {
            "retro": str(self.retro),
            "output": str(self.output),
            "baseline": str(self.baseline) if self.baseline else None,
            "tokenizer": self.tokenizer,
            "database": str(db.path) if db else None,
            "dedup": bool(db and db.dedup),
            "benchmarks": [b.label or b.name for b in self.benchmarks],
            "k": self.k,
            "k_sweep": list(self.k_sweep),
            "overlap_k": self.overlap_k,
            "window": self.window,
            "stride": self.stride,
            "alphas": list(self.alphas),
            "overlap": list(self.overlap),
            "shuffled": self.shuffled,
            "seed": self.seed,
            "bootstrap_samples": self.bootstrap_samples,
            "cache": self.cache,
            "cache_group": self.cache_group,
            "methods": list(self.methods),
            "db_fractions": list(self.db_fractions),
            **({"knnlm": self.knnlm.to_dict()} if "knnlm" in self.methods else {}),
        }


_TOP_KEYS = {
    "retro", "baseline", "tokenizer", "database", "benchmarks", "k", "k_sweep", "overlap_k",
    "window", "stride", "alphas", "overlap", "batch_size", "max_new_tokens", "output", "checkpoints",
    "shuffled", "seed", "bootstrap_samples", "cache", "cache_group", "methods", "knnlm",
    "db_fractions",
}  # fmt: skip


def _opt_int(d: dict[str, Any], key: str, where: str, minimum: int = 1) -> int | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise RunConfigError(f"{where}: '{key}' must be an integer >= {minimum}, got {v!r}")
    return v


def _path(base: Path, v: Any, where: str) -> Path:
    if not isinstance(v, str) or not v:
        raise RunConfigError(f"{where}: expected a path string, got {v!r}")
    p = Path(v).expanduser()
    return p if p.is_absolute() else (base / p)


def _resolve_source(base: Path, source: str) -> str:
    """``path[:split]`` with a relative path resolved against the config's directory."""
    name, sep, split = source.rpartition(":")
    if not sep or "/" in split:
        name, split = source, ""
    p = Path(name).expanduser()
    if not p.is_absolute() and (base / p).exists():
        name = str(base / p)
    return f"{name}:{split}" if split else name


def parse_run_config(data: Any, base_dir: str | Path = ".", source: str = "run.yaml") -> RunConfig:
    """Validate a run config mapping (paths resolved against ``base_dir``).

    Raises:
        RunConfigError: one line naming the file, the field and what was expected.
    """
    base = Path(base_dir)
    if not isinstance(data, dict):
        raise RunConfigError(f"{source}: expected a mapping at the top level")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise RunConfigError(f"{source}: unknown field(s) {', '.join(unknown)}")
    ckpts = data.get("checkpoints") or {}
    if not isinstance(ckpts, dict):
        raise RunConfigError(f"{source}: 'checkpoints' must map retro/baseline to paths")
    retro = data.get("retro", ckpts.get("retro"))
    if not retro:
        raise RunConfigError(f"{source}: 'retro' (the RETRO checkpoint directory) is required")
    baseline = data.get("baseline", ckpts.get("baseline"))
    benches = data.get("benchmarks")
    if not isinstance(benches, list) or not benches:
        raise RunConfigError(f"{source}: 'benchmarks' must be a non-empty list")
    specs = []
    for i, b in enumerate(benches):
        where = f"{source}: benchmarks[{i}]"
        if isinstance(b, str):
            b = {"name": b}
        if not isinstance(b, dict) or not isinstance(b.get("name", b.get("path")), str):
            raise RunConfigError(f"{where}: expected a name/path string or a mapping with 'name'")
        extra = sorted(
            set(b)
            - {
                "name", "path", "split", "max_documents", "max_chars", "max_questions", "database",
                "text_field", "subset_field",
            }
        )  # fmt: skip
        if extra:
            raise RunConfigError(f"{where}: unknown field(s) {', '.join(extra)}")
        label = str(b.get("name") or b["path"])
        name = str(_path(base, b["path"], where)) if b.get("path") else b["name"]
        if not b.get("path") and not Path(name).is_absolute() and (base / name).exists():
            name = str(base / name)  # a path relative to the config file
        fields = {}
        for key in ("text_field", "subset_field"):
            v = b.get(key)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise RunConfigError(f"{where}: '{key}' must be a field name (dotted), got {v!r}")
            fields[key] = v
        specs.append(
            BenchmarkSpec(
                name=name,
                label=label,
                split=b.get("split"),
                max_documents=_opt_int(b, "max_documents", where),
                max_chars=_opt_int(b, "max_chars", where),
                max_questions=_opt_int(b, "max_questions", where),
                database=_path(base, b["database"], where) if b.get("database") else None,
                text_field=fields["text_field"] or "text",
                subset_field=fields["subset_field"],
            )
        )
    db = None
    if data.get("database") is not None:
        d = data["database"]
        if isinstance(d, str):
            d = {"path": d}
        where = f"{source}: database"
        if not isinstance(d, dict) or "path" not in d:
            raise RunConfigError(f"{where}: expected a path or a mapping with 'path'")
        extra = sorted(
            set(d) - {"path", "build_from", "dedup", "dedup_threshold", "embedder", "index_factory"}
        )
        if extra:
            raise RunConfigError(f"{where}: unknown field(s) {', '.join(extra)}")
        build = d.get("build_from") or []
        if isinstance(build, str):
            build = [build]
        if not isinstance(build, list) or not all(isinstance(s, str) for s in build):
            raise RunConfigError(f"{where}.build_from: expected a list of sources")
        thr = d.get("dedup_threshold", 0.8)
        if not isinstance(thr, int | float) or not 0 < thr <= 1:
            raise RunConfigError(
                f"{where}.dedup_threshold: expected a number in (0, 1], got {thr!r}"
            )
        db = DatabaseSpec(
            path=_path(base, d["path"], where),
            build_from=[_resolve_source(base, s) for s in build],
            dedup=bool(d.get("dedup", False)),
            dedup_threshold=float(thr),
            embedder=d.get("embedder"),
            index_factory=d.get("index_factory"),
        )
    ks = data.get("k_sweep", [1, 2, 4, 10]) or []
    if not isinstance(ks, list) or not all(isinstance(k, int) and k >= 1 for k in ks):
        raise RunConfigError(f"{source}: 'k_sweep' must be a list of integers >= 1, got {ks!r}")
    alphas = data.get("alphas", list(DEFAULT_ALPHAS))
    if (
        not isinstance(alphas, list)
        or not alphas
        or not all(isinstance(a, int | float) and 0 <= a <= 1 for a in alphas)
    ):
        raise RunConfigError(
            f"{source}: 'alphas' must be a list of fractions in [0, 1], got {alphas!r}"
        )
    overlap = data.get("overlap", ["rc", "minhash"]) or []
    if not isinstance(overlap, list) or not set(overlap) <= {"rc", "minhash"}:
        raise RunConfigError(f"{source}: 'overlap' must be a list of rc / minhash, got {overlap!r}")
    shuffled = data.get("shuffled", True)
    if not isinstance(shuffled, bool):
        raise RunConfigError(f"{source}: 'shuffled' must be true or false, got {shuffled!r}")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise RunConfigError(f"{source}: 'seed' must be an integer >= 0, got {seed!r}")
    cache = data.get("cache", True)
    if not isinstance(cache, bool):
        raise RunConfigError(f"{source}: 'cache' must be true or false, got {cache!r}")
    methods = parse_methods(data.get("methods") or [], f"{source}: methods")
    knn = _parse_knnlm(data.get("knnlm"), f"{source}: knnlm")
    fractions = parse_db_fractions(data.get("db_fractions") or [], f"{source}: db_fractions")
    out = data.get("output")
    if not out:
        raise RunConfigError(f"{source}: 'output' (the output directory) is required")
    tok = data.get("tokenizer")
    return RunConfig(
        retro=_path(base, retro, f"{source}: retro"),
        baseline=_path(base, baseline, f"{source}: baseline") if baseline else None,
        tokenizer=str(_path(base, tok, f"{source}: tokenizer")) if tok else None,
        output=_path(base, out, f"{source}: output"),
        benchmarks=specs,
        database=db,
        k=_opt_int(data, "k", source),
        k_sweep=sorted(set(ks)),
        overlap_k=_opt_int(data, "overlap_k", source) or 10,
        window=_opt_int(data, "window", source),
        stride=_opt_int(data, "stride", source),
        alphas=sorted(float(a) for a in alphas),
        overlap=list(overlap),
        batch_size=_opt_int(data, "batch_size", source) or 4,
        max_new_tokens=_opt_int(data, "max_new_tokens", source) or 24,
        shuffled=shuffled,
        seed=seed,
        bootstrap_samples=_opt_int(data, "bootstrap_samples", source) or 1000,
        cache=cache,
        cache_group=_opt_int(data, "cache_group", source) or 8,
        methods=methods,
        db_fractions=fractions,
        knnlm=knn,
        source=source,
    )


def parse_methods(value: Any, where: str = "methods") -> list[str]:
    """The comparison methods: a list (or comma-separated string) of knnlm / incontext; "none"
    or empty = none.

    Raises:
        RunConfigError: an unknown method.
    """
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RunConfigError(f"{where}: expected a list of {', '.join(METHODS)}, got {value!r}")
    if value == ["none"]:
        return []
    bad = [v for v in value if v not in METHODS]
    if bad:
        raise RunConfigError(
            f"{where}: unknown method(s) {', '.join(bad)} (expected {', '.join(METHODS)} or none)"
        )
    return [m for m in METHODS if m in value]


def parse_db_fractions(value: Any, where: str = "db_fractions") -> list[str]:
    """The database fractions of the size sweep: a list (or comma-separated string) of numbers
    or ratios in (0, 1] (``1/16``, ``0.25``, ``1``); "none" or empty = no sweep. Returns them
    ascending, without repeats, as canonical ratios (``"1/16"``, ``"1"``).

    Raises:
        RunConfigError: a value that is not a fraction in (0, 1].
    """
    from fractions import Fraction

    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [v.strip() for v in str(value).split(",") if v.strip()]
    if not isinstance(value, list) or any(isinstance(v, bool) for v in value):
        raise RunConfigError(f"{where}: expected a list of fractions in (0, 1], got {value!r}")
    if [str(v) for v in value] == ["none"]:
        return []
    out = set()
    for v in value:
        try:
            f = Fraction(str(v).strip())
        except (ValueError, ZeroDivisionError):
            raise RunConfigError(f"{where}: {v!r} is not a fraction (expected e.g. 1/16)") from None
        if not 0 < f <= 1:
            raise RunConfigError(f"{where}: {v!r} is outside (0, 1]")
        out.add(f)
    return [str(f) for f in sorted(out)]


def _parse_knnlm(d: Any, where: str) -> KnnSettings:
    if d is None:
        return KnnSettings()
    if not isinstance(d, dict):
        raise RunConfigError(f"{where}: expected a mapping")
    extra = sorted(
        set(d) - {"lambda", "k", "lambdas", "ks", "temperature", "max_tokens", "index_factory"}
    )
    if extra:
        raise RunConfigError(f"{where}: unknown field(s) {', '.join(extra)}")
    out = KnnSettings()

    def frac(v: Any, key: str) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
            raise RunConfigError(f"{where}.{key}: expected a weight in [0, 1], got {v!r}")
        return float(v)

    def count(v: Any, key: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise RunConfigError(f"{where}.{key}: expected an integer >= 1, got {v!r}")
        return int(v)

    if "lambda" in d:
        out.lmbda = frac(d["lambda"], "lambda")
    if "k" in d:
        out.k = count(d["k"], "k")
    for key, conv in (("lambdas", frac), ("ks", count)):
        if key in d:
            v = d[key]
            if not isinstance(v, list) or not v:
                raise RunConfigError(f"{where}.{key}: expected a non-empty list, got {v!r}")
            setattr(out, key, sorted({conv(x, key) for x in v}))
    if "temperature" in d:
        t = d["temperature"]
        if isinstance(t, bool) or not isinstance(t, int | float) or not t > 0:
            raise RunConfigError(f"{where}.temperature: expected a number > 0, got {t!r}")
        out.temperature = float(t)
    if d.get("max_tokens") is not None:
        out.max_tokens = count(d["max_tokens"], "max_tokens")
    if d.get("index_factory") is not None:
        if not isinstance(d["index_factory"], str) or not d["index_factory"].strip():
            raise RunConfigError(f"{where}.index_factory: expected a faiss factory string")
        out.index_factory = d["index_factory"]
    return out


def load_run_config(path: str | Path) -> RunConfig:
    """Read and validate run.yaml (one-line RunConfigError on any problem)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise RunConfigError(f"{p}: no such config file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RunConfigError(f"{p}: not valid YAML{where}") from None
    return parse_run_config(data, p.parent, str(p))


# ----------------------------------------------------------------------------------------------


class _Timer:
    def __init__(self, times: dict[str, float], name: str) -> None:
        self.times, self.name = times, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.times[self.name] = self.times.get(self.name, 0.0) + time.perf_counter() - self.t0


def _load_bench(spec: BenchmarkSpec) -> Any:
    from .benchmarks import load_benchmark

    bench = load_benchmark(
        spec.name, spec.split, text_field=spec.text_field, subset_field=spec.subset_field
    )
    bench.name = spec.label or spec.name
    if spec.max_documents and bench.kind == "lm":
        bench.documents = bench.documents[: spec.max_documents]
    if spec.max_chars and bench.kind == "lm":
        bench.documents = [_truncate(d, spec.max_chars) for d in bench.documents]
    if spec.max_questions and bench.kind == "qa":
        bench.examples = bench.examples[: spec.max_questions]
    return bench


def _truncate(doc: Any, max_chars: int) -> Any:
    """The document cut to max_chars characters; a cut one loses its (now wrong) word count."""
    if len(doc.text) <= max_chars:
        return doc
    meta = {k: v for k, v in (doc.meta or {}).items() if k not in ("words", "raw_bytes")}
    return dataclasses.replace(doc, text=doc.text[:max_chars], meta=meta)


def _source_documents(source: str) -> list[Any]:
    """Documents of a build source: ``<benchmark>:<split>`` or a benchmark name/path (its train split)."""
    from .benchmarks import load_benchmark

    name, sep, split = source.rpartition(":")
    if not sep or "/" in split:
        name, split = source, "train"
    bench = load_benchmark(name, split)
    return list(bench.corpus or []) if bench.kind == "qa" else list(bench.documents)


def _to_db_documents(docs: Sequence[Any]) -> list[Any]:
    from retro_db.ingest import Document

    return [Document(doc_id=str(d.doc_id), text=d.text, meta=dict(d.meta or {})) for d in docs]


def _open_database(path: Path) -> Any:
    from retro_db.database import Database

    return Database.open(path)


def _is_database(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def _build_database(
    path: Path,
    docs: list[Any],
    spec: DatabaseSpec | None,
    tokenizer: Any,
    chunk_size: int,
) -> Any:
    from retro_db.build import build_database

    if not docs:
        raise RunConfigError(f"database {path}: nothing to build it from (no documents)")
    return build_database(
        _to_db_documents(docs),
        path,
        tokenizer=tokenizer,
        embedder=spec.embedder if spec else None,
        chunk_size=chunk_size,
        index_factory=spec.index_factory if spec else None,
        progress=False,
    )


def _dedup(
    docs: list[Any], eval_texts: list[str], tokenizer: Any, threshold: float
) -> tuple[list[Any], dict[str, Any]]:
    from retro_db.minhash import dedup_documents

    report = dedup_documents(
        (tokenizer.encode(d.text) for d in docs),
        [tokenizer.encode(t) for t in eval_texts],
        threshold=threshold,
    )
    kept = [docs[int(i)] for i in report.kept]
    logger.info("dedup: removed %d of %d build documents", len(report.removed), len(docs))
    return kept, report.to_dict()


def _buckets(
    values: np.ndarray, alphas: Sequence[float], scores: dict[str, ScoreResult]
) -> list[dict[str, Any]]:
    """bpb of the chunks with overlap <= alpha, per alpha and model (``overlap.bucket_bpb``).

    All models share the evaluation chunks (same documents, same m), so one overlap array serves all.
    An empty bucket has ``chunks == 0`` and null bpb.
    """
    from .overlap import bucket_bpb

    per_model = {
        name: bucket_bpb(res.bits, res.bytes, values, alphas) for name, res in scores.items()
    }
    rows = []
    for j, a in enumerate(alphas):
        first = next(iter(per_model.values()))[j]
        rows.append(
            {
                "alpha": float(a),
                "chunks": int(first["chunks"]),
                "bytes": int(first["bytes"]),
                "bpb": {name: per_model[name][j]["bpb"] for name in scores},
            }
        )
    return rows


#: the models compared with RETRO[OFF] (bpb difference with a bootstrap interval).
_VS_OFF = ("retro_on", "retro_shuffled", "retro_bm25", "knnlm", "incontext")


def _vs_off(
    scores: dict[str, ScoreResult], sel: np.ndarray | None, cfg: RunConfig
) -> dict[str, dict[str, Any]]:
    """bpb(model) - bpb(RETRO[OFF]) over the selected chunks (all when None), with the bootstrap
    95% interval (``overlap.bootstrap_bpb_difference``), for RETRO[ON] and RETRO[shuffled]."""
    from .overlap import bootstrap_bpb_difference

    off = scores.get("retro_off")
    out: dict[str, dict[str, Any]] = {}
    if off is None:
        return out
    for key in _VS_OFF:
        res = scores.get(key)
        if res is None or res.num_chunks != off.num_chunks:
            continue
        idx = slice(None) if sel is None else sel
        est, lo, hi = bootstrap_bpb_difference(
            res.bits[idx],
            off.bits[idx],
            off.bytes[idx],
            samples=cfg.bootstrap_samples,
            seed=cfg.seed,
        )
        out[key] = {"delta": est, "ci95": [lo, hi]}
    return out


def _bins(
    values: np.ndarray, scores: dict[str, ScoreResult], cfg: RunConfig
) -> list[dict[str, Any]]:
    """Disjoint overlap bins (``overlap.BIN_EDGES``): chunk counts, bytes, bpb per model and each
    retrieval model's bpb difference from RETRO[OFF] with its bootstrap 95% interval.

    Models with another chunk count than the overlap array (a baseline with its own m) are left out.
    An empty bin has ``chunks == 0``, null bpb and no differences.
    """
    from .overlap import BIN_EDGES, bin_labels, bin_totals, overlap_bins

    nb = len(BIN_EDGES) - 1
    bins = overlap_bins(values, BIN_EDGES)
    same = {k: r for k, r in scores.items() if r.num_chunks == len(values)}
    totals = {k: bin_totals(r.bits, r.bytes, bins, nb) for k, r in same.items()}
    rows = []
    for b, label in enumerate(bin_labels(BIN_EDGES)):
        first = next(iter(totals.values()))
        chunks, nbytes = int(first[2][b]), int(first[1][b])
        sel = bins == b
        rows.append(
            {
                "bin": label,
                "lower": float(BIN_EDGES[b]),
                "upper": float(BIN_EDGES[b + 1]),
                "chunks": chunks,
                "bytes": nbytes,
                "bpb": {
                    k: (float(t[0][b]) / nbytes if nbytes else None) for k, t in totals.items()
                },
                "vs_off": _vs_off(same, sel, cfg) if nbytes else {},
            }
        )
    return rows


def _overlap_values(
    measure: str, res: ScoreResult, minhash_index: Any, overlap_k: int
) -> np.ndarray:
    """float [C] overlap of each evaluation chunk with the database: r(C) with the first
    ``overlap_k`` neighbours retrieved for C itself, or the MinHash Jaccard with the most similar
    database chunk."""
    from . import overlap as ov

    if measure == "rc":
        return ov.chunk_overlap_ratios(
            res.chunk_tokens,
            res.tokens,
            res.neighbour_tokens[:, :overlap_k],
            res.neighbour_lengths[:, :overlap_k],
            chunk_size=res.chunk_size,
        )
    return ov.minhash_overlaps(res.chunk_tokens, res.tokens, minhash_index)


def _summary(res: ScoreResult, words: int | None) -> dict[str, Any]:
    out = {"bpb": res.bpb(), "bits": res.total_bits(), "bytes": res.total_bytes()}
    out["bits_per_token"] = res.bits_per_token()
    out["word_perplexity"] = res.word_perplexity(words) if words else None
    return out


class _Models:
    """The loaded models, their checksums (cache keys) and the run's result cache."""

    def __init__(self, retro: Any, baseline: Any, cache: Any) -> None:
        from .cache import model_checksum

        self.retro, self.baseline, self.cache = retro, baseline, cache
        self.retro_sum = model_checksum(retro) if cache.directory is not None else ""
        self.baseline_sum = (
            model_checksum(baseline) if baseline is not None and cache.directory is not None else ""
        )


def _groups(n: int, size: int) -> list[range]:
    """Fixed groups of consecutive items (the cache's unit): [0, size), [size, 2 size), ..."""
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def _retrieve_cached(
    db: Any,
    token_docs: list[list[int]],
    groups: list[range],
    group_sums: list[str],
    *,
    m: int,
    k: int,
    pad: int,
    cache: Any,
    label: str,
) -> list[Any]:
    """retrieve_document_neighbours per group, each group's neighbours cached (when the database
    has a manifest to key them by)."""
    from tqdm.auto import tqdm

    from .cache import cache_key, retriever_checksum
    from .perplexity import DocumentNeighbours

    db_sum = retriever_checksum(db)
    out: list[Any] = [None] * len(token_docs)
    todo = []
    for gi, g in enumerate(groups):
        key = cache_key("retrieve", db_sum, m, k, pad, group_sums[gi]) if db_sum else None
        data = cache.get_arrays(key) if key else None
        counts = [math.ceil(len(token_docs[i]) / m) for i in g]
        if data is not None and (
            data["tokens"].shape[:2] != (sum(counts), k) or list(data["counts"]) != counts
        ):
            data = None
        if data is None:
            todo.append((gi, key))
            continue
        off = 0
        for i, c in zip(g, counts, strict=True):
            out[i] = DocumentNeighbours(
                data["tokens"][off : off + c],
                data["lengths"][off : off + c],
                data["chunk_ids"][off : off + c],
            )
            off += c
    done = len(token_docs) - sum(len(groups[gi]) for gi, _ in todo)
    with tqdm(total=len(token_docs), initial=done, desc=label, unit="doc") as bar:
        for gi, key in todo:
            g = groups[gi]
            nbs = retrieve_document_neighbours(
                db, [token_docs[i] for i in g], chunk_size=m, k=k, pad_id=pad, progress=False
            )
            for i, nb in zip(g, nbs, strict=True):
                out[i] = nb
            if key is not None:
                cache.put_arrays(
                    key,
                    {
                        "tokens": np.concatenate([nb.tokens for nb in nbs]),
                        "lengths": np.concatenate([nb.lengths for nb in nbs]),
                        "chunk_ids": np.concatenate([nb.chunk_ids for nb in nbs]),
                        "counts": np.array([nb.tokens.shape[0] for nb in nbs], dtype=np.int64),
                    },
                )
            bar.update(len(g))
    return out


_SCORE_ARRAYS = ("bits", "bytes", "tokens", "doc_index", "chunk_index", "chunk_tokens")


def _score_cached(
    model: RetrievalLM,
    model_sum: str,
    token_docs: list[list[int]],
    groups: list[range],
    group_sums: list[str],
    neighbours: Sequence[Any] | None,
    common: dict[str, Any],
    settings: dict[str, Any],
    cache: Any,
    label: str,
) -> ScoreResult:
    """score_token_documents group by group (each group's per-document results cached), merged
    into one ScoreResult over all documents. A group is always scored alone, so a cached group and
    a computed one give the same numbers."""
    from tqdm.auto import tqdm

    from .cache import arrays_checksum, cache_key
    from .perplexity import model_geometry

    m = int(model_geometry(model)[1])
    parts: list[dict[str, np.ndarray] | None] = [None] * len(groups)
    keys = []
    for gi, g in enumerate(groups):
        nb_sum = None
        if neighbours is not None:
            nb_sum = arrays_checksum(
                [a for i in g for a in (neighbours[i].tokens, neighbours[i].lengths)]
            )
        key = cache_key("score", model_sum, settings, group_sums[gi], nb_sum)
        keys.append(key)
        data = cache.get_arrays(key) if model_sum else None
        want = sum(math.ceil(len(token_docs[i]) / m) for i in g)
        if data is not None and all(n in data for n in _SCORE_ARRAYS):
            if all(len(data[n]) == want for n in _SCORE_ARRAYS):
                parts[gi] = data
    todo = [gi for gi in range(len(groups)) if parts[gi] is None]
    done = len(token_docs) - sum(len(groups[gi]) for gi in todo)
    geometry = None
    with tqdm(total=len(token_docs), initial=done, desc=label, unit="doc") as bar:
        for gi in todo:
            g = groups[gi]
            res = score_token_documents(
                model,
                [token_docs[i] for i in g],
                neighbours=None if neighbours is None else [neighbours[i] for i in g],
                keep_neighbours=False,
                progress=False,
                **common,
            )
            geometry = (res.window, res.stride, res.pad_id)
            data = {n: getattr(res, n) for n in _SCORE_ARRAYS}
            if model_sum:
                cache.put_arrays(keys[gi], data)
            parts[gi] = data
            bar.update(len(g))
    if geometry is None:
        from .perplexity import default_window_stride

        n, st = default_window_stride(model, common.get("window"), common.get("stride"))
        geometry = (n, st, int(model_geometry(model)[3]))
    merged = {
        n: np.concatenate(
            [
                (p[n] + g.start) if n == "doc_index" else p[n]
                for p, g in zip(parts, groups, strict=True)
                if p is not None
            ]
        )
        for n in _SCORE_ARRAYS
    }
    k = None
    if neighbours is not None and neighbours:
        k = int(neighbours[0].tokens.shape[1])
    return ScoreResult(
        chunk_size=m,
        doc_index=merged["doc_index"].astype(np.int64),
        chunk_index=merged["chunk_index"].astype(np.int64),
        bits=merged["bits"].astype(np.float64),
        bytes=merged["bytes"].astype(np.int64),
        tokens=merged["tokens"].astype(np.int64),
        chunk_tokens=merged["chunk_tokens"].astype(np.int64),
        k=k,
        window=int(geometry[0]),
        stride=int(geometry[1]),
        pad_id=int(geometry[2]),
        num_documents=len(token_docs),
    )


def _eval_lm(
    bench: Any,
    cfg: RunConfig,
    models: _Models,
    db: Any,
    tokenizer: Any,
    times: dict,
    cache: dict[str, Any],
) -> dict[str, Any]:
    from .cache import tokens_checksum

    retro, baseline, rc = models.retro, models.baseline, models.cache
    docs = bench.documents
    texts = [d.text for d in docs]
    token_docs = [tokenizer.encode(t) for t in texts]
    empty = [d.doc_id for d, t in zip(docs, token_docs, strict=True) if not t]
    if empty:
        logger.warning("%s: skipping %d empty documents", bench.name, len(empty))
        keep = [i for i, t in enumerate(token_docs) if t]
        docs = [docs[i] for i in keep]
        token_docs = [token_docs[i] for i in keep]
    if not docs:
        raise RunConfigError(f"benchmark {bench.name}: empty (no scorable documents)")
    words = None
    if all("words" in (d.meta or {}) for d in docs):
        words = int(sum(int(d.meta["words"]) for d in docs))
    m = int(retro.config.chunk_size)
    pad = int(retro.config.pad_id)
    eos = getattr(tokenizer, "eos_id", None)
    prefix = int(eos if eos is not None else pad)
    k = cfg.k or int(retro.config.num_neighbours)
    common = dict(
        decode=tokenizer.decode,
        prefix_id=prefix,
        window=cfg.window,
        stride=cfg.stride,
        batch_size=cfg.batch_size,
    )
    groups = _groups(len(token_docs), cfg.cache_group)
    group_sums = [tokens_checksum([token_docs[i] for i in g]) for g in groups]
    settings = {
        "window": cfg.window,
        "stride": cfg.stride,
        "batch_size": cfg.batch_size,
        "prefix": prefix,
        "tokenizer": str(getattr(tokenizer, "id", type(tokenizer).__name__)),
    }
    name = bench.name

    speed: dict[str, dict[str, Any]] = {}

    def score(model: RetrievalLM, model_sum: str, neighbours: Any, label: str) -> ScoreResult:
        t0, misses = time.perf_counter(), rc.misses
        res = _score_cached(
            model, model_sum, token_docs, groups, group_sums, neighbours, common, settings, rc,
            f"{name}: {label}",
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        cached = bool(model_sum) and rc.directory is not None and rc.misses == misses
        tokens = int(res.tokens.sum())
        speed[label] = {
            "seconds": seconds,
            "tokens": tokens,
            "tokens_per_s": None if cached or seconds <= 0 else tokens / seconds,
            "cached": cached,
        }
        return res

    scores: dict[str, ScoreResult] = {}
    sweep: list[dict[str, Any]] = []
    if db is not None:
        kmax = max([k, *cfg.k_sweep, cfg.overlap_k if "rc" in cfg.overlap else 1])
        with _Timer(times, f"{name}: retrieval"):
            full = _retrieve_cached(
                db, token_docs, groups, group_sums, m=m, k=kmax, pad=pad, cache=rc,
                label=f"{name}: retrieval",
            )  # fmt: skip
        with _Timer(times, f"{name}: RETRO[ON]"):
            scores["retro_on"] = score(
                retro, models.retro_sum, [nb.first(k) for nb in full], "RETRO[ON]"
            )
            for kk in cfg.k_sweep:
                r = (
                    scores["retro_on"]
                    if kk == k
                    else score(
                        retro, models.retro_sum, [nb.first(kk) for nb in full], f"RETRO[ON] k={kk}"
                    )
                )
                sweep.append({"k": kk, "bpb": r.bpb()})
        shuffle_info: dict[str, Any] | None = None
        if cfg.shuffled:
            doc = np.repeat(np.arange(len(full)), [nb.tokens.shape[0] for nb in full])
            if len(doc) < 2:
                logger.warning(
                    "%s: a single evaluation chunk: no RETRO[shuffled] row (no other chunk to "
                    "take neighbours from)",
                    name,
                )
            else:
                with _Timer(times, f"{name}: RETRO[shuffled]"):
                    scores["retro_shuffled"] = score(
                        retro,
                        models.retro_sum,
                        shuffle_document_neighbours([nb.first(k) for nb in full], seed=cfg.seed),
                        "RETRO[shuffled]",
                    )
                src = shuffled_slots(doc, seed=cfg.seed)
                shuffle_info = {
                    "seed": cfg.seed,
                    "same_document_chunks": int((doc[src] == doc).sum()),
                }
        on = [nb.first(k) for nb in full]
        full_res = dataclasses.replace(
            scores["retro_on"],
            neighbour_tokens=np.concatenate([nb.tokens for nb in full]),
            neighbour_lengths=np.concatenate([nb.lengths for nb in full]),
            neighbour_ids=np.concatenate([nb.chunk_ids for nb in on]),
        )
    with _Timer(times, f"{name}: RETRO[OFF]"):
        scores["retro_off"] = score(retro, models.retro_sum, None, "RETRO[OFF]")
    if baseline is not None:
        with _Timer(times, f"{name}: baseline"):
            scores["baseline"] = score(baseline, models.baseline_sum, None, "baseline")
    speed = {
        key: speed[label]
        for key, label in (
            ("retro_on", "RETRO[ON]"), ("retro_shuffled", "RETRO[shuffled]"),
            ("retro_off", "RETRO[OFF]"), ("baseline", "baseline"),
        )
        if key in scores and label in speed
    }  # fmt: skip
    method_info: dict[str, Any] = {}
    if cfg.methods:
        method_info = _eval_methods(
            cfg, models, db, token_docs, full if db is not None else None, groups, group_sums,
            common, settings, scores, speed, times, cache, name,
        )  # fmt: skip
    any_res = next(iter(scores.values()))
    out: dict[str, Any] = {
        "kind": "lm",
        "split": bench.split,
        "source": bench.source,
        "documents": len(docs),
        "chunks": any_res.num_chunks,
        "tokens": int(any_res.tokens.sum()),
        "bytes": any_res.total_bytes(),
        "words": words,
        "window": any_res.window,
        "stride": any_res.stride,
        "models": {key: _summary(res, words) for key, res in scores.items()},
        "k": k if db is not None else None,
        "k_sweep": sweep,
        "buckets": {},
        "bins": {},
    }
    if db is not None:
        out["shuffle"] = shuffle_info
        out["bootstrap"] = {"samples": cfg.bootstrap_samples, "seed": cfg.seed, "level": 0.95}
        out["vs_off"] = _vs_off(scores, None, cfg)
    values_by_measure: dict[str, np.ndarray] = {}
    if db is not None:
        for measure in cfg.overlap:
            index = None
            if measure == "minhash":
                if "minhash_index" not in cache:
                    from .overlap import build_minhash_index

                    with _Timer(times, "MinHash index of the database"):
                        cache["minhash_index"] = build_minhash_index(db)
                index = cache["minhash_index"]
            with _Timer(times, f"{name}: overlap {measure}"):
                values = _overlap_values(measure, full_res, index, cfg.overlap_k)
            values_by_measure[measure] = values
            out["buckets"][measure] = _buckets(values, cfg.alphas, scores)
            out["bins"][measure] = _bins(values, scores, cfg)
    if db is None and cfg.db_fractions:
        logger.warning("%s: the database-size sweep needs a database: no db_fractions rows", name)
    if db is not None and cfg.db_fractions:
        out["db_fractions"] = _eval_fractions(
            cfg, models, db, token_docs, full, groups, group_sums, scores, values_by_measure,
            score, times, cache, name,
        )  # fmt: skip
    # timings are not results: they go to results.json's top-level "speed" (run_evaluation)
    cache["speed_of_last_benchmark"] = speed
    if cfg.methods:
        from .compare import comparison_table

        out["methods"] = method_info
        out["comparison"] = comparison_table(
            scores, values_by_measure, samples=cfg.bootstrap_samples, seed=cfg.seed
        )
    subsets: dict[str, list[int]] = {}
    for i, d in enumerate(docs):
        s = (d.meta or {}).get("subset", (d.meta or {}).get("pile_set_name"))
        if s:
            subsets.setdefault(str(s), []).append(i)
    if subsets:
        out["subsets"] = {
            s: {key: res.bpb(res.select_documents(idx)) for key, res in scores.items()}
            for s, idx in subsets.items()
        }
    return out


def _eval_fractions(
    cfg: RunConfig,
    models: _Models,
    db: Any,
    token_docs: list[list[int]],
    full: list[Any],
    groups: list[range],
    group_sums: list[str],
    scores: dict[str, ScoreResult],
    values_by_measure: dict[str, np.ndarray],
    score: Any,
    times: dict,
    cache: dict[str, Any],
    name: str,
) -> list[dict[str, Any]]:
    """The database-size sweep of one benchmark: per fraction, RETRO[ON] fed the k neighbours
    retrieved from that fraction of the database's documents, the first ones of a random order
    seeded by the run's seed (``retro_db.prefix.subset_chunks``: nested; an index of those chunks
    alone, built once per run and fraction; fraction 1 is the database itself and reuses
    RETRO[ON]'s neighbours), its bpb and difference from RETRO[OFF] over all chunks and per
    overlap bin (bins by each chunk's overlap with the whole database, as in ``bins``)."""
    from retro_db.prefix import PrefixRetriever, subset_chunks

    retro = models.retro
    k = int(scores["retro_on"].k or 0) or cfg.k or int(retro.config.num_neighbours)
    m, pad = int(retro.config.chunk_size), int(retro.config.pad_id)
    rows = []
    for frac in cfg.db_fractions:
        ids = subset_chunks(db.doc_ids, db.num_documents, Fraction(frac), seed=cfg.seed)
        n = len(ids)
        if n == db.num_chunks:
            nbs, docs = [nb.first(k) for nb in full], db.num_documents
        else:
            if f"subset:{frac}" not in cache:
                with _Timer(times, f"database {frac}: index of {n} chunks"):
                    cache[f"subset:{frac}"] = PrefixRetriever(db, ids, train_seed=cfg.seed)
            sub = cache[f"subset:{frac}"]
            docs = sub.num_documents
            with _Timer(times, f"{name}: retrieval, database {frac}"):
                nbs = _retrieve_cached(
                    sub, token_docs, groups, group_sums, m=m, k=k, pad=pad, cache=models.cache,
                    label=f"{name}: retrieval, database {frac}",
                )  # fmt: skip
        with _Timer(times, f"{name}: RETRO[ON], database {frac}"):
            res = score(retro, models.retro_sum, nbs, f"RETRO[ON] database {frac}")
        pair = {"retro_on": res, "retro_off": scores["retro_off"]}
        rows.append(
            {
                "fraction": frac,
                "chunks": n,
                "documents": docs,
                "bpb": res.bpb(),
                "vs_off": _vs_off(pair, None, cfg).get("retro_on"),
                "bins": {
                    measure: [
                        {key: r[key] for key in ("bin", "chunks", "bytes")}
                        | {"bpb": r["bpb"].get("retro_on"), "vs_off": r["vs_off"].get("retro_on")}
                        for r in _bins(values, pair, cfg)
                    ]
                    for measure, values in values_by_measure.items()
                },
            }
        )
    return rows


def _eval_methods(
    cfg: RunConfig,
    models: _Models,
    db: Any,
    token_docs: list[list[int]],
    full: list[Any] | None,
    groups: list[range],
    group_sums: list[str],
    common: dict[str, Any],
    settings: dict[str, Any],
    scores: dict[str, ScoreResult],
    speed: dict[str, dict[str, Any]],
    times: dict,
    cache: dict[str, Any],
    name: str,
) -> dict[str, Any]:
    """The comparison rows (``compare.score_method_rows``) of one benchmark, added to ``scores``
    and ``speed``; returns what they read and the kNN-LM datastore and sweep."""
    from .cache import retriever_checksum
    from .compare import method_model, score_method_rows

    if db is None:
        logger.warning("%s: the comparison methods need a database: no rows", name)
        return {}
    model, reads = method_model(models.retro, models.baseline)
    model_sum = models.baseline_sum if model is models.baseline else models.retro_sum

    def datastore() -> Any:
        if "knn_datastore" not in cache:
            from .knnlm import build_datastore, database_documents

            with _Timer(times, "kNN-LM datastore"):
                db_docs, db_index = database_documents(db)
                cache["knn_datastore"] = build_datastore(
                    model, db_docs, db_index, prefix_id=common["prefix_id"],
                    window=cfg.window, stride=cfg.stride, batch_size=cfg.batch_size,
                    index_factory=cfg.knnlm.index_factory, max_tokens=cfg.knnlm.max_tokens,
                    seed=cfg.seed,
                )  # fmt: skip
        return cache["knn_datastore"]

    k_first = [nb.first(1) for nb in full] if full is not None else None
    collected: dict[str, Any] = {}
    if "bm25" in cfg.methods:
        _eval_bm25(cfg, models, db, token_docs, groups, group_sums, common, settings, scores,
                   speed, times, cache, name)  # fmt: skip
    for method in (m for m in cfg.methods if m != "bm25"):
        with _Timer(times, f"{name}: {method}"):
            rows, sp, info = score_method_rows(
                [method], model, model_sum, token_docs, k_first, groups=groups,
                group_sums=group_sums, common=common, settings={**settings, "seed": cfg.seed},
                cache=models.cache,
                knn=cfg.knnlm, datastore=datastore, db=db, db_sum=retriever_checksum(db),
                label=name,
            )  # fmt: skip
        scores.update(rows)
        speed.update(sp)
        collected.update(info)
    return {"reads": reads, **collected}


def _eval_bm25(
    cfg: RunConfig,
    models: _Models,
    db: Any,
    token_docs: list[list[int]],
    groups: list[range],
    group_sums: list[str],
    common: dict[str, Any],
    settings: dict[str, Any],
    scores: dict[str, ScoreResult],
    speed: dict[str, dict[str, Any]],
    times: dict,
    cache: dict[str, Any],
    name: str,
) -> None:
    """The row ``retro_bm25``: RETRO[ON] fed the k neighbours BM25 retrieves (``retro_db.bm25``,
    an in-memory index of the run database's chunks, built once per run)."""
    from retro_db.bm25 import BM25Retriever

    retro = models.retro
    if "bm25_retriever" not in cache:
        with _Timer(times, "BM25 index of the database"):
            cache["bm25_retriever"] = BM25Retriever(db)
    k = cfg.k or int(retro.config.num_neighbours)
    with _Timer(times, f"{name}: BM25 retrieval"):
        nbs = retrieve_document_neighbours(
            cache["bm25_retriever"], token_docs, chunk_size=int(retro.config.chunk_size), k=k,
            pad_id=int(retro.config.pad_id), progress=False,
        )  # fmt: skip
    with _Timer(times, f"{name}: RETRO[ON] BM25"):
        t0, misses = time.perf_counter(), models.cache.misses
        res = _score_cached(
            retro, models.retro_sum, token_docs, groups, group_sums, nbs, common, settings,
            models.cache, f"{name}: RETRO[ON] BM25",
        )  # fmt: skip
        seconds = time.perf_counter() - t0
    cached = bool(models.retro_sum) and models.cache.directory is not None
    cached = cached and models.cache.misses == misses
    tokens = int(res.tokens.sum())
    scores["retro_bm25"] = res
    speed["retro_bm25"] = {
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": None if cached or seconds <= 0 else tokens / seconds,
        "cached": cached,
    }


def _answer_cached(
    model: RetrievalLM,
    model_sum: str,
    tokenizer: Any,
    examples: list[Any],
    groups: list[range],
    retriever: Any,
    cfg: RunConfig,
    cache: Any,
    label: str,
) -> dict[str, Any]:
    """answer_questions group by group, each group's predictions and scores cached (JSON)."""
    from tqdm.auto import tqdm

    from .cache import cache_key, retriever_checksum
    from .qa import DEFAULT_TEMPLATE, FEW_SHOT, QAResult, answer_questions

    db_sum = retriever_checksum(retriever) if retriever is not None else "closed-book"
    use = bool(model_sum) and db_sum is not None
    k = cfg.k if retriever is not None else None
    parts: list[Any] = [None] * len(groups)
    keys = []
    for gi, g in enumerate(groups):
        qs = [[examples[i].question, list(examples[i].answers)] for i in g]
        key = cache_key(
            "qa", model_sum, db_sum, k, cfg.max_new_tokens, DEFAULT_TEMPLATE, FEW_SHOT, qs
        )
        keys.append(key)
        got = cache.get_json(key) if use else None
        if isinstance(got, dict) and all(len(got.get(f, [])) == len(g) for f in ("em", "f1")):
            parts[gi] = got
    todo = [gi for gi in range(len(groups)) if parts[gi] is None]
    done = len(examples) - sum(len(groups[gi]) for gi in todo)
    with tqdm(total=len(examples), initial=done, desc=label, unit="q") as bar:
        for gi in todo:
            g = groups[gi]
            res = answer_questions(
                model,
                tokenizer,
                [examples[i] for i in g],
                retriever=retriever,
                k=k,
                max_new_tokens=cfg.max_new_tokens,
                progress=False,
            )
            parts[gi] = {"predictions": res.predictions, "em": res.em, "f1": res.f1, "k": res.k}
            if use:
                cache.put_json(keys[gi], parts[gi])
            bar.update(len(g))
    out = QAResult(retrieval=retriever is not None)
    for p, g in zip(parts, groups, strict=True):
        out.em.extend(float(x) for x in p["em"])
        out.f1.extend(float(x) for x in p["f1"])
        out.predictions.extend(p.get("predictions", []))
        out.ids.extend(str(examples[i].id) for i in g)
        out.k = p.get("k")
    return out.summary()


def _recall_cached(
    model: RetrievalLM,
    model_sum: str,
    tokenizer: Any,
    examples: list[Any],
    groups: list[range],
    retriever: Any,
    cfg: RunConfig,
    cache: Any,
) -> dict[str, Any]:
    """Retrieval recall at 1/2/10 (``qa.answer_hit_ranks``), each group's ranks cached."""
    from .cache import cache_key, retriever_checksum
    from .qa import answer_hit_ranks, recall_at

    db_sum = retriever_checksum(retriever)
    ranks: list[int] = []
    for g in groups:
        exs = [examples[i] for i in g]
        qs = [[e.question, list(e.answers)] for e in exs]
        key = cache_key("recall", model_sum, db_sum, cfg.max_new_tokens, qs)
        got = cache.get_json(key) if db_sum and model_sum else None
        if not (isinstance(got, list) and len(got) == len(g)):
            got = answer_hit_ranks(
                model, tokenizer, exs, retriever, max_new_tokens=cfg.max_new_tokens
            )
            if db_sum and model_sum:
                cache.put_json(key, got)
        ranks.extend(int(r) for r in got)
    return recall_at(ranks)


def _eval_qa(
    bench: Any,
    spec: BenchmarkSpec,
    cfg: RunConfig,
    models: _Models,
    db: Any,
    tokenizer: Any,
    times: dict,
) -> dict[str, Any]:
    retro, baseline, rc = models.retro, models.baseline, models.cache
    if not bench.examples:
        raise RunConfigError(f"benchmark {bench.name}: empty (no questions)")
    qa_db = db
    db_path = spec.database
    if db_path is None and bench.corpus:
        # The benchmark ships its passage corpus: retrieve from a database of it (built once).
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in bench.name)
        db_path = cfg.output / f"passages-db-{slug}"
    if db_path is not None:
        if not _is_database(db_path):
            with _Timer(times, f"{bench.name}: passage database"):
                _build_database(
                    db_path,
                    list(bench.corpus or []),
                    cfg.database,
                    tokenizer,
                    int(retro.config.chunk_size),
                )
        qa_db = _open_database(db_path)
        check_retriever_for(retro, qa_db)
    examples = list(bench.examples)
    groups = _groups(len(examples), cfg.cache_group)
    out_models = {}
    name = bench.name
    if qa_db is not None:
        with _Timer(times, f"{name}: RETRO[ON]"):
            out_models["retro_on"] = _answer_cached(
                retro, models.retro_sum, tokenizer, examples, groups, qa_db, cfg, rc,
                f"{name}: RETRO[ON]",
            )  # fmt: skip
    with _Timer(times, f"{name}: RETRO[OFF]"):
        out_models["retro_off"] = _answer_cached(
            retro, models.retro_sum, tokenizer, examples, groups, None, cfg, rc,
            f"{name}: RETRO[OFF]",
        )  # fmt: skip
    if baseline is not None:
        with _Timer(times, f"{name}: baseline"):
            out_models["baseline"] = _answer_cached(
                baseline, models.baseline_sum, tokenizer, examples, groups, None, cfg, rc,
                f"{name}: baseline",
            )  # fmt: skip
    # Retrieval recall for every retriever the run has: the QA database and the run's database.
    recall: dict[str, Any] = {}
    retrievers = []
    if qa_db is not None:
        retrievers.append((str(db_path) if db_path is not None else str(cfg.database.path), qa_db))
    if db is not None and qa_db is not db:
        retrievers.append((str(cfg.database.path), db))
    for where, r in retrievers:
        with _Timer(times, f"{name}: retrieval recall"):
            recall[Path(where).name] = {
                **_recall_cached(retro, models.retro_sum, tokenizer, examples, groups, r, cfg, rc),
                "database": where,
            }
    out: dict[str, Any] = {
        "kind": "qa",
        "split": bench.split,
        "source": bench.source,
        "questions": len(examples),
        "models": out_models,
    }
    if recall:
        out["retrieval_recall"] = recall
    return out


def run_evaluation(cfg: RunConfig | str | Path) -> dict[str, Any]:
    """Run every benchmark of a run config; write results.json, report.md and the plots.

    Raises:
        RunConfigError, BenchmarkError, RetrieverMismatchError, CheckpointError: one-line errors.
    """
    from .cache import ResultCache
    from .checkpoints import load_eval_model, resolve_checkpoint
    from .report import render_report

    if not isinstance(cfg, RunConfig):
        cfg = load_run_config(cfg)
    times: dict[str, float] = {}
    with _Timer(times, "load models"):
        retro = load_eval_model(cfg.retro)
        baseline = load_eval_model(cfg.baseline) if cfg.baseline else None
    if baseline is not None and baseline.config.chunk_size != retro.config.chunk_size:
        logger.info("baseline chunk size differs from RETRO's: chunk tables use each model's own m")
    with _Timer(times, "load benchmarks"):
        benches = [(spec, _load_bench(spec)) for spec in cfg.benchmarks]

    db = None
    tokenizer = None
    if cfg.database is not None:
        spec = cfg.database
        if not _is_database(spec.path):
            if not spec.build_from:
                raise RunConfigError(
                    f"database.path {spec.path}: no database there and no database.build_from"
                )
            from retro_db.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(cfg.tokenizer)
            with _Timer(times, "read database sources"):
                docs = [d for s in spec.build_from for d in _source_documents(s)]
            dedup_report = None
            if spec.dedup:
                eval_texts = [d.text for _, b in benches if b.kind == "lm" for d in b.documents]
                with _Timer(times, "dedup"):
                    docs, dedup_report = _dedup(docs, eval_texts, tokenizer, spec.dedup_threshold)
            with _Timer(times, "build database"):
                _build_database(spec.path, docs, spec, tokenizer, int(retro.config.chunk_size))
            if dedup_report is not None:
                cfg.output.mkdir(parents=True, exist_ok=True)
                (cfg.output / "dedup.json").write_text(json.dumps(dedup_report, indent=1))
        db = _open_database(spec.path)
        check_retriever_for(retro, db)
    if tokenizer is None:
        if cfg.tokenizer is None and db is not None:
            tokenizer = db.tokenizer
        else:
            from retro_db.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(cfg.tokenizer)

    rc = ResultCache(cfg.output / "cache" if cfg.cache else None)
    with _Timer(times, "model checksums"):
        models = _Models(retro, baseline, rc)
    config = cfg.to_dict()
    config["retro_checkpoint"] = str(resolve_checkpoint(cfg.retro))
    if cfg.baseline:
        config["baseline_checkpoint"] = str(resolve_checkpoint(cfg.baseline))
    results: dict[str, Any] = {
        "version": 1,
        "config": config,
        "benchmarks": {},
        "stage_times": times,
    }
    cache: dict[str, Any] = {}  # shared across benchmarks (the database's MinHash index)
    for spec, bench in benches:
        key = (
            bench.name if bench.name not in results["benchmarks"] else f"{bench.name}:{bench.split}"
        )
        logger.info("evaluating %s (%s)", key, bench.split)
        with _Timer(times, key):
            if bench.kind == "qa":
                results["benchmarks"][key] = _eval_qa(
                    bench, spec, cfg, models, db, tokenizer, times
                )
            else:
                results["benchmarks"][key] = _eval_lm(
                    bench, cfg, models, db, tokenizer, times, cache
                )
                results.setdefault("speed", {})[key] = cache.pop("speed_of_last_benchmark", {})
    results["cache"] = rc.summary()
    if cfg.cache:
        logger.info(
            "cache %s: %d entries reused, %d computed, %d corrupted ones recomputed",
            cfg.output / "cache",
            rc.hits,
            rc.misses,
            rc.corrupted,
        )
    cfg.output.mkdir(parents=True, exist_ok=True)
    results = _clean(results)
    (cfg.output / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    render_report(results, cfg.output)
    return results


def _clean(o: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None, paths to strings."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_clean(v) for v in o]
    if isinstance(o, np.integer | bool):
        return o if isinstance(o, bool) else int(o)
    if isinstance(o, float | np.floating):
        return float(o) if math.isfinite(float(o)) else None
    if isinstance(o, Path):
        return str(o)
    return o
