"""Property test of the retro-db command line: random and edge argument values never give a
traceback; every error is exit code 2 and one line on stderr.

The commands run for real on paths that cannot hold a database or documents (a missing path, an
empty file, an empty folder, a folder of someone else's files), so each example ends quickly in a
user error (or, where the arguments are valid, in a quick success). ``--engine``/``--address``
are not fuzzed: ``--engine ray`` connects to a cluster, which is not argument parsing.
"""

from __future__ import annotations

import contextlib
import io
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retro_db.cli import main

COMMANDS = ["build", "add", "info", "query", "neighbours", "dedup", "gc", "prune"]
OPTIONS = [
    "--out",
    "--format",
    "--text-field",
    "--id-field",
    "--strict",
    "--tokenizer",
    "--embedder",
    "--chunk-size",
    "--index-factory",
    "--nprobe",
    "--ef-search",
    "--batch-size",
    "--threads",
    "--shard-chunks",
    "--no-progress",
    "--num-cpus",
    "--verify",
    "--sample",
    "-k",
    "--json",
    "--corpus",
    "--no-verify",
    "--train",
    "--eval",
    "--report",
    "--kept-out",
    "--threshold",
    "--ngram",
    "--num-perm",
    "--grace",
    "--keep",
    "--dry-run",
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
    "hash:0",
    "hash:-3",
    "hash:x",
    "jsonl",
    "text",
    "auto",
    "Flat",
    "IVF4,Flat",
]

PATHS = ["MISSING", "EMPTY_FILE", "EMPTY_DIR", "OTHER_DIR", "OUT_NEW"]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A working directory with the paths the arguments may name (relative ones land here too)."""
    d = tmp_path_factory.mktemp("fuzz")
    (d / "empty.jsonl").write_bytes(b"")
    (d / "empty_dir").mkdir()
    (d / "other").mkdir()
    (d / "other" / "notes.csv").write_text("x\n", encoding="utf-8")
    return d


def _value(sandbox, token: str, i: int) -> str:
    return {
        "MISSING": str(sandbox / "missing"),
        "EMPTY_FILE": str(sandbox / "empty.jsonl"),
        "EMPTY_DIR": str(sandbox / "empty_dir"),
        "OTHER_DIR": str(sandbox / "other"),
        "OUT_NEW": str(sandbox / f"out{i}"),
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
    st.one_of(st.sampled_from(COMMANDS), st.text(max_size=8)),
    st.lists(st.one_of(st.sampled_from(OPTIONS), word), max_size=8),
)

_counter = iter(range(10**9))


def _message_lines(stderr: str) -> list[str]:
    """stderr's lines without tqdm's progress bars (redrawn with carriage returns)."""
    return [line for line in stderr.split("\n") if line and "\r" not in line]


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(parts=argv_strategy)
def test_random_arguments_never_give_a_traceback(sandbox, parts):
    lead, command, rest = parts
    i = next(_counter)
    argv = [*lead, command, *(_value(sandbox, w, i) for w in rest)]
    err, out = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(sandbox)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                rc = main(argv)
            except SystemExit as e:  # only --help / -h exits this way
                assert e.code == 0 and ("-h" in argv or "--help" in argv), (argv, e.code)
                return
    finally:
        os.chdir(cwd)
    assert rc in (0, 2), (argv, rc)
    text = err.getvalue()
    assert "Traceback" not in text, (argv, text)
    if rc == 2:
        lines = _message_lines(text)
        assert len(lines) == 1 and lines[0].startswith("retro-db: error: "), (argv, text)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["query"],
        ["query", "MISSING", "hello", "-k", "0"],
        ["query", "EMPTY_DIR", "hello", "-k", "-5"],
        ["info", "MISSING", "-k", "99999999999999999999999"],
        ["build", "EMPTY_FILE", "--out", "OUT_NEW", "--chunk-size", "0"],
        ["build", "EMPTY_FILE", "--out", "OTHER_DIR", "--embedder", "hash:8"],
        ["build", "EMPTY_DIR", "--out", "OUT_NEW", "--embedder", "hash:8"],
        ["build", "OTHER_DIR", "--out", "OUT_NEW", "--format", "xml"],
        ["add", "OTHER_DIR", "EMPTY_FILE"],
        ["gc", "MISSING"],
        ["gc", "OTHER_DIR", "--keep", "0"],
        ["dedup", "EMPTY_FILE", "--eval", "MISSING", "--out", "OUT_NEW"],
        ["dedup", "--eval", "EMPTY_FILE", "--out", "OUT_NEW"],
        ["neighbours", "EMPTY_DIR", "--out", "OUT_NEW", "-k", "a\x00b"],
        ["build", "a\x00b", "--out", "OUT_NEW"],
    ],
)
def test_edge_cases_are_one_line_exit_2(sandbox, argv, capsys):
    argv = [_value(sandbox, a, 10**9 + len(argv)) for a in argv]
    capsys.readouterr()
    assert main(argv) == 2
    lines = _message_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("retro-db: error: "), lines
    assert not (sandbox / "missing").exists()  # a missing path named is never created
