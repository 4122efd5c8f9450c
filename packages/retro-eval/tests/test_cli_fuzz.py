"""Property test of the ``retro-eval`` command line: random and edge argument values never give a
traceback; every error is exit code 2 and one line on stderr.

The commands run for real on paths that cannot hold a run config, a results file or a model (a
missing path, an empty file, an empty folder, a folder of someone else's files, broken YAML/JSON),
so each example ends quickly in a user error. Left out of the random space, each for a reason:

- ``demo``: a valid demo run builds a database and trains a model for minutes. Its arguments are
  fuzzed, but :func:`retro_eval.demo.run_demo` is replaced by a stub that only checks the values
  the command line let through and stops there.
- ``lm-eval``: everything after it is lm-eval's own command line (its parser, its messages), and a
  valid one loads models and runs tasks; its model-argument errors are tested in test_own_data.py.
- real checkpoints and databases: loading a model is not argument parsing.
"""

from __future__ import annotations

import contextlib
import io
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retro_eval import demo
from retro_eval.cli import main

COMMANDS = ["run", "report", "generate", "demo"]
OPTIONS = [
    "--config",
    "--max-documents",
    "--no-cache",
    "--out",
    "--database",
    "--tokenizer",
    "--prompt",
    "--max-new-tokens",
    "--temperature",
    "--seed",
    "--scale",
    "--run-dir",
    "--threads",
    "--steps",
    "--force",
    "-v",
    "--help-me",
]
EDGE = [
    "",
    "0",
    "-1",
    "1",
    "2",
    "-0",
    "1e309",
    "nan",
    "inf",
    "-inf",
    "0.5",
    "9" * 30,
    "-",
    "--",
    "=",
    "a\nb",
    "a\x00b",
    "\udcff",
    "é",
    " ",
    "tiny",
    "small",
    "full",
    "retrofit",
    "retrofit-tiny",
    "gpt2",
    "hash:8",
]
PATHS = [
    "MISSING",
    "EMPTY_FILE",
    "EMPTY_DIR",
    "OTHER_DIR",
    "OUT_NEW",
    "BAD_YAML",
    "LIST_YAML",
    "ODD_YAML",
    "BAD_JSON",
    "LIST_JSON",
    "EMPTY_JSON",
]


class _DemoStarted(Exception):
    """Raised by the run_demo stub: the command line was accepted."""


def _run_demo_stub(scale, run_dir, *, threads=None, steps=None, force=False, **kw):
    assert scale in demo.SCALES, scale
    assert threads is None or (isinstance(threads, int) and threads >= 1), threads
    assert steps is None or (isinstance(steps, int) and steps >= 1), steps
    raise _DemoStarted


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A working directory with the paths the arguments may name (relative ones land here too)."""
    d = tmp_path_factory.mktemp("fuzz")
    (d / "empty.yaml").write_bytes(b"")
    (d / "empty_dir").mkdir()
    (d / "other").mkdir()
    (d / "other" / "notes.csv").write_text("x\n", encoding="utf-8")
    (d / "bad.yaml").write_text("a: [1, 2\n", encoding="utf-8")
    (d / "list.yaml").write_text("- 1\n- 2\n", encoding="utf-8")
    (d / "odd.yaml").write_text("output: 3\nbenchmarks: x\nmodels: {}\n", encoding="utf-8")
    (d / "bad.json").write_text("{not json", encoding="utf-8")
    (d / "list.json").write_text("[1, 2]", encoding="utf-8")
    (d / "empty.json").write_text("{}", encoding="utf-8")
    return d


def _value(sandbox, token: str, i: int) -> str:
    return {
        "MISSING": str(sandbox / "missing"),
        "EMPTY_FILE": str(sandbox / "empty.yaml"),
        "EMPTY_DIR": str(sandbox / "empty_dir"),
        "OTHER_DIR": str(sandbox / "other"),
        "OUT_NEW": str(sandbox / f"out{i}"),
        "BAD_YAML": str(sandbox / "bad.yaml"),
        "LIST_YAML": str(sandbox / "list.yaml"),
        "ODD_YAML": str(sandbox / "odd.yaml"),
        "BAD_JSON": str(sandbox / "bad.json"),
        "LIST_JSON": str(sandbox / "list.json"),
        "EMPTY_JSON": str(sandbox / "empty.json"),
    }.get(token, token)


word = st.one_of(
    st.sampled_from(EDGE),
    st.sampled_from(PATHS),
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=12),
)
argv_strategy = st.tuples(
    st.lists(st.sampled_from(["-v", "--verbose"]), max_size=1),
    st.one_of(st.sampled_from(COMMANDS), st.text(max_size=8).filter(lambda t: t != "lm-eval")),
    st.lists(st.one_of(st.sampled_from(OPTIONS), word), max_size=8),
)

_counter = iter(range(10**9))


def _message_lines(stderr: str) -> list[str]:
    """stderr's lines without tqdm's progress bars (redrawn with carriage returns)."""
    return [line for line in stderr.split("\n") if line and "\r" not in line]


def _run(sandbox, argv: list[str], monkeypatch) -> tuple[int | None, str]:
    """main(argv) in the sandbox with the demo stubbed: (exit code, None after --help or an
    accepted demo; stderr)."""
    monkeypatch.setattr(demo, "run_demo", _run_demo_stub)
    err, out = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(sandbox)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                rc = main(argv)
            except SystemExit as e:  # only --help / -h exits this way
                assert e.code == 0 and ("-h" in argv or "--help" in argv), (argv, e.code)
                rc = None
            except _DemoStarted:
                assert "demo" in argv, argv
                rc = None
    finally:
        os.chdir(cwd)
    return rc, err.getvalue()


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(parts=argv_strategy)
def test_random_arguments_never_give_a_traceback(sandbox, parts, monkeypatch):
    lead, command, rest = parts
    i = next(_counter)
    argv = [*lead, command, *(_value(sandbox, w, i) for w in rest)]
    rc, err = _run(sandbox, argv, monkeypatch)
    assert rc in (None, 0, 2), (argv, rc, err)
    assert "Traceback" not in err, (argv, err)
    if rc == 2:
        lines = _message_lines(err)
        assert len(lines) == 1 and lines[0].startswith("retro-eval: error: "), (argv, err)
    assert not (sandbox / "missing").exists()


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["run"],
        ["nonsense"],
        ["run", "--config", "MISSING"],
        ["run", "--config", "EMPTY_FILE"],
        ["run", "--config", "BAD_YAML"],
        ["run", "--config", "LIST_YAML"],
        ["run", "--config", "ODD_YAML"],
        ["run", "--config", "EMPTY_DIR"],
        ["run", "--config", "a\x00b"],
        ["run", "--config", "ODD_YAML", "--max-documents", "0"],
        ["report", "MISSING"],
        ["report", "BAD_JSON", "--out", "OUT_NEW"],
        ["report", "LIST_JSON", "--out", "OUT_NEW"],
        ["report", "EMPTY_JSON", "--out", "OUT_NEW"],
        ["report", "EMPTY_DIR"],
        ["generate", "MISSING", "--prompt", "x"],
        ["generate", "EMPTY_DIR", "--prompt", "x"],
        ["generate", "OTHER_DIR", "--prompt", "x", "--max-new-tokens", "0"],
        ["generate", "EMPTY_FILE", "--prompt", "x", "--temperature", "x"],
        ["demo", "--scale", "huge"],
        ["demo", "--threads", "-1"],
        ["demo", "--threads", "1000000000000"],
        ["demo", "--steps", "0"],
    ],
)
def test_edge_cases_are_one_line_exit_2(sandbox, argv, monkeypatch):
    argv = [_value(sandbox, a, 10**9 + len(argv)) for a in argv]
    rc, err = _run(sandbox, argv, monkeypatch)
    assert rc == 2, (argv, err)
    lines = _message_lines(err)
    assert len(lines) == 1 and lines[0].startswith("retro-eval: error: "), lines
    assert not (sandbox / "missing").exists()  # a missing path named is never created
