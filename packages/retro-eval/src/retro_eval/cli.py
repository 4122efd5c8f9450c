"""``retro-eval``: run | report | demo | generate | explain | lm-eval.

- ``retro-eval run --config run.yaml``: evaluate (see :mod:`retro_eval.run`); writes results.json,
  report.md and PNG plots to the config's output directory.
- ``retro-eval report results.json [--out DIR]``: render report.md and the plots again.
- ``retro-eval demo [--scale retrofit|retrofit-tiny|small|tiny|full]``: the main job end to end (:mod:`retro_eval.demo`).
- ``retro-eval generate MODEL --database DB --prompt TEXT``: continue a prompt with retrieval.
- ``retro-eval explain MODEL (FILE | --text TEXT) --database DB [--out DIR]``: what RETRO read
  (:mod:`retro_eval.explain`): writes ``DIR/explain.html`` (self-contained) and ``DIR/explain.md``
  with each chunk's neighbours, their distances, CCA's attention on them and the bits retrieval
  saved on each token. ``retro-eval explain MODEL --prompt TEXT [--generate N] [--temperature T]
  [--seed S] --database DB``: the model continues the prompt with retrieval first, and the page
  explains prompt and continuation, marking where generation starts, with the neighbours
  retrieved while generating.

MODEL arguments (``run``'s ``retro`` / ``baseline``, the lm-eval model's ``checkpoint=``,
``generate``, ``explain``) take a training run directory (its latest checkpoint, logged), a checkpoint directory
or a retro-fitted checkpoint.
- ``retro-eval lm-eval ARGS...``: lm-eval's own command line with the ``retro`` model registered and
  the retro-eval task directory on ``--include_path``, e.g.
  ``retro-eval lm-eval --model retro --model_args checkpoint=ckpt,database=db,k=2 --tasks retro_wikitext_mini``.

A bad input (config, missing split, empty benchmark, mismatched database, missing checkpoint) prints
one line ``retro-eval: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from retro_core.cliutil import OneLineParser as _Parser
from retro_core.cliutil import UsageError as _UsageError
from retro_core.cliutil import int_arg as _int
from retro_core.cliutil import one_line as _one_line

__all__ = ["main"]

LM_EVAL_SUBCOMMANDS = {"run", "ls", "validate"}


def _lm_eval(argv: Sequence[str]) -> int:
    from lm_eval.__main__ import cli_evaluate

    from . import lm  # noqa: F401  (registers the "retro" model)
    from .tasks import TASKS_DIR

    args = list(argv)
    if args and args[0] not in LM_EVAL_SUBCOMMANDS and args[0] not in {"-h", "--help"}:
        args = ["run", *args]
    if (
        args
        and args[0] in LM_EVAL_SUBCOMMANDS
        and not any(a == "--include_path" or a.startswith("--include_path=") for a in args)
    ):
        args += ["--include_path", str(TASKS_DIR)]
    old = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = old
    return 0


def _generate(args: argparse.Namespace) -> str:
    import torch

    from retro_core.generate import generate

    from .checkpoints import load_eval_model

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: expected an integer >= 1, got {args.max_new_tokens}")
    model = load_eval_model(args.model)
    db = None
    if args.database:
        from retro_db.database import Database

        db = Database.open(args.database)
    if args.tokenizer or db is None:
        from retro_db.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
    else:
        tok = db.tokenizer
    prompt = tok.encode(args.prompt)
    if not prompt:
        raise ValueError("--prompt: empty after tokenisation")
    budget = int(model.config.max_seq_len) - len(prompt)
    if budget < 1:
        raise ValueError(
            f"--prompt: {len(prompt)} tokens leave no room within max_seq_len="
            f"{model.config.max_seq_len}"
        )
    new = generate(
        model,
        prompt,
        db,
        max_new_tokens=min(args.max_new_tokens, budget),
        temperature=args.temperature,
        eos_id=getattr(tok, "eos_id", None),
        generator=torch.Generator().manual_seed(args.seed),
    )
    return args.prompt + tok.decode(new)


def _explain(args: argparse.Namespace) -> tuple[Path, Path, str]:
    """``retro-eval explain``: validate the arguments, explain (a text, or a prompt and the
    continuation the model generates), write the page and the markdown; returns their paths and
    a note for the user ('' or what was clipped)."""
    from retro_core.atomic import atomic_write_text

    from .checkpoints import load_eval_model
    from .explain import explain_generation, explain_text, render_html, render_markdown

    if sum(a is not None for a in (args.file, args.text, args.prompt)) != 1:
        raise ValueError(
            "explain: give the text as a FILE or with --text, or a --prompt to continue "
            "(exactly one of them)"
        )
    if args.prompt is None:
        for flag, value in (
            ("--generate", args.generate),
            ("--temperature", args.temperature),
            ("--seed", args.seed),
        ):
            if value is not None:
                raise ValueError(
                    f"{flag}: only with --prompt (it sets how the prompt's continuation is "
                    "generated; a FILE or --text is explained as it is)"
                )
    elif args.temperature is not None and not args.temperature >= 0:
        raise ValueError(
            f"--temperature: expected a number >= 0 (0 = greedy), got {args.temperature}"
        )
    if args.prompt is not None:
        text, source = args.prompt, "--prompt"
    elif args.file is not None:
        path = Path(args.file)
        if not path.is_file():
            raise ValueError(f"{path}: no such text file (expected a UTF-8 text file)")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        source = str(path)
    else:
        text, source = args.text, "--text"
    if not text.strip():
        raise ValueError(f"{source}: the text is empty")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    db_path = Path(args.database)
    if not (db_path / "manifest.json").is_file():
        raise ValueError(
            f"--database {db_path}: not a retro_db database (expected a directory with "
            "manifest.json)"
        )
    model = load_eval_model(args.model)
    from retro_db.database import Database

    db = Database.open(db_path)
    if args.tokenizer:
        from retro_db.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
    else:
        tok = db.tokenizer
    note = ""
    if args.prompt is not None:
        n0 = len(tok.encode(text))
        if not n0:
            raise ValueError("--prompt: empty after tokenisation")
        n_max = int(model.config.max_seq_len)
        if n0 >= n_max:
            raise ValueError(
                f"--prompt: {n0} tokens leave no room to generate within the model's "
                f"max_seq_len={n_max}"
            )
        asked = 64 if args.generate is None else args.generate
        new = min(asked, n_max - n0)
        if new < asked:
            note = (
                f"--generate {asked} clipped to {new} tokens: the {n0}-token prompt and the "
                f"continuation fit in max_seq_len={n_max}"
            )
        ex = explain_generation(
            model,
            tok,
            text,
            db,
            max_new_tokens=new,
            temperature=0.0 if args.temperature is None else args.temperature,
            seed=0 if args.seed is None else args.seed,
            k=args.k,
            window=args.window,
            stride=args.stride,
            meta={"model": str(args.model), "database": str(db_path)},
        )
    else:
        ex = explain_text(
            model,
            tok,
            text,
            db,
            k=args.k,
            window=args.window,
            stride=args.stride,
            meta={"model": str(args.model), "database": str(db_path), "text": source},
        )
    out.mkdir(parents=True, exist_ok=True)
    html_path = atomic_write_text(out / "explain.html", render_html(ex, top=args.top))
    md_path = atomic_write_text(out / "explain.md", render_markdown(ex, top=args.top))
    return html_path, md_path, note


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="retro-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    r = sub.add_parser("run", help="evaluate as a run.yaml says")
    r.add_argument("--config", required=True, help="run.yaml")
    r.add_argument(
        "--max-documents",
        type=int,
        default=None,
        metavar="N",
        help="score only the first N documents (questions) of each benchmark (a quick run; "
        "overrides run.yaml's max_documents / max_questions)",
    )
    r.add_argument(
        "--methods",
        default=None,
        metavar="LIST",
        help="comparison rows, comma-separated: knnlm, incontext, or none (overrides run.yaml's "
        "methods)",
    )
    r.add_argument(
        "--db-fractions",
        default=None,
        metavar="LIST",
        help="database-size sweep, comma-separated fractions in (0, 1], e.g. 1/16,1/4,1: "
        "RETRO[ON] retrieving from that share of the database's documents (nested, in a random "
        "order seeded by the run's seed) through its own index "
        "(overrides run.yaml's db_fractions; none: no sweep)",
    )
    r.add_argument(
        "--no-cache",
        action="store_true",
        help="neither read nor write the per-document cache in the output directory",
    )
    rep = sub.add_parser("report", help="render report.md and plots from results.json")
    rep.add_argument("results", help="results.json")
    rep.add_argument("--out", default=None, help="output directory (default: beside results.json)")
    sub.add_parser("lm-eval", help="lm-eval's command line with the 'retro' model registered")
    g = sub.add_parser("generate", help="continue a prompt, retrieving from a database")
    g.add_argument("model", help="training run directory, checkpoint or retro-fitted checkpoint")
    g.add_argument("--database", default=None, help="retro_db database (none: RETRO[OFF])")
    g.add_argument(
        "--tokenizer", default=None, help="tokenizer (default: the database's, else GPT-2)"
    )
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=0)
    e = sub.add_parser(
        "explain",
        help="an HTML page (and markdown) of what RETRO read for a text, or for a prompt and the "
        "continuation it generates: neighbours, CCA attention, bits saved per token",
    )
    e.add_argument("model", help="training run directory, checkpoint or retro-fitted checkpoint")
    e.add_argument("file", nargs="?", default=None, help="the text to explain (a UTF-8 file)")
    e.add_argument("--text", default=None, help="the text to explain, instead of a FILE")
    e.add_argument(
        "--prompt",
        default=None,
        help="instead of a FILE or --text: continue this prompt with retrieval, then explain the "
        "prompt and the generated continuation (the page marks where generation starts)",
    )
    e.add_argument(
        "--generate",
        type=_int(1),
        default=None,
        metavar="N",
        help="with --prompt: tokens to generate (default 64, clipped to max_seq_len)",
    )
    e.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="with --prompt: sampling temperature (default 0 = greedy)",
    )
    e.add_argument(
        "--seed", type=int, default=None, help="with --prompt: sampling seed (default 0)"
    )
    e.add_argument("--database", required=True, help="retro_db database to retrieve from")
    e.add_argument("--tokenizer", default=None, help="tokenizer (default: the database's)")
    e.add_argument(
        "--k", type=_int(1), default=None, help="neighbours per chunk (default: the model's)"
    )
    e.add_argument("--window", type=_int(1), default=None, help="n (default max_seq_len)")
    e.add_argument("--stride", type=_int(1), default=None, help="s (default n/2)")
    e.add_argument("--top", type=_int(1), default=5, help="top attended tokens shown per neighbour")
    e.add_argument(
        "--out",
        default="explain",
        help="output directory for explain.html and explain.md (default %(default)s)",
    )
    d = sub.add_parser(
        "demo",
        help="the main job: build a database, RETRO-fit (or train) a model, evaluate, report",
    )
    d.add_argument(
        "--scale",
        choices=["retrofit", "retrofit-tiny", "small", "tiny", "full"],
        default="retrofit",
        help="retrofit (default, ~30 min on 2 CPU cores): RETRO-fit the pretrained SmolLM2-135M "
        "(frozen) with CCA copied from its induction heads; retrofit-tiny: the same in a few "
        "minutes; from scratch: small (~20 min), tiny (a minute or two), full (all text, hours)",
    )
    d.add_argument(
        "--run-dir", default="runs/demo", help="stage outputs and report (default %(default)s)"
    )
    d.add_argument("--threads", type=_int(1, 1024), default=None, help="torch/faiss threads")
    d.add_argument(
        "--steps", type=_int(1), default=None, help="override the scale's training steps"
    )
    d.add_argument(
        "--methods",
        default=None,
        metavar="LIST",
        help="comparison rows, comma-separated: knnlm, incontext, bm25, or none (default: the "
        "scale's; the retrofit scale scores none, as they add about 15 minutes on 2 CPU cores)",
    )
    d.add_argument(
        "--db-fractions",
        default=None,
        metavar="LIST",
        help="database-size sweep in the report, e.g. 1/16,1/4,1 (default none; see run --help)",
    )
    d.add_argument("--force", action="store_true", help="rerun every stage, cached or not")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``retro-eval`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    lead = 0  # `retro-eval -v lm-eval ...`: the global flag before lm-eval's own command line
    while lead < len(argv) and argv[lead] in ("-v", "--verbose"):
        lead += 1
    if lead < len(argv) and argv[lead] == "lm-eval":
        logging.basicConfig(
            level=logging.DEBUG if lead else logging.INFO,
            format="%(levelname)s %(name)s: %(message)s",
        )
        try:
            return _lm_eval(argv[lead + 1 :])
        except (ValueError, FileNotFoundError, NotADirectoryError) as e:
            # a bad model argument (checkpoint, database, k, retrieval): one line, exit 2
            msg = _one_line(str(e)) or type(e).__name__
            print(f"retro-eval: error: {msg}", file=sys.stderr)
            return 2
    try:
        args = _parser().parse_args(argv)
    except _UsageError as e:
        print(f"retro-eval: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "run":
            from .run import load_run_config, run_evaluation

            if args.max_documents is not None and args.max_documents < 1:
                raise ValueError(
                    f"--max-documents: expected an integer >= 1, got {args.max_documents}"
                )
            cfg = load_run_config(args.config)
            if args.max_documents is not None:
                for b in cfg.benchmarks:
                    b.max_documents = b.max_questions = args.max_documents
            if args.no_cache:
                cfg.cache = False
            if args.methods is not None:
                from .run import parse_methods

                cfg.methods = parse_methods(args.methods, "--methods")
            if args.db_fractions is not None:
                from .run import parse_db_fractions

                cfg.db_fractions = parse_db_fractions(args.db_fractions, "--db-fractions")
            results = run_evaluation(cfg)
            out = results["config"]["output"]
            n = len(results["benchmarks"])
            print(
                f"retro-eval: wrote results.json, report.md and plots for {n} benchmark(s) to {out}"
            )
        elif args.command == "generate":
            print(_generate(args))
        elif args.command == "explain":
            html_path, md_path, note = _explain(args)
            if note:
                print(f"retro-eval: {note}")
            print(f"retro-eval: wrote {html_path} and {md_path}")
        elif args.command == "demo":
            from .demo import run_demo, summary_table

            methods = None
            if args.methods is not None:
                from .run import parse_methods

                methods = parse_methods(args.methods, "--methods")
            fractions = None
            if args.db_fractions is not None:
                from .run import parse_db_fractions

                fractions = parse_db_fractions(args.db_fractions, "--db-fractions")
            results = run_demo(
                args.scale,
                args.run_dir,
                threads=args.threads,
                steps=args.steps,
                force=args.force,
                methods=methods,
                db_fractions=fractions,
            )
            times = results.get("pipeline_stage_times", {})
            print(f"retro-eval demo: report at {Path(args.run_dir) / 'report' / 'report.md'}")
            print("stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
            print(summary_table(results))
        elif args.command == "report":
            from .report import render_report

            out = Path(args.out) if args.out else Path(args.results).parent
            written = render_report(args.results, out)
            print(f"retro-eval: wrote {written['report']} and {len(written) - 1} plot(s)")
    except (ValueError, OSError) as e:
        msg = _one_line(str(e)) or type(e).__name__
        print(f"retro-eval: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
