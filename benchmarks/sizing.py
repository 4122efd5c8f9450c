"""Cluster sizing from measured per-chunk figures: what a 1B-, 100B- and 1T-token database needs.

Reads ``results/embed.json`` (keys/s per core of the frozen encoder) and ``results/search.json``
(index bytes per key), and computes, per database size T tokens (C = T / m chunks, m = 64):

- chunk store: m tokens as uint16 + lengths int32 + document ids int64 + offsets int64 per chunk
  (``retro_db.chunks``): 2m + 20 bytes;
- keys: d float16 per chunk (all-MiniLM-L6-v2: d = 384, 768 bytes);
- index: the measured bytes per key of faiss IVF-PQ 4-bit fast-scan with an SQ8 re-rank (the
  setting that reaches recall@10 >= 0.9) and of the Flat and HNSW indexes for comparison;
- index on disk: the lists of the on-disk default ``IVF{nlist},SQfp16`` (issue 18): the float16
  key and an int64 id per chunk, 2d + 8 bytes, in one memory-mapped file;
- build memory per worker: with ``results/ondisk.json`` (``bench_ondisk.py``), the measured peak
  RSS of an on-disk build at its largest size, less the interpreter with its libraries loaded
  (tokenizer, faiss; the RSS when the build started): what one build process adds, whatever the
  database's size (it is flat in the size: the bench's ratios), plus the encoder's own memory;
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
    ondisk = _ondisk_memory(results, d)
    lines = [
        f"Measured here: {per_core:.0f} keys/s per core (all-MiniLM-L6-v2, {precision}, "
        f"{threads} thread(s), `embed.json`); index bytes/key at N = {sf.get('keys')} "
        f"(`search.json`): IVF-PQ4fs + SQ8 re-rank {pq or float('nan'):.0f}, Flat "
        f"{flat or float('nan'):.0f}, HNSW32 {hnsw or float('nan'):.0f}. Per chunk: chunk store "
        f"{store} B, keys {keys} B (float16, d = {d}), training neighbours {neighbours} B "
        f"(k = {K}, r = {R}).",
        "",
        "| database | chunks | chunk store | keys (fp16) | index (IVF-PQ4fs+SQ8) | "
        "index on disk (IVF-SQfp16 lists) | embedding, CPU core-hours | on 1,000 cores | "
        "training neighbours |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, tokens in SIZES.items():
        c = tokens / M
        hours = c / per_core / 3600
        lines.append(
            f"| {name} tokens | {c:.3g} | {_human(c * store)} | {_human(c * keys)} | "
            f"{_human(c * pq) if pq else 'n/a'} | {_human(c * (2 * d + 8))} | {hours:,.0f} | "
            f"{_duration(hours / 1000)} | {_human(c * neighbours)} |"
        )
    if ondisk:
        lines += ["", ondisk]
    return "\n".join(lines) + "\n"


def _ondisk_memory(results: Path, d: int) -> str | None:
    """One sentence: the memory one build process needs, from ``ondisk.json`` (or None)."""
    path = results / "ondisk.json"
    if not path.is_file():
        return None
    f = json.loads(path.read_text())["figures"]
    sizes = sorted(int(k.split("x ")[0]) for k in f if k.endswith("x build_peak_rss_mb"))
    top, one = sizes[-1], sizes[0]
    peak, base = f[f"{top}x build_peak_rss_mb"], f[f"{top}x baseline_vmrss_mb"]
    anon, base_anon = f[f"{top}x build_peak_anon_mb"], f[f"{top}x baseline_anon_mb"]
    ratio = peak / f[f"{one}x build_peak_rss_mb"]
    return (
        f"Build memory per worker (any database size; `ondisk.json`): an on-disk build of "
        f"{f[f'{top}x chunks']:,} chunks (d = {d}, shard_chunks {f['shard_chunks']}) peaked at "
        f"{peak:.0f} MB RSS, {peak - base:.0f} MB above the interpreter with its tokenizer and "
        f"faiss loaded ({base:.0f} MB; heap and arrays peaked {anon - base_anon:.0f} MB above "
        f"theirs), {ratio:.2f}x its peak at {top // one}x fewer chunks: one shard's "
        "keys and codes in blocks of ~4 MB, the bounded training sample (the driver) and a few MB "
        "of mapped lists. The encoder comes on top (MiniLM: its weights and one batch)."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args()
    print(sizing_table(args.results))


if __name__ == "__main__":
    main()
