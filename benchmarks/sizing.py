"""Cluster sizing from measured per-chunk figures: what a 1B-, 100B- and 1T-token database needs.

Reads ``results/embed.json`` (keys/s per core of the frozen encoder) and ``results/search.json``
(index bytes per key), and computes, per database size T tokens (C = T / m chunks, m = 64):

- chunk store: m tokens as uint16 + lengths int32 + document ids int64 + offsets int64 per chunk
  (``retro_db.chunks``): 2m + 20 bytes;
- keys: d float16 per chunk (all-MiniLM-L6-v2: d = 384, 768 bytes);
- index: the measured bytes per key of faiss IVF-PQ 4-bit fast-scan with an SQ8 re-rank (the
  setting that reaches recall@10 >= 0.9) and of the Flat and HNSW indexes for comparison;
- embedding: C / (keys/s per core) CPU core-hours, at the measured rate;
- training neighbours: k = 2 rows of r = 2m uint16 tokens, plus lengths, ids and distances, per
  training chunk (the dataset format of retro_core.data), for a training set as large as the
  database.

Usage: python benchmarks/sizing.py [--results benchmarks/results]   (prints markdown)
``benchmarks/run.py`` appends its output to results/SUMMARY.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
M = 64  # chunk size m
K = 2  # training neighbours k
R = 2 * M  # neighbour tokens r
SIZES = {"1B": 1e9, "100B": 1e11, "1T": 1e12}


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(nbytes) < 1000:
            return f"{nbytes:.3g} {unit}"
        nbytes /= 1000
    return f"{nbytes:.3g} EB"


def _duration(hours: float) -> str:
    return f"{hours * 60:.0f} min" if hours < 2 else f"{hours:,.0f} h"


def _bytes_per_key(search: dict, prefix: str, contains: str = "") -> float | None:
    for key, value in search.get("figures", {}).items():
        name = key.removesuffix(" bytes_per_key")
        if key.endswith("bytes_per_key") and name.startswith(prefix) and contains in name:
            return float(value)
    return None


def sizing_table(results: Path) -> str:
    """Markdown: per-chunk figures and the needs of 1B/100B/1T-token databases."""
    embed = json.loads((results / "embed.json").read_text())
    search = json.loads((results / "search.json").read_text())
    ef, sf = embed["figures"], search["figures"]
    threads = int(ef.get("threads", 1))
    precision = "bf16" if "bf16_chunks_per_s" in ef else "fp32"
    per_core = float(ef[f"{precision}_chunks_per_s"]) / threads
    d = int(sf.get("dim", 384))
    store = 2 * M + 4 + 8 + 8
    keys = 2 * d
    pq = _bytes_per_key(search, "IVF", "Refine(SQ8)")
    flat = _bytes_per_key(search, "Flat")
    hnsw = _bytes_per_key(search, "HNSW")
    neighbours = K * R * 2 + K * (4 + 8 + 4)
    lines = [
        f"Measured here: {per_core:.0f} keys/s per core (all-MiniLM-L6-v2, {precision}, "
        f"{threads} thread(s), `embed.json`); index bytes/key at N = {sf.get('keys')} "
        f"(`search.json`): IVF-PQ4fs + SQ8 re-rank {pq or float('nan'):.0f}, Flat "
        f"{flat or float('nan'):.0f}, HNSW32 {hnsw or float('nan'):.0f}. Per chunk: chunk store "
        f"{store} B, keys {keys} B (float16, d = {d}), training neighbours {neighbours} B "
        f"(k = {K}, r = {R}).",
        "",
        "| database | chunks | chunk store | keys (fp16) | index (IVF-PQ4fs+SQ8) | "
        "embedding, CPU core-hours | on 1,000 cores | training neighbours |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, tokens in SIZES.items():
        c = tokens / M
        hours = c / per_core / 3600
        lines.append(
            f"| {name} tokens | {c:.3g} | {_human(c * store)} | {_human(c * keys)} | "
            f"{_human(c * pq) if pq else 'n/a'} | {hours:,.0f} | {_duration(hours / 1000)} | "
            f"{_human(c * neighbours)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args()
    print(sizing_table(args.results))


if __name__ == "__main__":
    main()
