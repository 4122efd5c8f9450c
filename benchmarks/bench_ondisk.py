"""Databases larger than memory (issue 18): build memory at 1x/4x/8x/16x text, on-disk index.

Each size is built in a fresh child process, as ``bench_growth.py`` does (real text cut into
<= 4000-character pieces, ``hash:384`` keys so the pipeline is measured rather than the encoder,
faiss 1 thread, ``--shard-chunks`` 1024, the text twice: ``--repeat`` 2, so that 1x already
fills several shards and the largest IVF the memory allows), but with the index chosen as on a machine whose memory is
smaller than the database: ``retro_db.index.available_memory`` is made to answer ``--memory-mb``
(default 1 MB: the packs make databases of tens of MB), so :func:`retro_db.index.choose_index` puts the IVF lists on disk
(``IVF{nlist},SQfp16``, trained on a bounded sample, shard codes merged into an ``.ivfdata`` file).
Peak memory is the child's ``VmHWM`` (peak RSS, file pages it has mapped included; the page cache
of the files written is not in it), reset when the build starts: not ``ru_maxrss``, which for a
child starts at its parent's RSS (the bench, holding all the text) and so hides the build's own
peak at small sizes (both are reported). At that peak the pages of each mapped database file are
read from /proc/self/smaps (``mapped_mb_at_peak``).

Then, on the largest database, the on-disk index against the same index in memory at equal
parameters (its trained empty index with every key added in RAM, the same nprobe): queries/s
(1 thread, 1000 of its own keys, k = 10) and recall@10 against exact search on the keys.

Ratios: build peak RSS at 4x and 16x against 1x (target <= 1.25, 8x reported), build chunks/s at
16x against 1x (target >= 0.8), on-disk / in-memory queries/s and recall@10.

Usage: python benchmarks/bench_ondisk.py [--quick] [--out PATH] [--memory-mb N] [--data DIR]
       [--shard-chunks N] [--repeat R]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _corpus
from bench_growth import PIECE_CHARS, pieces, write_jsonl

HERE = Path(__file__).resolve().parent
SIZES = (1, 4, 8, 16)


class AnonPeak:
    """Samples /proc/self/status every 20 ms in a thread: the peak of ``RssAnon``, the memory the
    process holds itself (heap, arrays), without the file pages it has mapped (the keys and the
    on-disk lists, which ``ru_maxrss`` counts while mapped but the kernel can reclaim); and, at
    the peak of ``VmRSS`` (what ``ru_maxrss`` records), the mapped pages of each file under
    ``watch`` (/proc/self/smaps; shard folders written ``shards/*``), to name what a peak holds."""

    def __init__(self, watch: Path | None = None) -> None:
        import threading

        self.watch = str(watch.resolve()) + "/" if watch is not None else None
        self.peak = self.now()
        self.peak_rss, self.snap_rss, self.files = 0, 0, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def status() -> dict[str, int]:
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
        return out

    @classmethod
    def now(cls) -> int:
        return cls.status().get("RssAnon", 0)

    def mapped_files(self) -> dict[str, float]:
        """MB of mapped pages of each file under ``watch``, and of all other files together."""
        import re

        out: dict[str, float] = {}
        cur = None
        for line in Path("/proc/self/smaps").read_text().splitlines():
            head = line.split(None, 5)
            if re.match(r"^[0-9a-f]+-[0-9a-f]+$", head[0]):
                cur = head[5] if len(head) > 5 and head[5].startswith("/") else None
            elif head[0] == "Rss:" and cur is not None:
                name = "other files (libraries)"
                if self.watch and cur.startswith(self.watch):
                    name = re.sub(r"^shards/[^/]+/", "shards/*/", cur[len(self.watch) :])
                out[name] = out.get(name, 0.0) + int(head[1]) / 1024
        return {k: round(v, 2) for k, v in sorted(out.items()) if v}

    def _sample(self) -> None:
        st = self.status()
        self.peak = max(self.peak, st.get("RssAnon", 0))
        rss = st.get("VmRSS", 0)
        if rss > self.peak_rss:
            self.peak_rss = rss
            if rss > self.snap_rss + (256 << 10):  # smaps is read at a new peak only
                self.snap_rss, self.files = rss, self.mapped_files()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self._sample()
        return self.peak


def _cut(text: str, limit: int) -> list[str]:
    """``text`` in parts of at most ~``limit`` characters, cut at spaces."""
    out = []
    while len(text) > limit:
        at = text.rfind(" ", 0, limit)
        at = at if at > 0 else limit
        out.append(text[:at])
        text = text[at:].lstrip()
    return [*out, text] if text else out


def child(args: argparse.Namespace) -> int:
    """One size, in its own process: build with the memory answer patched; print one JSON line."""
    import faiss  # noqa: F401  (loaded before the baseline is taken, as the build loads it)

    import retro_db.index
    from retro_db.build import build_database
    from retro_db.tokenizer import load_tokenizer

    retro_db.index.available_memory = lambda: args.memory_mb << 20
    tok = load_tokenizer()
    tok.encode_batch(["warm up"])
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss of a child starts at its parent's RSS (the kernel keeps the pre-exec image's
    # peak: here the bench holding all the text, ~190 MB), and it counts the interpreter's own
    # start-up peak: the build's peak RSS is VmHWM, reset to the current RSS now ("5" in
    # clear_refs), read after the build (the kernel's exact peak, file pages included)
    Path("/proc/self/clear_refs").write_text("5")
    base_rss = AnonPeak.status()["VmRSS"]
    base_anon = AnonPeak.now()
    anon = AnonPeak(Path(args.db))
    t0 = time.perf_counter()
    db = build_database(
        str(args.corpus),
        Path(args.db),
        tokenizer=tok,
        embedder="hash:384",
        threads=1,
        shard_chunks=args.shard_chunks,
        progress=False,
    )
    build_s = time.perf_counter() - t0
    anon_peak = anon.stop()
    res = {
        "baseline_anon_mb": base_anon / 2**20,
        "build_peak_anon_mb": anon_peak / 2**20,
        "chunks": db.num_chunks,
        "index": db.manifest["index"]["factory"],
        "on_disk": bool(db.manifest["index"].get("on_disk")),
        "search_params": db.search_params,
        "build_s": build_s,
        "baseline_rss_mb": base_kb / 1024,
        "baseline_vmrss_mb": base_rss / 2**20,
        "build_peak_rss_mb": AnonPeak.status()["VmHWM"] / 2**20,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "sampled_peak_rss_mb": anon.peak_rss / 2**20,
        "mapped_mb_at_peak": anon.files,
    }
    if args.compare:
        res.update(compare(db))
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def compare(db) -> dict:
    """queries/s and recall@10 of the on-disk index and of the same index in memory."""
    import faiss
    import numpy as np

    from retro_db.index import apply_search_params, exact_search_blocks, read_index

    faiss.omp_set_num_threads(1)
    mem = read_index(db.path / db.manifest["index"]["trained"], mmap=False, dim=db.dim)
    for block in db.key_blocks():
        mem.add(np.asarray(block, dtype=np.float32))
    apply_search_params(mem, db.search_params)
    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(db.num_chunks, size=min(1000, db.num_chunks), replace=False))
    q = db.keys(ids)
    _, truth = exact_search_blocks(db.key_blocks(), q, 10)
    out = {}
    for name, index in (("ondisk", db.index), ("memory", mem)):
        index.search(q[:10], 10)  # warm (the on-disk lists come into the page cache)
        t0 = time.perf_counter()
        _, got = index.search(q, 10)
        s = time.perf_counter() - t0
        hits = sum(len(set(t) & set(g)) for t, g in zip(truth, got, strict=True))
        out[f"{name}_qps"] = len(q) / s
        out[f"{name}_recall@10"] = hits / truth.size
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1x = 1/17.6 of the corpus, not 1/16")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "ondisk.json")
    ap.add_argument("--shard-chunks", type=int, default=1024)
    ap.add_argument("--memory-mb", type=int, default=1, help="memory the build is told it has")
    ap.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="the text this many times (16x = all of it; each copy's chunks shifted; "
        "default 2, --quick 1)",
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    ap.add_argument("--compare", action="store_true", help=argparse.SUPPRESS)
    _corpus.add_argument(ap)
    args = ap.parse_args()
    if args.child:
        return child(args)

    # a paragraph longer than a piece stays whole in pieces() (SQuAD articles of up to 118k
    # characters, 0.43-0.46 into the doubled text): cut at spaces too, so that every size has the
    # same mix of document lengths (else 8x and 16x peak on those documents alone, 1.3x of 1x)
    docs = [p for d in pieces(args.data) for p in _cut(d, PIECE_CHARS)]
    # copies after the first: "(copy r)" first shifts every chunk boundary (no duplicate texts,
    # which the build would skip, nor duplicate chunks)
    args.repeat = args.repeat or (1 if args.quick else 2)
    docs = [d if r == 0 else f"(copy {r})\n\n{d}" for r in range(args.repeat) for d in docs]
    total = sum(len(d) for d in docs)
    unit = total / (17.6 if args.quick else 16)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-ondisk-") as tmp:
        tmp = Path(tmp)
        for size in SIZES:
            corpus, chars = [], 0
            for d in docs:
                if chars >= size * unit:
                    break
                corpus.append(d)
                chars += len(d)
            write_jsonl(tmp / f"corpus{size}.jsonl", corpus, 0)
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--corpus",
                str(tmp / f"corpus{size}.jsonl"),
                "--db",
                str(tmp / f"db{size}"),
                "--shard-chunks",
                str(args.shard_chunks),
                "--memory-mb",
                str(args.memory_mb),
                *(["--compare"] if size == SIZES[-1] else []),
            ]
            env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                sys.stderr.write(out.stderr)
                raise SystemExit(f"size {size}x failed (exit {out.returncode})")
            line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
            r = json.loads(line.removeprefix("RESULT "))
            r["chars"] = chars
            r["chunks_per_s"] = r["chunks"] / r["build_s"]
            runs[size] = r
            print(f"{size}x: {json.dumps(r)}", flush=True)
            shutil.rmtree(tmp / f"db{size}", ignore_errors=True)

    r1, top = runs[1], runs[SIZES[-1]]
    figures: dict = {
        "memory_mb_told": args.memory_mb,
        "shard_chunks": args.shard_chunks,
        "repeat": args.repeat,
    }
    for s, r in runs.items():
        for k in (
            "chunks",
            "index",
            "on_disk",
            "build_s",
            "chunks_per_s",
            "baseline_rss_mb",
            "ru_maxrss_mb",
            "baseline_vmrss_mb",
            "build_peak_rss_mb",
            "baseline_anon_mb",
            "build_peak_anon_mb",
            "sampled_peak_rss_mb",
            "mapped_mb_at_peak",
        ):
            v = r[k]
            figures[f"{s}x {k}"] = round(v, 2) if isinstance(v, float) else v
    for k in ("ondisk_qps", "memory_qps", "ondisk_recall@10", "memory_recall@10"):
        figures[f"{SIZES[-1]}x {k}"] = round(top[k], 3)
    ratios = []
    for s in (4, 8, 16):
        mem = runs[s]["build_peak_rss_mb"] / r1["build_peak_rss_mb"]
        ratios.append(
            {
                "what": f"build peak RSS {s}x / 1x (on-disk index)",
                "ratio": round(mem, 3),
                "target": "<= 1.25" if s != 8 else "reported",
                "met": mem <= 1.25,
            }
        )
    for s in (4, 8, 16):
        mem = runs[s]["build_peak_anon_mb"] / r1["build_peak_anon_mb"]
        ratios.append(
            {
                "what": f"build peak anonymous RSS {s}x / 1x (heap and arrays; no mapped files)",
                "ratio": round(mem, 3),
                "target": "<= 1.25" if s != 8 else "reported",
                "met": mem <= 1.25,
            }
        )
    thr = top["chunks_per_s"] / r1["chunks_per_s"]
    ratios.append(
        {
            "what": f"build chunks/s {SIZES[-1]}x / 1x ({r1['chunks']} -> {top['chunks']} chunks)",
            "ratio": round(thr, 3),
            "target": ">= 0.8",
            "met": thr >= 0.8,
        }
    )
    ratios.append(
        {
            "what": f"queries/s on disk / in memory ({top['index']}, {top['search_params']})",
            "ratio": round(top["ondisk_qps"] / top["memory_qps"], 3),
            "target": "reported (page cache warm)",
            "met": True,
        }
    )
    ratios.append(
        {
            "what": "recall@10 on disk / in memory (same codes, same nprobe)",
            "ratio": round(top["ondisk_recall@10"] / top["memory_recall@10"], 3),
            "target": "1",
            "met": abs(top["ondisk_recall@10"] - top["memory_recall@10"]) < 1e-9,
        }
    )
    notes = [
        f"{'QUICK: ' if args.quick else ''}1x = {r1['chunks']} chunks ({r1['chars']} chars of "
        f"{_corpus.describe(args.data)}); sizes {', '.join(str(runs[s]['chunks']) for s in SIZES)}"
        f" chunks; hash:384, faiss 1 thread, shard_chunks {args.shard_chunks}; the build was "
        f"told it has {args.memory_mb} MB, so its index went on disk ({top['index']}).",
        "At small sizes the peak is mostly the loaded interpreter (RSS when the build starts "
        f"{r1['baseline_vmrss_mb']:.0f} MB): the ratios then say little; use --data or --repeat "
        "for more text.",
    ]
    result = {"name": "ondisk", "figures": figures, "ratios": ratios, "notes": notes}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(ratios, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
