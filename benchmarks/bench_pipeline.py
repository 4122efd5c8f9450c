"""The demo pipeline's two slowest stages, at the default demo's model size (``--scale small``).

The default demo (``nox -s demo``) spends its time in training RETRO (the slowest stage) and in
evaluation. This benchmark measures both at that model's geometry (d=256, 6 layers with CCA in
3 and 6, |V| = 50,257 GPT-2 tokens, m=64, k=2, r=128, n=256, batch 4, bf16 autocast, one thread):

1. Evaluation tokens/s with retrieval (RETRO[ON]) of ``retro_eval.perplexity.score_token_documents``
   with strided windows (n=256, s=128): reading out logits at every position (what it did before)
   against only from the first scored position (``logits_to_keep``, now). The bits must agree.
2. Training step (forward, backward, AdamW) with PyTorch's default (foreach) AdamW against its
   fused CPU kernel (``fused=True``), and the FLOP
   budget of one step: the |V|-way read-out, the decoder body and the encoder, with the achieved
   FLOP/s. The step is compute-bound in the read-out matmul: see the notes.

Usage: python benchmarks/bench_pipeline.py --out results/pipeline.json [--quick] [--threads 1]
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

from retro_core import Retro, RetroConfig
from retro_eval.perplexity import DocumentNeighbours, score_token_documents

V, D, LAYERS, M, K, N, BATCH = 50_257, 256, 6, 64, 2, 256, 4
R = 2 * M


def demo_config(**kw) -> RetroConfig:
    """The default demo's RETRO (retro_eval.demo.SCALES['small'])."""
    return RetroConfig(
        vocab_size=V,
        d_model=D,
        n_heads=4,
        n_layers=LAYERS,
        enc_layers=2,
        cca_layers=(3, 6),
        chunk_size=M,
        num_neighbours=K,
        max_seq_len=N,
        pad_id=V - 1,
        **kw,
    )


class FullReadout(torch.nn.Module):
    """The model without ``logits_to_keep``: the scorer then reads out every position."""

    def __init__(self, model: Retro):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, tokens, neighbours=None, neighbour_lengths=None):
        return self.model(tokens, neighbours, neighbour_lengths)


def time_scoring(model, docs, nbs, repeats: int) -> tuple[float, np.ndarray]:
    """Median CPU seconds of scoring every document with retrieval, and the bits per chunk."""
    times, bits = [], None
    for _ in range(repeats):
        t0 = time.process_time()
        res = score_token_documents(
            model,
            docs,
            decode=lambda ids: "x" * len(ids),
            prefix_id=V - 1,
            neighbours=nbs,
            window=N,
            stride=N // 2,
            batch_size=4,
            progress=False,
        )
        times.append(time.process_time() - t0)
        bits = res.bits
    return statistics.median(times), bits


def step_flops(cfg: RetroConfig, tokens: int) -> dict[str, float]:
    """Matmul FLOPs of one training step (x3: forward + backward), by part."""
    d, de = cfg.d_model, cfg.enc_d_model or cfg.d_model
    k, r, m = cfg.num_neighbours, cfg.neighbour_len or 2 * cfg.chunk_size, cfg.chunk_size
    ff, ffe = 4 * d, 4 * de
    layer = 2 * (4 * d * d + 2 * d * ff)  # projections + FFW per token
    attn = 2 * 2 * N * d  # QK^T and AV per token (causal: about half; counted full)
    enc_tokens = tokens // m * k * r
    enc_layer = 2 * (4 * de * de + 2 * de * ffe) + 2 * 2 * r * de + 2 * (2 * de * d)  # + cross-attn
    cca = 2 * (2 * d * d) * tokens + 2 * (2 * de * d) * enc_tokens + 2 * 2 * k * r * d * tokens
    return {
        "readout": 3 * 2 * tokens * d * cfg.vocab_size,
        "decoder": 3 * cfg.n_layers * (layer + attn) * tokens,
        "encoder": 3 * cfg.enc_layers * enc_layer * enc_tokens,
        "cca": 3 * len(cfg.cca_layers) * cca,
    }


def time_train_steps(cfg: RetroConfig, fused: bool, steps: int) -> float:
    """Median CPU seconds per step: bf16 autocast forward, fp32 cross-entropy, backward, AdamW."""
    torch.manual_seed(0)
    model = Retro(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (BATCH, N + 1), generator=g)
    nb = torch.randint(0, V, (BATCH, N // M, K, R), generator=g)
    times = []
    for i in range(steps + 1):
        t0 = time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x[:, :-1], nb)
        loss = F.cross_entropy(logits.float().reshape(-1, V), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 1:  # one warm-up step
            times.append(time.process_time() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = demo_config()
    figures: dict[str, float | int | str] = {
        "model": f"d={D}, {LAYERS} layers, CCA {cfg.cca_layers}, |V|={V}, m={M}, k={K}, n={N}",
        "threads": args.threads,
    }
    ratios, notes = [], []

    # 1. evaluation with retrieval ----------------------------------------------------------
    rng = np.random.default_rng(0)
    n_docs, doc_len = (2, 1024) if args.quick else (4, 2048)
    docs = [rng.integers(0, V - 1, size=doc_len).tolist() for _ in range(n_docs)]
    nbs = []
    for _ in docs:
        c = doc_len // M
        nbs.append(
            DocumentNeighbours(
                tokens=rng.integers(0, V - 1, size=(c, K, R)),
                lengths=np.full((c, K), R, dtype=np.int64),
                chunk_ids=np.zeros((c, K), dtype=np.int64),
            )
        )
    torch.manual_seed(0)
    model = Retro(cfg).eval()
    repeats = 1 if args.quick else 3
    t_full, bits_full = time_scoring(FullReadout(model), docs, nbs, repeats)
    t_keep, bits_keep = time_scoring(model, docs, nbs, repeats)
    t_off_full, _ = time_scoring(FullReadout(model), docs, None, repeats)
    t_off_keep, _ = time_scoring(model, docs, None, repeats)
    tokens = n_docs * doc_len
    max_diff = float(np.max(np.abs(bits_full - bits_keep)))
    figures.update(
        {
            "eval_tokens": tokens,
            "eval_tokens_per_s_retro_on_full_readout": tokens / t_full,
            "eval_tokens_per_s_retro_on": tokens / t_keep,
            "eval_max_abs_diff_bits_per_chunk": max_diff,
            "eval_tokens_per_s_retro_off_full_readout": tokens / t_off_full,
            "eval_tokens_per_s_retro_off": tokens / t_off_keep,
        }
    )
    ratios.append(
        {
            "what": "evaluation RETRO[OFF] tokens/s: logits_to_keep / full read-out",
            "ratio": t_off_full / t_off_keep,
            "target": "> 1",
            "met": t_off_full > t_off_keep,
        }
    )
    speedup = t_full / t_keep
    ratios.append(
        {
            "what": "evaluation RETRO[ON] tokens/s: logits_to_keep / full read-out",
            "ratio": speedup,
            "target": "> 1 (same bits)",
            "met": speedup > 1 and max_diff < 1e-3,
        }
    )
    print(
        f"evaluation with retrieval: {tokens / t_keep:.0f} tokens/s (full read-out "
        f"{tokens / t_full:.0f}), {speedup:.2f}x, max |diff| {max_diff:.2e} bits/chunk",
        flush=True,
    )

    # 2. training step ------------------------------------------------------------------------
    steps = 2 if args.quick else 5
    t_foreach = time_train_steps(cfg, fused=False, steps=steps)
    t_fused = time_train_steps(cfg, fused=True, steps=steps)
    flops = step_flops(cfg, BATCH * N)
    total = sum(flops.values())
    figures.update(
        {
            "train_step_s_adamw_foreach": t_foreach,
            "train_step_s_adamw_fused": t_fused,
            "train_step_gflop": total / 1e9,
            "train_achieved_gflop_per_s": total / t_fused / 1e9,
            **{f"train_flop_share_{k}": v / total for k, v in flops.items()},
        }
    )
    ratios.append(
        {
            "what": "demo train step: AdamW foreach / fused",
            "ratio": t_foreach / t_fused,
            "target": "(measured, not adopted below 1.1)",
            "met": t_foreach / t_fused >= 1.1,
        }
    )
    print(
        f"train step: foreach AdamW {t_foreach:.2f} s, fused {t_fused:.2f} s "
        f"({t_foreach / t_fused:.2f}x); {total / 1e9:.0f} GFLOP/step "
        + ", ".join(f"{k} {v / total:.0%}" for k, v in flops.items())
        + f"; {total / t_fused / 1e9:.0f} GFLOP/s",
        flush=True,
    )
    notes.append(
        "CPU seconds of one thread. Evaluation: random tokens and neighbours, windows n=256 with "
        "stride 128 (the demo's), batch 4; both runs score the same tokens. Training: random data, "
        "median of the steps after one warm-up. FLOPs count matmuls only (x3 for forward and "
        "backward); the |V|-way read-out and the encoder over k*r = 4m tokens per chunk are most of "
        "them, so cheaper steps need fewer FLOPs (a narrower encoder, enc_d_model; see the model "
        "benchmark), not less overhead."
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"name": "pipeline", "figures": figures, "ratios": ratios, "notes": notes}, indent=2
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
