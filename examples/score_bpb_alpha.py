"""Score your own text with bpb(alpha): bits per byte split by overlap with the database.

    python examples/score_bpb_alpha.py runs/demo/retro/checkpoints/step_00000300 runs/demo/db \
        my_text.txt [more.txt ...]

For each evaluation chunk C of m tokens, r(C) is the longest common token substring between C and
its 10 nearest database neighbours (chunk + continuation), divided by m (the paper's section 2.6).
bpb(alpha) is the bits per byte over the chunks with r(C) <= alpha: a low alpha keeps only text
that the database does not contain, i.e. the leakage-free part of the score.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from retro_core.checkpoint import load_checkpoint
from retro_db import Database
from retro_eval.overlap import bucket_bpb, chunk_overlap_ratios
from retro_eval.perplexity import retrieve_document_neighbours, score_documents


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("database")
    ap.add_argument("texts", nargs="+", type=Path)
    ap.add_argument("--k", type=int, default=2, help="neighbours given to the model")
    args = ap.parse_args()

    model = load_checkpoint(args.checkpoint).eval()
    db = Database.open(args.database)
    docs = [p.read_text(encoding="utf-8") for p in args.texts]
    # Retrieve the 10 nearest neighbours of every chunk once: the model reads the first k, the
    # overlap measure all 10 (as the paper does).
    token_docs = [db.tokenizer.encode(d) for d in docs]
    nb10 = retrieve_document_neighbours(
        db, token_docs, chunk_size=db.chunk_size, k=10, pad_id=db.pad_id
    )
    on = score_documents(
        model, db.tokenizer, docs, neighbours=[n.first(args.k) for n in nb10], k=args.k
    )
    off = score_documents(model, db.tokenizer, docs)  # RETRO[OFF]: the same model, no neighbours
    overlap = chunk_overlap_ratios(
        on.chunk_tokens,
        on.tokens,
        np.concatenate([n.tokens for n in nb10]),  # [C, 10, r], chunks in document order
        np.concatenate([n.lengths for n in nb10]),
        chunk_size=db.chunk_size,
    )
    print("alpha   chunks   RETRO[ON]   RETRO[OFF]")
    for b_on, b_off in zip(
        bucket_bpb(on.bits, on.bytes, overlap),
        bucket_bpb(off.bits, off.bytes, overlap),
        strict=True,
    ):
        if b_on["empty"]:
            print(f"{b_on['alpha']:6.1%}  {0:6d}   empty")
        else:
            print(
                f"{b_on['alpha']:6.1%}  {b_on['chunks']:6d}   {b_on['bpb']:.4f}      {b_off['bpb']:.4f}"
            )


if __name__ == "__main__":
    main()
