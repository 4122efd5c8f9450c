"""Render ``results.json`` (written by :mod:`retro_eval.run`) as ``report.md`` and PNG plots.

results.json (version 1)::

    {"version": 1, "config": {...}, "stage_times": {"stage": seconds, ...},
     "models": {"retro_on": "RETRO[ON] ...", ...},          # optional display names
     "benchmarks": {
       "<name>": {"kind": "lm", "split": "test", "documents": D, "chunks": C, "tokens": T, "bytes": B,
                  "models": {"retro_on": {"bpb": .., "word_perplexity": ..|null, "bits": ..},
                             "retro_shuffled": {...}, "retro_off": {...}, "baseline": {...}},
                  "vs_off": {"retro_on": {"delta": .., "ci95": [lo, hi]}, "retro_shuffled": {...}},
                  "shuffle": {"seed": 0, "same_document_chunks": n},
                  "bootstrap": {"samples": 1000, "seed": 0, "level": 0.95},
                  "buckets": {"rc": [{"alpha": 0.125, "chunks": n, "bpb": {"retro_on": ..|null, ...}}, ...],
                              "minhash": [...]},
                  "bins": {"rc": [{"bin": "[0%, 12.5%]", "lower": 0.0, "upper": 0.125, "chunks": n,
                                   "bytes": b, "bpb": {"retro_on": ..|null, ...},
                                   "vs_off": {"retro_on": {"delta": .., "ci95": [lo, hi]}, ...}},
                                  ...],
                           "minhash": [...]},
                  "k_sweep": [{"k": 1, "bpb": ..}, ...],
                  # with run.yaml `db_fractions` / --db-fractions: the database-size sweep
                  "db_fractions": [{"fraction": "1/16", "chunks": n, "documents": d, "bpb": ..,
                                    "vs_off": {"delta": .., "ci95": [lo, hi]},
                                    "bins": {"rc": [{"bin", "chunks", "bytes", "bpb",
                                                     "vs_off"}], ...}}, ...],
                  "subsets": {"<pile_set_name>": {"retro_on": bpb, ...}, ...},
                  # with run.yaml `methods` (retro_eval.compare): the comparison rows
                  "methods": {"reads": "baseline", "knnlm": {"lambda": .., "k": .., "sweep": [
                              {"lambda": .., "k": .., "bpb": ..}], "datastore_entries": N, ...}},
                  "comparison": {"columns": [{"measure": null|"rc", "bin": "..", "chunks": n}],
                                 "rows": [{"model": "knnlm", "all": {"bpb", "ci95"},
                                           "bins": {"rc": [{"bin", "bpb", "ci95"}]}}]}},
       "<qa name>": {"kind": "qa", "split": "validation", "questions": Q,
                     "models": {"retro_on": {"exact_match": .., "f1": ..}, "retro_off": {...}},
                     "retrieval_recall": {"<database>": {"top1": %, "top2": %, "top10": %,
                                                          "questions": Q, "database": path}}}},
     "cache": {"hits": n, "misses": n, "corrupted": n},   # retro_eval.cache entries of this run
     # timings (not results: they change from run to run), per language-modelling benchmark
     "speed": {"<name>": {"retro_on": {"seconds": s, "tokens": T, "tokens_per_s": ..|null,
                                       "cached": bool}, ...}}}

A bucket with no chunks has ``"chunks": 0`` and null bpb: the report prints "empty".

``retro_shuffled`` is RETRO[ON] fed the neighbours retrieved for another chunk of the same benchmark
(the control: a model that reads its neighbours loses its gain there). ``vs_off`` holds
bpb(model) - bpb(RETRO[OFF]) (negative: the model is better) with a seeded bootstrap 95% interval over
chunks, over all chunks and per disjoint overlap bin (``bins``: [0, 12.5%], (12.5%, 50%], (50%, 100%]).
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["MODEL_LABELS", "ReportError", "load_results", "render_report"]

#: Column order and display names of the evaluated models.
MODEL_LABELS = {
    "retro_on": "RETRO[ON]",
    "retro_shuffled": "RETRO[shuffled]",
    "retro_off": "RETRO[OFF]",
    "baseline": "baseline",
    "retro_bm25": "RETRO[ON], BM25 neighbours",
    "knnlm": "kNN-LM",
    "incontext": "in-context retrieval",
}
#: The models whose difference from RETRO[OFF] is reported, and the plot of bpb per bin.
VS_OFF_MODELS = ("retro_on", "retro_shuffled", "retro_bm25", "knnlm", "incontext")
BIN_PLOT_MODELS = ("retro_on", "retro_shuffled", "retro_off")
MEASURE_LABELS = {"rc": "r(C): longest common token substring / m", "minhash": "MinHash Jaccard"}


class ReportError(ValueError):
    """results.json is missing or malformed."""


def load_results(path: str | Path) -> dict[str, Any]:
    """Read and minimally validate a results.json.

    Raises:
        ReportError: one line naming the file and what is wrong.
    """
    p = Path(path)
    if not p.is_file():
        raise ReportError(f"{p}: no such results file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ReportError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), dict):
        raise ReportError(f"{p}: expected an object with a 'benchmarks' object")
    return data


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "benchmark"


def _models_in(models: dict[str, Any]) -> list[str]:
    return [k for k in MODEL_LABELS if k in models] + [k for k in models if k not in MODEL_LABELS]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _label(key: str) -> str:
    return MODEL_LABELS.get(key, key)


def _pct(alpha: float) -> str:
    return f"{100 * float(alpha):g}%"


def _delta(d: dict[str, Any] | None) -> str:
    """``-0.0123 [-0.0200, -0.0050]``: a difference and its 95% interval, or "-"."""
    if not d or d.get("delta") is None:
        return "-"
    ci = d.get("ci95") or [None, None]
    if ci[0] is None or ci[1] is None:
        return f"{d['delta']:+.4f}"
    return f"{d['delta']:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]"


def _measures(table: dict[str, Any]) -> list[str]:
    return [m for m in ("rc", "minhash") if table.get(m)] + [
        m for m in table if m not in ("rc", "minhash") and table[m]
    ]


def _plot_bins(name: str, bench: dict[str, Any], path: Path) -> bool:
    """bpb per disjoint overlap bin for RETRO[ON], RETRO[shuffled] and RETRO[OFF] (one panel per
    overlap measure; an empty bin has no point)."""
    import matplotlib.pyplot as plt
    import numpy as np

    bins = bench.get("bins") or {}
    measures = _measures(bins)
    if not measures:
        return False
    fig, axes = plt.subplots(1, len(measures), figsize=(5.5 * len(measures), 4), squeeze=False)
    for ax, measure in zip(axes[0], measures, strict=True):
        rows = bins[measure]
        present = {k for r in rows for k, v in (r.get("bpb") or {}).items() if v is not None}
        models = [m for m in BIN_PLOT_MODELS if m in present]
        x = np.arange(len(rows))
        # Points (not bars from zero): the differences between models are small against bpb itself.
        for i, model in enumerate(models):
            ys = [(r.get("bpb") or {}).get(model) for r in rows]
            ax.plot(
                x + (i - (len(models) - 1) / 2) * 0.08,
                [np.nan if y is None else y for y in ys],
                marker="o",
                linestyle="-",
                label=_label(model),
            )
        ax.set_xticks(x, [f"{r['bin']}\n{r['chunks']} chunks" for r in rows], fontsize=8)
        ax.set_xlabel("overlap bin")
        ax.set_ylabel("bits per byte")
        ax.set_title(MEASURE_LABELS.get(measure, measure), fontsize=10)
        ax.set_xlim(-0.5, len(rows) - 0.5)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{name}: bpb per overlap bin")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _plot_alpha(name: str, bench: dict[str, Any], path: Path) -> bool:
    import matplotlib.pyplot as plt

    buckets = bench.get("buckets") or {}
    measures = _measures(buckets)
    if not measures:
        return False
    fig, axes = plt.subplots(1, len(measures), figsize=(5.5 * len(measures), 4), squeeze=False)
    for ax, measure in zip(axes[0], measures, strict=True):
        rows = buckets[measure]
        models = _models_in({k: None for r in rows for k in (r.get("bpb") or {})})
        for model in models:
            xs = [100 * r["alpha"] for r in rows if (r.get("bpb") or {}).get(model) is not None]
            ys = [r["bpb"][model] for r in rows if (r.get("bpb") or {}).get(model) is not None]
            if xs:
                ax.plot(xs, ys, marker="o", label=_label(model))
        ax.set_xlabel("alpha (%): chunks with overlap <= alpha")
        ax.set_ylabel("bits per byte")
        ax.set_title(MEASURE_LABELS.get(measure, measure), fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(f"{name}: bpb(alpha)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _plot_k(name: str, bench: dict[str, Any], path: Path) -> bool:
    import matplotlib.pyplot as plt

    sweep = [r for r in bench.get("k_sweep") or [] if r.get("bpb") is not None]
    if not sweep:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([r["k"] for r in sweep], [r["bpb"] for r in sweep], marker="o", label="RETRO[ON]")
    models = bench.get("models") or {}
    for key, style in (("retro_shuffled", "-."), ("retro_off", "--"), ("baseline", ":")):
        bpb = (models.get(key) or {}).get("bpb")
        if bpb is not None:
            ax.axhline(bpb, linestyle=style, color="gray", label=_label(key))
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["k"] for r in sweep], [str(r["k"]) for r in sweep])
    ax.set_xlabel("k (neighbours per chunk at evaluation)")
    ax.set_ylabel("bits per byte")
    ax.set_title(f"{name}: bpb against k")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _fraction_value(text: str) -> float:
    num, _, den = str(text).partition("/")
    return float(num) / float(den or 1)


def _plot_fractions(name: str, bench: dict[str, Any], path: Path) -> bool:
    """RETRO[ON] minus RETRO[OFF] (bpb) against the database fraction: all chunks and each bin
    of the first overlap measure, with the 95% intervals as error bars."""
    import matplotlib.pyplot as plt

    rows = [r for r in bench.get("db_fractions") or [] if r.get("vs_off")]
    if not rows:
        return False
    x = [_fraction_value(r["fraction"]) for r in rows]
    series = [("all chunks", [r["vs_off"] for r in rows])]
    measure = next(iter(rows[0].get("bins") or {}), None)
    if measure is not None:
        for b, label in enumerate(r["bin"] for r in rows[0]["bins"][measure]):
            series.append(
                (f"{measure} {label}", [r["bins"][measure][b].get("vs_off") for r in rows])
            )
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, cells in series:
        pts = [(xi, c) for xi, c in zip(x, cells, strict=True) if c]
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1]["delta"] for p in pts]
        lo = [y - p[1]["ci95"][0] for y, p in zip(ys, pts, strict=True)]
        hi = [p[1]["ci95"][1] - y for y, p in zip(ys, pts, strict=True)]
        err = [lo, hi]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
    ax.axhline(0.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [r["fraction"] for r in rows])
    ax.set_xlabel("fraction of the database retrieved from")
    ax.set_ylabel("bpb RETRO[ON] minus RETRO[OFF]")
    ax.set_title(f"{name}: gain against database size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _fraction_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The database-size sweep's table: per fraction, RETRO[ON]'s bpb and its difference from
    RETRO[OFF] over all chunks and per overlap bin of each measure."""
    if not rows:
        return []
    lines = [
        "### RETRO[ON] against database size",
        "",
        "Retrieval from a fraction of the database's documents only (the first ones of a random "
        "order seeded by the run's seed, so the fractions are nested), through an index of those "
        "chunks alone (1 = the whole database). Bins: each chunk's overlap with the whole "
        "database. Cells: bpb minus RETRO[OFF] [95% interval].",
        "",
    ]
    measures = list(rows[0].get("bins") or {})
    header = ["fraction", "chunks", "documents", "bits per byte", "all chunks"]
    for measure in measures:
        header += [f"{measure} {r['bin']}" for r in rows[0]["bins"][measure]]
    table = []
    for r in rows:
        cells = [r["fraction"], str(r["chunks"]), str(r["documents"]), _fmt(r.get("bpb"))]
        cells.append(_delta(r.get("vs_off")))
        for measure in measures:
            cells += [
                _delta(b.get("vs_off")) if b.get("chunks") else "empty" for b in r["bins"][measure]
            ]
        table.append(cells)
    return lines + _table(header, table) + [""]


def _plot_subsets(name: str, subsets: dict[str, dict[str, Any]], path: Path) -> bool:
    import matplotlib.pyplot as plt
    import numpy as np

    if not subsets:
        return False
    names = list(subsets)
    models = _models_in({k: None for s in subsets.values() for k in s})
    x = np.arange(len(names))
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(5.5, 1.8 * len(names)), 4))
    for i, model in enumerate(models):
        ys = [subsets[s].get(model) for s in names]
        ax.bar(
            x + (i - (len(models) - 1) / 2) * width,
            [np.nan if y is None else y for y in ys],
            width,
            label=_label(model),
        )
    ax.set_xticks(x, names, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("bits per byte")
    ax.set_title(f"{name}: subsets")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _ci_cell(c: dict[str, Any] | None) -> str:
    if not c or c.get("bpb") is None:
        return "empty"
    ci = c.get("ci95") or [None, None]
    return f"{_fmt(c['bpb'], 3)} [{_fmt(ci[0], 3)}, {_fmt(ci[1], 3)}]"


def _comparison_lines(bench: dict[str, Any], speed: dict[str, Any]) -> list[str]:
    """The comparison table (``retro_eval.compare.comparison_table``) as markdown."""
    comp = bench.get("comparison") or {}
    rows, columns = comp.get("rows") or [], comp.get("columns") or []
    if not rows:
        return []
    header = ["model"]
    for col in columns:
        name = col["bin"] if col.get("measure") is None else f"{col['measure']} {col['bin']}"
        header.append(f"{name} ({col.get('chunks', '?')} chunks)")
    header.append("tokens/s")
    body = []
    for r in rows:
        cells = [_label(r["model"]), _ci_cell(r.get("all"))]
        for col in columns[1:]:
            got = next(
                (
                    b
                    for b in (r.get("bins") or {}).get(col["measure"], [])
                    if b["bin"] == col["bin"]
                ),
                None,
            )
            cells.append(_ci_cell(got))
        sp = speed.get(r["model"]) or {}
        tps = sp.get("tokens_per_s")
        cells.append("cached" if sp.get("cached") else (f"{tps:.0f}" if tps else "-"))
        body.append(cells)
    methods = bench.get("methods") or {}
    lines = ["### Comparison: bits per byte [95% interval] per overlap bin", ""]
    lines += _table(header, body) + [""]
    notes = [
        f"kNN-LM and in-context retrieval read the {methods.get('reads', '?')}; every row scores "
        "the same tokens and chunks. Intervals: bootstrap over chunks (the same seeded draws for "
        "every row). tokens/s: wall time of the row's scoring passes (retrieval of RETRO's "
        "neighbours, shared by RETRO[ON], RETRO[shuffled] and in-context retrieval, and the kNN-LM "
        "datastore build are not included; 'cached': read from the result cache)."
    ]
    knn = methods.get("knnlm")
    if knn:
        notes.append(
            f"kNN-LM: lambda {knn.get('lambda')}, k {knn.get('k_used')} (asked {knn.get('k')}), "
            f"temperature {knn.get('temperature')}, datastore of {knn.get('datastore_entries')} "
            f"entries (hidden state before the read-out -> next token) over the database's text"
            + (f" (at most {knn['max_tokens']} tokens)" if knn.get("max_tokens") else "")
            + f", index {knn.get('index_factory') or 'exact L2 (IndexFlatL2)'}; "
            f"{knn.get('excluded_documents') or 0} evaluated documents found in the database had "
            "their own entries excluded."
        )
    lines += [" ".join(notes), ""]
    if knn and knn.get("sweep"):
        ks = sorted({r["k"] for r in knn["sweep"]})
        lams = sorted({r["lambda"] for r in knn["sweep"]})
        grid = {(r["lambda"], r["k"]): r["bpb"] for r in knn["sweep"]}
        lines += ["#### kNN-LM sweep (bits per byte, all chunks)", ""]
        lines += _table(
            ["lambda"] + [f"k={k}" for k in ks],
            [[str(lam)] + [_fmt(grid.get((lam, k))) for k in ks] for lam in lams],
        )
        lines.append("")
    return lines


def render_report(results: dict[str, Any] | str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.md`` and the PNG plots for a results dict (or results.json path).

    Args:
        results: the results object (see the module docstring) or a path to results.json.
        out_dir: where report.md and the plots go (created if needed).

    Returns:
        Written files by role: ``"report"`` and one ``"<plot>:<benchmark>"`` per PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    if not isinstance(results, dict):
        results = load_results(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    lines = ["# RETRO evaluation report", ""]
    cfg = results.get("config") or {}
    if cfg:
        lines += ["## Setup", ""]
        for key in ("retro", "baseline", "database", "window", "stride", "k", "k_sweep", "dedup"):
            if key in cfg:
                lines.append(f"- {key}: `{cfg[key]}`")
        lines.append("")

    for name, bench in results["benchmarks"].items():
        kind = bench.get("kind", "lm")
        lines += [f"## {name} ({bench.get('split', '?')})", ""]
        models = bench.get("models") or {}
        if kind == "qa":
            lines.append(f"{bench.get('questions', '?')} questions.")
            lines.append("")
            rows = [
                [_label(m), _fmt(models[m].get("exact_match"), 2), _fmt(models[m].get("f1"), 2)]
                for m in _models_in(models)
            ]
            lines += _table(["model", "exact match (%)", "F1 (%)"], rows) + [""]
            recall = bench.get("retrieval_recall") or {}
            if recall:
                lines += [
                    "Retrieval recall: share of questions with a gold answer (normalised as exact "
                    "match normalises it) in the top-k neighbours retrieved for the chunk that ends "
                    "the question.",
                    "",
                ]
                rows = [
                    [f"`{db}`", *(_fmt(r.get(f"top{k}"), 1) for k in (1, 2, 10))]
                    for db, r in recall.items()
                ]
                lines += _table(["database", "top-1 (%)", "top-2 (%)", "top-10 (%)"], rows) + [""]
            continue
        lines.append(
            f"{bench.get('documents', '?')} documents, {bench.get('chunks', '?')} chunks, "
            f"{bench.get('tokens', '?')} tokens, {bench.get('bytes', '?')} bytes"
            + (
                f"; windows of {bench['window']} tokens, stride {bench['stride']}."
                if bench.get("window")
                else "."
            )
        )
        lines.append("")
        has_wppl = any((models[m] or {}).get("word_perplexity") is not None for m in models)
        vs_off = bench.get("vs_off") or {}
        header = ["model", "bits per byte"] + (["word perplexity"] if has_wppl else [])
        if vs_off:
            header.append("minus RETRO[OFF] [95% interval]")
        rows = []
        for m in _models_in(models):
            row = [_label(m), _fmt(models[m].get("bpb"))]
            if has_wppl:
                row.append(_fmt(models[m].get("word_perplexity"), 2))
            if vs_off:
                row.append(_delta(vs_off.get(m)))
            rows.append(row)
        lines += _table(header, rows) + [""]
        shuffle = bench.get("shuffle")
        if "retro_shuffled" in models and shuffle:
            lines += [
                "RETRO[shuffled]: RETRO[ON] fed the neighbours retrieved for another chunk of this "
                f"benchmark (a derangement, seed {shuffle.get('seed')}; "
                f"{shuffle.get('same_document_chunks')} chunks from their own document).",
                "",
            ]
        boot = bench.get("bootstrap") or {}
        if vs_off and boot:
            lines += [
                "Intervals: bootstrap over chunks (resampled with replacement, "
                f"{boot.get('samples')} resamples, seed {boot.get('seed')}); a negative difference "
                "means fewer bits per byte than RETRO[OFF].",
                "",
            ]

        lines += _comparison_lines(bench, (results.get("speed") or {}).get(name) or {})

        for measure, buckets in (bench.get("buckets") or {}).items():
            if not buckets:
                continue
            cols = _models_in({k: None for r in buckets for k in (r.get("bpb") or {})})
            lines += [f"### bpb(alpha), overlap = {MEASURE_LABELS.get(measure, measure)}", ""]
            rows = []
            for r in buckets:
                if not r.get("chunks"):
                    rows.append([_pct(r["alpha"]), "0"] + ["empty"] * len(cols))
                else:
                    rows.append(
                        [_pct(r["alpha"]), str(r["chunks"])]
                        + [_fmt((r.get("bpb") or {}).get(c)) for c in cols]
                    )
            lines += _table(["alpha", "chunks"] + [_label(c) for c in cols], rows) + [""]

        for measure, bins in (bench.get("bins") or {}).items():
            if not bins:
                continue
            cols = _models_in({k: None for r in bins for k in (r.get("bpb") or {})})
            diffs = [m for m in VS_OFF_MODELS if any(m in (r.get("vs_off") or {}) for r in bins)]
            lines += [f"### bpb per overlap bin, overlap = {MEASURE_LABELS.get(measure, measure)}"]
            lines.append("")
            rows = []
            for r in bins:
                cells = [r["bin"], str(r.get("chunks", 0))]
                if not r.get("chunks"):
                    cells += ["empty"] * (len(cols) + len(diffs))
                else:
                    cells += [_fmt((r.get("bpb") or {}).get(c)) for c in cols]
                    cells += [_delta((r.get("vs_off") or {}).get(m)) for m in diffs]
                rows.append(cells)
            header = ["bin", "chunks"] + [_label(c) for c in cols]
            header += [f"{_label(m)} minus RETRO[OFF] [95%]" for m in diffs]
            lines += _table(header, rows) + [""]

        if bench.get("k_sweep"):
            lines += ["### RETRO[ON] against k", ""]
            rows = [[str(r["k"]), _fmt(r.get("bpb"))] for r in bench["k_sweep"]]
            lines += _table(["k", "bits per byte"], rows) + [""]

        lines += _fraction_lines(bench.get("db_fractions") or [])

        subsets = bench.get("subsets") or {}
        if subsets:
            cols = _models_in({k: None for s in subsets.values() for k in s})
            lines += ["### Subsets (bits per byte)", ""]
            rows = [[s] + [_fmt(subsets[s].get(c)) for c in cols] for s in subsets]
            lines += _table(["subset"] + [_label(c) for c in cols], rows) + [""]

        slug = _slug(name)
        for role, fn, arg in (
            ("bpb_vs_alpha", _plot_alpha, bench),
            ("bpb_per_bin", _plot_bins, bench),
            ("bpb_vs_k", _plot_k, bench),
            ("bpb_vs_db_fraction", _plot_fractions, bench),
            ("subsets", _plot_subsets, subsets),
        ):
            path = out / f"{role}_{slug}.png"
            if fn(name, arg, path):
                written[f"{role}:{name}"] = path
                lines += [f"![{role} {name}]({path.name})", ""]

    times = results.get("stage_times") or {}
    if times:
        lines += ["## Stage times", ""]
        lines += _table(["stage", "seconds"], [[k, f"{float(v):.1f}"] for k, v in times.items()])
        lines.append("")
    report = out / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    written["report"] = report
    logger.info("wrote %s and %d plots", report, len(written) - 1)
    return written
