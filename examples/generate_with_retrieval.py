"""Generate text with a trained RETRO checkpoint that retrieves from a database at every chunk.

    python examples/generate_with_retrieval.py runs/demo/retro runs/demo/db \
        --prompt "The history of the city" --max-new-tokens 128

The model is a training run directory (its latest checkpoint), a checkpoint directory or a
retro-fitted checkpoint (``retro_core.load_model``); ``retro-eval generate`` is the same as a command.

Greedy by default; ``--temperature``/``--top-p`` sample. Each time a chunk of m tokens completes,
its k nearest database chunks (and their continuations) are retrieved and encoded once; the
self-attention keys and values are cached. ``--off`` generates without retrieval (RETRO[OFF]).
"""

from __future__ import annotations

import argparse

import torch

from retro_core import load_model
from retro_core.generate import generate
from retro_db import Database


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("database")
    ap.add_argument("--prompt", default="The history of the city")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--off", action="store_true", help="no retrieval (RETRO[OFF])")
    args = ap.parse_args()

    model = load_model(args.checkpoint)
    db = Database.open(args.database)  # refused by generate() if its m or tokenizer differ
    prompt = db.tokenizer.encode(args.prompt)
    budget = model.config.max_seq_len - len(prompt)
    new = generate(
        model,
        prompt,
        None if args.off else db,
        max_new_tokens=min(args.max_new_tokens, budget),
        temperature=args.temperature,
        top_p=args.top_p,
        eos_id=db.tokenizer.eos_id,
        generator=torch.Generator().manual_seed(args.seed),
    )
    print(args.prompt + db.tokenizer.decode(new))


if __name__ == "__main__":
    main()
