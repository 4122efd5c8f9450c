"""Run every benchmark in this folder and write a summary (`nox -s bench`).

Each benchmark is a script `benchmarks/bench_<name>.py` that accepts `--out PATH` (and `--quick`)
and writes one JSON object:

    {"name": str, "figures": {name: number, ...},
     "ratios": [{"what": str, "ratio": float, "target": str, "met": bool}, ...],
     "notes": [str, ...]}

This runner adds the machine (CPU model, cores, library versions) and writes
`benchmarks/results/<name>.json` and `benchmarks/results/SUMMARY.md`.
Usage: python benchmarks/run.py [--quick] [--only NAME ...] [--data DIR]

The benchmarks that read real text (embed, growth, minhash, search) read retro-eval's shipped packs;
``--data DIR`` passes the raw text folder the packs were built from to them instead (see _corpus.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DATA_READERS = {"embed", "growth", "minhash", "search"}  # the benchmarks with a --data option
LIBRARIES = [
    "torch",
    "numpy",
    "faiss-cpu",
    "datasketch",
    "transformers",
    "sentence-transformers",
    "lm-eval",
    "retro-core",
    "retro-db",
    "retro-eval",
]


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    libs = {}
    for lib in LIBRARIES:
        try:
            libs[lib] = version(lib)
        except PackageNotFoundError:
            libs[lib] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "libraries": libs,
    }


def summary(results: list[dict], info: dict) -> str:
    lines = [
        "# Benchmark summary",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, {info['date']}.",
        "Libraries: " + ", ".join(f"{k} {v}" for k, v in info["libraries"].items() if v) + ".",
        "",
        "| benchmark | what | ratio | target | met |",
        "| --- | --- | --- | --- | --- |",
    ]
    for res in results:
        for r in res.get("ratios", []):
            met = "yes" if r.get("met") else "**no**"
            lines.append(
                f"| {res['name']} | {r['what']} | {r['ratio']:.2f} | {r.get('target', '')} | {met} |"
            )
    for res in results:
        lines += ["", f"## {res['name']}", "", "| figure | value |", "| --- | --- |"]
        for k, v in res.get("figures", {}).items():
            lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
        for note in res.get("notes", []):
            lines.append(f"\n{note}")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    ap.add_argument("--only", nargs="*", help="benchmark names to run (default: all)")
    ap.add_argument(
        "--data",
        type=Path,
        default=None,
        help="raw real-text folder for the benchmarks that read text (default: the shipped packs)",
    )
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in args.only]
    info = machine()
    results, failed = [], []
    for script in scripts:
        name = script.stem.removeprefix("bench_")
        out = RESULTS / f"{name}.json"
        cmd = [sys.executable, str(script), "--out", str(out)] + (["--quick"] if args.quick else [])
        if args.data is not None and name in DATA_READERS:
            cmd += ["--data", str(args.data.resolve())]
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
            continue
        res = json.loads(out.read_text())
        res["machine"] = info
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        out.write_text(json.dumps(res, indent=2) + "\n")
        results.append(res)
    # The summary covers every result on disk, so `--only NAME` refreshes one benchmark's rows.
    ran = {r["name"] for r in results}
    for path in sorted(RESULTS.glob("*.json")):
        try:
            res = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(res, dict) and res.get("name") not in ran and "ratios" in res:
            results.append(res)
    results.sort(key=lambda r: r["name"])
    text = summary(results, info)
    if (RESULTS / "embed.json").exists() and (RESULTS / "search.json").exists():
        from sizing import sizing_table

        text += "\n## Sizing (benchmarks/sizing.py)\n\n" + sizing_table(RESULTS)
    (RESULTS / "SUMMARY.md").write_text(text)
    print(text)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
