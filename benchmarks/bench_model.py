"""RETRO model speed: training step vs the matched baseline, KV-cached vs uncached generation.

1. Training step (forward + backward + AdamW) of RETRO against the same decoder without CCA
   (``cca_layers=()``) at m=64, k=2, r=128, n=512 (issue 3 target: ratio <= 1.3). Measured for an
   encoder as wide as the decoder (d' = d, the config default) and narrower ones (d/2, d/4). The
   encoder reads k·r = 4m tokens per chunk, i.e. 4n tokens per sequence, so with d' = d its two
   layers cost about as much as 8 decoder layers: the ratio is bounded below by ~1.6 for a
   12-layer decoder; a narrower encoder (``enc_d_model``) brings it down.
2. Greedy generation of 512 new tokens (``--quick``: 128) with retrieval at every chunk boundary:
   ``generate(use_cache=False)`` (full recompute each step) over ``use_cache=True``
   (target: >= 5x). The retriever is an in-memory fake (deterministic random neighbours), so the
   figure is the model's cost, not a database's.

Usage: python benchmarks/bench_model.py --out results/model.json [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from retro_core import Retro, RetroConfig, generate
from retro_core.retrieval import Neighbours

M, K, N = 64, 2, 512  # chunk size m, neighbours k, sequence length n
R = 2 * M


class RandomRetriever:
    """Neighbours drawn from a seeded generator keyed by the query chunk (deterministic)."""

    chunk_size = M
    tokenizer_id = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def retrieve(self, chunks, k, exclude_doc_ids=None):
        chunks = np.asarray(chunks)
        rows = []
        for c in chunks:
            rng = np.random.default_rng(abs(hash(c.tobytes())) % (2**32))
            rows.append(rng.integers(0, self.vocab_size, size=(k, R)))
        tokens = np.stack(rows)
        q = len(chunks)
        return Neighbours(
            tokens=tokens,
            lengths=np.full((q, k), R, dtype=np.int32),
            chunk_ids=np.zeros((q, k), dtype=np.int64),
        )


def config(d: int, layers: int, vocab: int, enc_d: int | None = None, **kw) -> RetroConfig:
    return RetroConfig(
        vocab_size=vocab,
        d_model=d,
        n_heads=max(1, d // 32),
        n_layers=layers,
        chunk_size=M,
        num_neighbours=K,
        enc_d_model=enc_d,
        enc_n_heads=None if enc_d is None else max(1, enc_d // 32),
        **kw,
    )


def time_train_steps(cfg: RetroConfig, batch: int, steps: int, seed: int = 0) -> float:
    """Median CPU seconds per training step (forward, backward, AdamW) on random data.

    Process CPU time, not wall time: with one thread it is what the step costs, whatever else
    runs on a shared machine.
    """
    torch.manual_seed(seed)
    model = Retro(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (batch, N + 1), generator=g)
    nb = torch.randint(0, cfg.vocab_size, (batch, N // M, K, R), generator=g)
    times = []
    for i in range(steps + 2):
        t0 = time.process_time()
        logits = model(x[:, :-1], nb if cfg.is_retro else None)
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:  # two warm-up steps
            times.append(time.process_time() - t0)
    return statistics.median(times)


def time_generation(cfg: RetroConfig, new_tokens: int, use_cache: bool) -> tuple[float, list[int]]:
    torch.manual_seed(0)
    model = Retro(cfg).eval()
    prompt = list(range(1, 17))
    t0 = time.process_time()  # CPU seconds (one thread): robust to a shared machine
    out = generate(model, prompt, RandomRetriever(cfg.vocab_size), new_tokens, use_cache=use_cache)
    return time.process_time() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    d, layers, vocab, batch = 128, 12, 2048, 2
    steps = 3 if args.quick else 8
    figures: dict[str, float | int | str] = {
        "d": d,
        "layers": layers,
        "m": M,
        "k": K,
        "n": N,
        "batch": batch,
        "threads": args.threads,
    }
    ratios, notes = [], []

    retro = config(d, layers, vocab)
    figures["cca_layers"] = str(retro.cca_layers)
    t_base = time_train_steps(retro.baseline(), batch, steps)
    t_retro = time_train_steps(retro, batch, steps)
    t_retro_half = time_train_steps(config(d, layers, vocab, enc_d=d // 2), batch, steps)
    t_retro_quarter = time_train_steps(config(d, layers, vocab, enc_d=d // 4), batch, steps)
    figures.update(
        {
            "train_step_s_baseline": t_base,
            "train_step_s_retro": t_retro,
            "train_step_s_retro_enc_half": t_retro_half,
            "train_step_s_retro_enc_quarter": t_retro_quarter,
        }
    )
    for what, t in (("d'=d", t_retro), ("d'=d/2", t_retro_half), ("d'=d/4", t_retro_quarter)):
        ratio = t / t_base
        ratios.append(
            {
                "what": f"train step RETRO ({what}) / baseline",
                "ratio": ratio,
                "target": "<= 1.3",
                "met": ratio <= 1.3,
            }
        )
        print(
            f"train step: RETRO ({what}) {t * 1e3:.1f} ms, baseline {t_base * 1e3:.1f} ms, "
            f"ratio {ratio:.2f}",
            flush=True,
        )

    new_tokens = 128 if args.quick else 512
    gen_cfg = config(d, layers, vocab, max_seq_len=1024)
    t_cached, out_cached = time_generation(gen_cfg, new_tokens, use_cache=True)
    t_full, out_full = time_generation(gen_cfg, new_tokens, use_cache=False)
    speedup = t_full / t_cached
    figures.update(
        {
            "gen_new_tokens": new_tokens,
            "gen_s_cached": t_cached,
            "gen_s_uncached": t_full,
            "gen_tokens_per_s_cached": new_tokens / t_cached,
        }
    )
    ratios.append(
        {
            "what": f"generation of {new_tokens} tokens: uncached / cached",
            "ratio": speedup,
            "target": ">= 5",
            "met": speedup >= 5,
        }
    )
    print(
        f"generation ({new_tokens} tokens): cached {t_cached:.2f} s, uncached {t_full:.2f} s, "
        f"speedup {speedup:.1f}x",
        flush=True,
    )
    if out_cached != out_full:
        notes.append("WARNING: cached and uncached greedy generations differ")
    notes.append(
        "Times are process CPU seconds (one thread). Training step: median of forward+backward+AdamW on random tokens and neighbours, after two "
        "warm-up steps; RETRO and its matched baseline (cca_layers=()) built from the same config. "
        "Generation: greedy, prompt of 16 tokens, a fake in-memory retriever called at every "
        "chunk boundary (uncached: for every complete chunk at every step)."
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"name": "model", "figures": figures, "ratios": ratios, "notes": notes}, indent=2
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
