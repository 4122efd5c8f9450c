"""Bar chart of bpb per r(C) bin for RETRO[ON], RETRO[shuffled] and RETRO[OFF] (induction runs).

    python docs/experiments/plot_bins.py NAME=RUN.curve.jsonl[:STEP] ... --out PNG

Each argument names a bar group and a ``curve.jsonl`` written by ``induction_cca.py``; ``:STEP``
picks that evaluation (default: the last line). Prints the markdown table it plots.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BINS = (("all", "all"), ("(0.0,0.125]", "r(C) <= 12.5 %"), ("(0.5,1.0]", "r(C) > 50 %"))
ROWS = (("on", "RETRO[ON]"), ("shuffled", "RETRO[shuffled]"), ("off", "RETRO[OFF]"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    recs = []
    for spec in a.runs:
        name, path = spec.split("=", 1)
        path, _, step = path.partition(":")
        lines = [json.loads(x) for x in Path(path).read_text().splitlines() if '"on"' in x]
        rec = lines[-1] if not step else next(r for r in lines if r["step"] == int(step))
        recs.append((name, rec))
    print("| run | steps | " + " | ".join(f"{b}: {r}" for _, b in BINS for _, r in ROWS) + " |")
    print("| --- " * (2 + len(BINS) * len(ROWS)) + "|")
    for name, rec in recs:
        vals = [f"{rec[key][b]['bpb']:.4f}" for b, _ in BINS for key, _ in ROWS]
        print(f"| {name} | {rec['step']} | " + " | ".join(vals) + " |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(BINS), figsize=(4.2 * len(BINS), 3.6), sharey=True)
    width = 0.8 / len(ROWS)
    for ax, (b, title) in zip(axes, BINS, strict=True):
        for j, (key, label) in enumerate(ROWS):
            ys = [rec[key][b]["bpb"] for _, rec in recs]
            xs = [i + (j - 1) * width for i in range(len(recs))]
            ax.bar(xs, ys, width, label=label)
        ax.set_xticks(range(len(recs)), [n for n, _ in recs], rotation=30, ha="right")
        ax.set_title(f"{title} ({recs[0][1]['off'][b]['chunks']} chunks)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("bits per byte (wikitext-mini test)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)


if __name__ == "__main__":
    main()
