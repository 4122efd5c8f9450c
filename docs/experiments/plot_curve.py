"""Plot learning curves written by retrofit_curve.py or scratch_curve.py: bpb per r(C) bin.

ON / shuffled / OFF for every run; a from-scratch run (scratch_curve.py) also has its matched
baseline, and its OFF changes with training (for a retro-fit it is the frozen base, a constant).

python docs/experiments/plot_curve.py RUN_DIR [RUN_DIR ...] --out docs/experiments/curve.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PANELS = (("all", "all chunks"), ("(0.0,0.125]", "r(C) <= 12.5%"), ("(0.5,1.0]", "r(C) > 50%"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    all_recs = {run: _records(run) for run in a.runs}
    rows = 2 if any(r and "ci95" in r[0] for r in all_recs.values()) else 1
    fig, axes = plt.subplots(rows, len(PANELS), figsize=(5 * len(PANELS), 4 * rows), squeeze=False)
    for run, recs in all_recs.items():
        if not recs:
            continue
        if rows == 2 and "ci95" in recs[0]:
            _plot_differences(axes[1], run.name, recs)
        toks = [r["tokens"] for r in recs]
        for ax, (key, title) in zip(axes[0], PANELS, strict=True):
            n = recs[0]["off"][key]["chunks"]
            ax.plot(toks, [r["on"][key]["bpb"] for r in recs], "o-", label=f"{run.name}: ON")
            ax.plot(
                toks,
                [r["shuffled"][key]["bpb"] for r in recs],
                "s--",
                label=f"{run.name}: shuffled",
            )
            if "baseline" in recs[0]:  # from scratch: OFF trains too, and a matched baseline
                ax.plot(toks, [r["off"][key]["bpb"] for r in recs], "^:", label=f"{run.name}: OFF")
                ax.plot(
                    toks, [r["baseline"][key]["bpb"] for r in recs], "k-", lw=1, label="baseline"
                )
            else:
                ax.axhline(recs[0]["off"][key]["bpb"], color="k", lw=1, label="OFF (= frozen base)")
            ax.set_title(f"{title} ({n} chunks)")
            ax.set_xscale("log")
            ax.set_xlabel("training tokens read")
            ax.set_ylabel("bits per byte (wikitext-mini test)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    for run in a.runs:  # the markdown table of each run, to stdout
        print(table(run))


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "curve.jsonl").read_text().splitlines() if x]


def _plot_differences(axes, name: str, recs: list[dict]) -> None:
    """Second row: ON - OFF, shuffled - OFF, ON - baseline, ON - shuffled (the reading of the
    neighbours themselves) with their paired bootstrap 95 % intervals."""
    toks = [r["tokens"] for r in recs]
    for r in recs:
        r["ci95"].setdefault("on-shuffled", _bootstrap(r, "on", "shuffled"))
    styles = (
        ("on-off", "o-"),
        ("shuffled-off", "s--"),
        ("on-baseline", "^:"),
        ("on-shuffled", "d-"),
    )
    for ax, (key, title) in zip(axes, PANELS, strict=True):
        for diff, style in styles:
            est, lo, hi = (np.array([r["ci95"][diff][key][i] for r in recs]) for i in range(3))
            ax.errorbar(toks, est, yerr=[est - lo, hi - est], fmt=style, capsize=3,
                        label=f"{name}: {diff.replace('-', ' - ')}")  # fmt: skip
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_title(f"{title}: differences [95 % CI]")
        ax.set_xscale("log")
        ax.set_xlabel("training tokens read")
        ax.set_ylabel("bpb difference (< 0: first is better)")
    axes[0].legend(fontsize=7)


def _bootstrap(rec: dict, x: str, y: str) -> dict[str, list[float]]:
    """(estimate, low, high) of bpb(x) - bpb(y) per panel, from a record's per-chunk bits."""
    from retro_eval.overlap import bootstrap_bpb_difference

    r, b = np.asarray(rec["ratios"]), np.asarray(rec["bytes"], dtype=np.float64)
    bx, by = np.asarray(rec["bits"][x]), np.asarray(rec["bits"][y])
    masks = {"all": r >= 0, "(0.0,0.125]": r <= 0.125, "(0.5,1.0]": r > 0.5}
    return {
        key: bootstrap_bpb_difference(bx[m], by[m], b[m], samples=2000, seed=0).tolist()
        for key, m in masks.items()
    }


def table(run: Path) -> str:
    """Markdown rows: tokens, steps, then ON / shuffled / OFF bpb for each panel."""

    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    recs = [json.loads(x) for x in (run / "curve.jsonl").read_text().splitlines() if x]
    cols = [f"{t}: {m}" for _, t in PANELS for m in ("ON", "shuffled", "OFF")]
    head = "| tokens | steps | " + " | ".join(cols) + " |"
    lines = [f"{run.name}", "", head, "|" + " --- |" * (2 + 3 * len(PANELS))]
    for r in recs:
        cells = [f"{r['tokens']:,}", str(r["step"])]
        for key, _ in PANELS:
            cells += [f(r["on"][key]["bpb"]), f(r["shuffled"][key]["bpb"]), f(r["off"][key]["bpb"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
