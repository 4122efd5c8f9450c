"""Plot learning curves written by retrofit_curve.py: bpb per r(C) bin, ON / shuffled / OFF.

python docs/experiments/plot_curve.py RUN_DIR [RUN_DIR ...] --out docs/experiments/curve.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PANELS = (("all", "all chunks"), ("(0.0,0.125]", "r(C) <= 12.5%"), ("(0.5,1.0]", "r(C) > 50%"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4), squeeze=False)
    for run in a.runs:
        recs = [json.loads(x) for x in (run / "curve.jsonl").read_text().splitlines() if x]
        if not recs:
            continue
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
