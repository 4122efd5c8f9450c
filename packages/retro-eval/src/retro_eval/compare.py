"""The comparison rows of ``retro-eval run`` (issue 17): kNN-LM and in-context retrieval, and the
one leakage-aware comparison table.

Both methods read a causal LM that does not read neighbours: the run's baseline when it has one
(with RETRO's chunk size), else the RETRO model with retrieval off (for a retro-fitted model that
is exactly its frozen base). Both score exactly the RETRO rows' chunks, so every row of the table
shares the same chunks, bins and bootstrap draws:

* ``incontext``: :func:`retro_eval.incontext.score_incontext` with RETRO's own neighbours (the
  nearest one of the previous chunk prepended at every chunk boundary);
* ``knnlm``: :func:`retro_eval.knnlm.score_knnlm` with a datastore over the run database's text
  (built once per run), excluding an evaluated document's own entries when the database holds
  the same document (identical tokens), at the configured lambda and k, plus a (lambda, k) sweep.

The table (:func:`comparison_table`): one row per model (baseline, RETRO[OFF], RETRO[ON],
RETRO[shuffled], kNN-LM, in-context retrieval), columns all chunks and each overlap bin of each
measure, each cell bpb with its seeded bootstrap 95 % interval over chunks; beside it (results.json
``speed``, not a result: it changes from run to run) the method's scoring speed in tokens/s
(wall time of its scoring passes over the benchmark's tokens; retrieval
of RETRO's neighbours, shared by RETRO[ON], RETRO[shuffled] and in-context, and the kNN-LM
datastore build are timed separately; a row whose scores all came from the result cache has no
speed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .perplexity import ScoreResult

logger = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "ROW_ORDER",
    "KnnSettings",
    "comparison_table",
    "method_model",
    "score_method_rows",
]

#: the comparison methods ``retro-eval run`` can add (``bm25``: RETRO[ON] fed the neighbours that
#: BM25 retrieves from the same database's chunks, ``retro_db.bm25``; scored by ``run.py``).
METHODS = ("knnlm", "incontext", "bm25")
#: the table's rows, in order (absent ones are skipped).
ROW_ORDER = (
    "baseline",
    "retro_off",
    "retro_on",
    "retro_shuffled",
    "retro_bm25",
    "knnlm",
    "incontext",
)


@dataclass
class KnnSettings:
    """kNN-LM settings (run.yaml ``knnlm:``); defaults are the paper's."""

    lmbda: float = 0.25
    k: int = 1024
    lambdas: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.25, 0.5])
    ks: list[int] = field(default_factory=lambda: [16, 64, 1024])
    temperature: float = 1.0
    max_tokens: int | None = None
    index_factory: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "lambda": self.lmbda,
            "k": self.k,
            "lambdas": list(self.lambdas),
            "ks": list(self.ks),
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "index_factory": self.index_factory,
        }


def method_model(retro: Any, baseline: Any) -> tuple[Any, str]:
    """The causal LM the comparison methods read, and its name in the results: the baseline when
    it has RETRO's chunk size, else RETRO with retrieval off (a retro-fitted model's frozen base).
    """
    m = int(retro.config.chunk_size)
    if baseline is not None and int(getattr(baseline.config, "chunk_size", -1)) == m:
        return baseline, "baseline"
    if baseline is not None:
        logger.info("baseline chunk size differs from RETRO's: the methods read RETRO[OFF]")
    kind = type(retro).__name__
    return retro, (
        "frozen base (RETRO[OFF])" if kind == "RetrofittedLM" else "RETRO[OFF] (retrieval off)"
    )


def _grouped(
    groups: Sequence[range],
    group_sums: Sequence[str],
    cache: Any,
    key_parts: Callable[[int], tuple[Any, ...]],
    compute: Callable[[range], dict[str, np.ndarray]],
    use_cache: bool,
) -> tuple[list[dict[str, np.ndarray]], int]:
    """Per-group arrays, each group cached under ``cache_key(*key_parts(gi), group_sums[gi])``;
    returns the parts and the number of groups computed."""
    from .cache import cache_key

    parts: list[dict[str, np.ndarray]] = []
    computed = 0
    for gi, g in enumerate(groups):
        key = cache_key(*key_parts(gi), group_sums[gi])
        data = cache.get_arrays(key) if use_cache else None
        if data is None:
            data = compute(g)
            computed += 1
            if use_cache:
                cache.put_arrays(key, data)
        parts.append(data)
    return parts, computed


def _split_bits(
    flat: np.ndarray, token_docs: Sequence[Sequence[int]], g: range
) -> list[np.ndarray]:
    out, off = [], 0
    for i in g:
        n = len(token_docs[i])
        out.append(flat[off : off + n])
        off += n
    return out


def score_method_rows(
    methods: Sequence[str],
    model: Any,
    model_sum: str,
    token_docs: Sequence[Sequence[int]],
    neighbours: Sequence[Any] | None,
    *,
    groups: Sequence[range],
    group_sums: Sequence[str],
    common: dict[str, Any],
    settings: dict[str, Any],
    cache: Any,
    knn: KnnSettings,
    datastore: Callable[[], Any],
    db: Any,
    db_sum: str | None,
    label: str,
) -> tuple[dict[str, ScoreResult], dict[str, dict[str, Any]], dict[str, Any]]:
    """Score the comparison rows of one benchmark.

    Args:
        methods: among :data:`METHODS`.
        model: the causal LM (:func:`method_model`); model_sum: its checksum ("" = no cache).
        token_docs: the benchmark's documents; neighbours: RETRO's (k >= 1) per document.
        groups, group_sums: the run's cache groups of documents and their checksums.
        common: ``score_token_documents`` arguments (decode, prefix_id, window, stride,
            batch_size); settings: the run's scoring settings (cache key).
        knn: kNN-LM settings; datastore: builds (once) the datastore when a group needs it.
        db: the run's database (the exclusion); db_sum: its checksum.

    Returns:
        ({row: ScoreResult}, {row: {"seconds", "tokens", "tokens_per_s", "cached"}},
        {"knnlm": {...sweep, datastore...}} extra information).
    """
    from .incontext import score_incontext
    from .knnlm import KnnScores, database_documents, matching_database_documents, score_knnlm

    scores: dict[str, ScoreResult] = {}
    speed: dict[str, dict[str, Any]] = {}
    info: dict[str, Any] = {}
    use = bool(model_sum) and db_sum is not None and cache.directory is not None
    total_tokens = int(sum(len(d) for d in token_docs))
    kw = {k: common[k] for k in ("window", "stride", "batch_size")}
    from .causal import assemble_result, causal_geometry

    n, s, m, pad = causal_geometry(model, window=common["window"], stride=common["stride"])

    if "incontext" in methods:
        if neighbours is None:
            logger.warning("%s: in-context retrieval needs a database: no row", label)
        else:
            t0 = time.perf_counter()

            def ic(g: range) -> dict[str, np.ndarray]:
                docs = [token_docs[i] for i in g]
                nbs = [neighbours[i] for i in g]
                res = score_incontext(
                    model, docs, nbs, decode=common["decode"], prefix_id=common["prefix_id"],
                    progress=False, **kw,
                )  # fmt: skip
                return {"bits": res.bits, "forward_tokens": np.array([res.meta["forward_tokens"]])}

            def ic_key(gi: int) -> tuple[Any, ...]:
                g = groups[gi]
                from .cache import arrays_checksum

                nb = [
                    a
                    for i in g
                    for a in (neighbours[i].tokens[:, :1], neighbours[i].lengths[:, :1])
                ]
                return ("incontext", model_sum, settings, arrays_checksum(nb))

            parts, computed = _grouped(groups, group_sums, cache, ic_key, ic, use)
            seconds = time.perf_counter() - t0
            zero = [np.zeros(len(d)) for d in token_docs]
            res = assemble_result(
                token_docs, zero, chunk_size=m, pad_id=pad, decode=common["decode"], window=n,
                stride=s, k=1, meta={"method": "incontext"},
            )  # fmt: skip
            res.bits = np.concatenate([p["bits"] for p in parts]).astype(np.float64)
            scores["incontext"] = res
            forward = int(sum(int(p["forward_tokens"][0]) for p in parts))
            speed["incontext"] = _speed(seconds, total_tokens, computed, len(groups))
            speed["incontext"]["forward_tokens"] = forward

    if "knnlm" in methods:
        t0 = time.perf_counter()
        built: dict[str, Any] = {}
        db_docs, db_index = database_documents(db)
        excl = matching_database_documents(token_docs, db_docs, db_index)
        del db_docs

        def store() -> Any:
            if "store" not in built:
                t1 = time.perf_counter()
                built["store"] = datastore()
                built["seconds"] = time.perf_counter() - t1
            return built["store"]

        ks = sorted({int(k) for k in [*knn.ks, knn.k]})

        def kn(g: range) -> dict[str, np.ndarray]:
            st = store()
            sc = score_knnlm(
                model, [token_docs[i] for i in g], st, decode=common["decode"],
                prefix_id=common["prefix_id"], ks=ks, temperature=knn.temperature,
                exclude_doc_ids=excl[list(g)], progress=False, **kw,
            )  # fmt: skip
            out = {"lm": np.concatenate(sc.lm), "size": np.array([st.size])}
            for k in ks:
                out[f"knn{k}"] = np.concatenate(sc.knn[k])
            return out

        def kn_key(gi: int) -> tuple[Any, ...]:
            return ("knnlm", model_sum, settings, db_sum, knn.to_dict(), ks)

        parts, computed = _grouped(groups, group_sums, cache, kn_key, kn, use)
        seconds = time.perf_counter() - t0
        lm, knn_bits = [], {k: [] for k in ks}
        for p, g in zip(parts, groups, strict=True):
            lm.extend(_split_bits(p["lm"], token_docs, g))
            for k in ks:
                knn_bits[k].extend(_split_bits(p[f"knn{k}"], token_docs, g))
        size = int(parts[0]["size"][0]) if parts else 0
        sc = KnnScores(
            lm=lm, knn=knn_bits, token_documents=[list(map(int, d)) for d in token_docs],
            geometry=(n, s, m, pad), decode=common["decode"], datastore_size=size,
        )  # fmt: skip
        scores["knnlm"] = sc.result(knn.lmbda, knn.k)
        speed["knnlm"] = _speed(
            seconds - built.get("seconds", 0.0), total_tokens, computed, len(groups)
        )
        if "store" in built:  # built for this benchmark (a timing: kept with the speeds)
            speed["knnlm"]["datastore_seconds"] = float(built["store"].build_seconds)
        info["knnlm"] = {
            **knn.to_dict(),
            "datastore_entries": size,
            "excluded_documents": int((excl >= 0).sum()),
            "k_used": min(knn.k, size),
            "sweep": sc.sweep(knn.lambdas, ks),
        }
    return scores, speed, info


def _speed(seconds: float, tokens: int, computed: int, groups: int) -> dict[str, Any]:
    cached = computed == 0 and groups > 0
    return {
        "seconds": float(seconds),
        "tokens": int(tokens),
        "tokens_per_s": None if cached or seconds <= 0 else tokens / seconds,
        "cached": cached,
        "partly_cached": 0 < computed < groups,
    }


def comparison_table(
    scores: dict[str, ScoreResult],
    values: dict[str, np.ndarray],
    *,
    samples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The comparison table: per row, bpb with a bootstrap 95 % interval over all chunks and per
    overlap bin of each measure (tokens/s, a timing rather than a result, is kept apart: results.json
    ``speed``, merged by the report).

    Args:
        scores: {row: ScoreResult} over the same chunks (rows with other chunks are left out).
        values: {measure: float [C] overlap of each chunk}.
        samples, seed: the bootstrap (``overlap.bootstrap_bpb_difference`` of a row against zero
            bits: the row's own bpb and its interval).

    Returns:
        {"columns": [{"measure", "bin", "chunks"}], "rows": [{"model", "all": {"bpb", "ci95"},
        "bins": {measure: [{"bin", "bpb", "ci95"}]}}]}.
    """
    from .overlap import BIN_EDGES, bin_labels, bootstrap_bpb_difference, overlap_bins

    if not scores:
        return {"columns": [], "rows": []}
    ref = scores.get("retro_on") or next(iter(scores.values()))
    c = ref.num_chunks
    labels = bin_labels(BIN_EDGES)
    bins = {ms: overlap_bins(v, BIN_EDGES) for ms, v in values.items() if len(v) == c}

    def cell(res: ScoreResult, sel: np.ndarray | None) -> dict[str, Any]:
        bits = res.bits if sel is None else res.bits[sel]
        nbytes = res.bytes if sel is None else res.bytes[sel]
        if not int(nbytes.sum()):
            return {"bpb": None, "ci95": None, "chunks": int(len(bits))}
        est, lo, hi = bootstrap_bpb_difference(
            bits, np.zeros_like(bits), nbytes, samples=samples, seed=seed
        )
        return {"bpb": float(est), "ci95": [float(lo), float(hi)], "chunks": int(len(bits))}

    rows = []
    for key in [k for k in ROW_ORDER if k in scores] + [k for k in scores if k not in ROW_ORDER]:
        res = scores[key]
        if res.num_chunks != c:
            continue
        row = {"model": key, "all": cell(res, None), "bins": {}}
        for ms, b in bins.items():
            row["bins"][ms] = [{"bin": lab, **cell(res, b == j)} for j, lab in enumerate(labels)]
        rows.append(row)
    columns = [{"measure": None, "bin": "all chunks", "chunks": c}]
    for ms, b in bins.items():
        for j, lab in enumerate(labels):
            columns.append({"measure": ms, "bin": lab, "chunks": int((b == j).sum())})
    return {"columns": columns, "rows": rows}
