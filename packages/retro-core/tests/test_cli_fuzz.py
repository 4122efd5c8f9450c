"""Property test of the ``retro-train`` command line: random and edge argument values never give a
traceback; every error is exit code 2 and one line on stderr.

Two spaces of arguments, so that no example starts a long training run:

- any flags and values, with ``--data`` naming a path that cannot hold a training dataset (missing,
  an empty file, an empty folder, a folder of someone else's files): each example ends in a usage
  error, a TrainConfig error or the dataset error, before any training;
- ``--data`` naming a real dataset of a few tiny documents (written with ``write_dataset``), with
  the training flags drawn from edge values whose sizes are all small (steps, batch size,
  micro-batches, sequence chunks, validation batches <= 3; presets tiny/small): each example
  either errors or trains a few steps of a tiny model in a second.
"""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch
from dataset_writer import chunk_documents, write_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retro_core.cli import main

V, M, K, PAD = 32, 4, 2, 0

OPTIONS = [
    "--data",
    "--valid-data",
    "--out",
    "--resume",
    "--preset",
    "--config",
    "--baseline",
    "--no-retrieval",
    "--retrofit",
    "--gguf-file",
    "--tokenizer-dir",
    "--cca-layers",
    "--enc-layers",
    "--enc-d-model",
    "--enc-n-heads",
    "--cca-from-base",
    "--induction-threshold",
    "--train-config",
    "--steps",
    "--batch-size",
    "--grad-accum",
    "--lr",
    "--min-lr",
    "--warmup-steps",
    "--weight-decay",
    "--grad-clip",
    "--seed",
    "--seq-chunks",
    "--k",
    "--eval-every",
    "--eval-batches",
    "--valid-fraction",
    "--checkpoint-every",
    "--keep-checkpoints",
    "--log-every",
    "--bf16",
    "--num-workers",
    "--device",
    "--stop-after",
    "--threads",
    "--dist-backend",
    "--no-verify",
    "--no-progress",
    "-v",
    "--verbose",
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
    "cpu",
    "cuda",
    "meta",
    "1,2",
    "6,x",
    "gloo",
]
# Paths that cannot hold a training dataset (the random space never names the real one).
BAD_PATHS = ["MISSING", "EMPTY_FILE", "EMPTY_DIR", "OTHER_DIR", "OUT_NEW", "BAD_JSON", "LIST_JSON"]


def _documents_dataset(directory):
    """Twelve short documents counting upwards mod 31; each chunk's neighbours are its own
    content and continuation."""
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(12):
        start, n = int(rng.integers(0, 31)), int(rng.integers(5, 30))
        docs.append([1 + (start + t) % 31 for t in range(n)])
    tokens, lengths, doc_ids = chunk_documents(docs, M, PAD)
    n, r = tokens.shape[0], 2 * M
    neighbours = np.full((n, K, r), PAD, dtype=np.int64)
    for i in range(n):
        first = int(tokens[i, 0])
        neighbours[i, :] = [1 + (first - 1 + t) % 31 for t in range(r)]
    return write_dataset(
        directory,
        tokens=tokens,
        lengths=lengths,
        doc_ids=doc_ids,
        neighbours=neighbours,
        neighbour_lengths=np.full((n, K), r, dtype=np.int64),
        neighbour_ids=(np.arange(n)[:, None] + 7 * np.arange(1, K + 1)[None, :]) % n,
        tokenizer_id="count-tok",
        vocab_size=V,
        pad_id=PAD,
        source_db=None,
    )


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A working directory with the paths the arguments may name (relative ones land here too)."""
    d = tmp_path_factory.mktemp("fuzz")
    (d / "empty.json").write_bytes(b"")
    (d / "empty_dir").mkdir()
    (d / "other").mkdir()
    (d / "other" / "notes.csv").write_text("x\n", encoding="utf-8")
    (d / "bad.json").write_text("{not json", encoding="utf-8")
    (d / "list.json").write_text("[1, 2]", encoding="utf-8")
    _documents_dataset(d / "ds")
    return d


def _value(sandbox, token: str, i: int) -> str:
    return {
        "MISSING": str(sandbox / "missing"),
        "EMPTY_FILE": str(sandbox / "empty.json"),
        "EMPTY_DIR": str(sandbox / "empty_dir"),
        "OTHER_DIR": str(sandbox / "other"),
        "OUT_NEW": str(sandbox / f"out{i}"),
        "BAD_JSON": str(sandbox / "bad.json"),
        "LIST_JSON": str(sandbox / "list.json"),
        "DATA": str(sandbox / "ds"),
    }.get(token, token)


word = st.one_of(
    st.sampled_from(EDGE),
    st.sampled_from(BAD_PATHS),
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=12),
)
random_argv = st.tuples(
    # often start from the two required flags, so that later checks are reached too
    st.one_of(
        st.just([]),
        st.tuples(st.sampled_from(BAD_PATHS), st.just("OUT_NEW")).map(
            lambda t: ["--data", t[0], "--out", t[1]]
        ),
    ),
    st.lists(st.one_of(st.sampled_from(OPTIONS), word), max_size=8),
)

SMALL_INT = st.sampled_from(["-1", "0", "1", "2", "3", "", "x", "0.5", "nan", "-0"])
ANY_NUMBER = st.sampled_from(
    ["-1", "0", "1", "2", "0.5", "1e-3", "nan", "inf", "-inf", "1e309", "9" * 30, "", "x"]
)
# flag -> values; every size a valid example can get is small (see the module docstring)
VALID_DATA_FLAGS = {
    "--steps": SMALL_INT,
    "--batch-size": SMALL_INT,
    "--grad-accum": SMALL_INT,
    "--seq-chunks": SMALL_INT,
    "--eval-batches": SMALL_INT,
    "--eval-every": SMALL_INT,
    "--checkpoint-every": SMALL_INT,
    "--keep-checkpoints": SMALL_INT,
    "--log-every": SMALL_INT,
    "--stop-after": SMALL_INT,
    "--k": SMALL_INT,
    "--num-workers": st.sampled_from(["-1", "0", "1", "x"]),
    "--threads": st.sampled_from(["-1", "0", "1", "2", "100000", "9" * 30, "x"]),
    "--warmup-steps": ANY_NUMBER,
    "--seed": ANY_NUMBER,
    "--lr": ANY_NUMBER,
    "--min-lr": ANY_NUMBER,
    "--weight-decay": ANY_NUMBER,
    "--grad-clip": ANY_NUMBER,
    "--valid-fraction": ANY_NUMBER,
    "--preset": st.sampled_from(["tiny", "small", "huge", ""]),
    "--config": st.sampled_from(["MISSING", "EMPTY_FILE", "BAD_JSON", "LIST_JSON", "EMPTY_DIR"]),
    "--train-config": st.sampled_from(["MISSING", "EMPTY_FILE", "BAD_JSON", "LIST_JSON"]),
    "--valid-data": st.sampled_from(["MISSING", "EMPTY_DIR", "OTHER_DIR", "DATA"]),
    "--device": st.sampled_from(["cpu", "cuda", "meta", "", "nonsense", "cuda:99"]),
    "--retrofit": st.sampled_from(["MISSING", "EMPTY_DIR", "OTHER_DIR", "EMPTY_FILE"]),
    "--cca-layers": st.sampled_from(["1", "", "x", "1,,2", "-1"]),
    "--enc-layers": SMALL_INT,
}
SWITCHES = ["--baseline", "--no-retrieval", "--bf16", "--resume", "--no-verify", "-v"]
pair = st.one_of(
    st.sampled_from(sorted(VALID_DATA_FLAGS)).flatmap(
        lambda f: VALID_DATA_FLAGS[f].map(lambda v: [f, v])
    ),
    st.sampled_from(SWITCHES).map(lambda s: [s]),
)
valid_data_argv = st.lists(pair, max_size=6).map(lambda ps: [a for p in ps for a in p])

# the tiny defaults each valid-data example starts from (its own flags come later and win)
TINY = ["--preset", "tiny", "--steps", "2", "--seq-chunks", "2", "--batch-size", "2"]
TINY += ["--eval-every", "0", "--eval-batches", "1", "--valid-fraction", "0.2"]

_counter = iter(range(10**9))


def _message_lines(stderr: str) -> list[str]:
    """stderr's lines without tqdm's progress bars (redrawn with carriage returns)."""
    return [line for line in stderr.split("\n") if line and "\r" not in line]


def _run(sandbox, argv: list[str]) -> tuple[int | None, str, str]:
    """main(argv) in the sandbox: (exit code, or None after --help; stderr; stdout)."""
    err, out = io.StringIO(), io.StringIO()
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(sandbox)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                rc = main(argv)
            except SystemExit as e:  # only --help / -h exits this way
                assert e.code == 0 and ("-h" in argv or "--help" in argv), (argv, e.code)
                rc = None
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return rc, err.getvalue(), out.getvalue()


def _check(argv: list[str], rc: int | None, err: str) -> None:
    assert rc in (None, 0, 2), (argv, rc, err)
    assert "Traceback" not in err, (argv, err)
    if rc == 2:
        lines = _message_lines(err)
        assert len(lines) == 1 and lines[0].startswith("retro-train: error"), (argv, err)


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(parts=random_argv)
def test_random_arguments_never_give_a_traceback(sandbox, parts):
    lead, rest = parts
    i = next(_counter)
    argv = [_value(sandbox, w, i) for w in [*lead, *rest]]
    rc, err, _ = _run(sandbox, argv)
    _check(argv, rc, err)
    assert rc != 0, argv  # no training dataset is ever named: nothing can succeed
    assert not (sandbox / "missing").exists()


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(rest=valid_data_argv)
def test_random_training_flags_on_a_real_dataset(sandbox, rest):
    i = next(_counter)
    out = sandbox / f"run{i}"
    argv = ["--data", "DATA", "--out", str(out), "--no-progress", *TINY, *rest]
    argv = [_value(sandbox, w, i) for w in argv]
    rc, err, stdout = _run(sandbox, argv)
    _check(argv, rc, err)
    if rc == 0:  # a success printed its final metrics
        assert json.loads(stdout)["step"] >= 1, (argv, stdout)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--data", "DATA"],
        ["--data", "MISSING", "--out", "OUT_NEW"],
        ["--data", "DATA", "--out", "OUT_NEW", "--threads", "-1"],
        ["--data", "DATA", "--out", "OUT_NEW", "--threads", "1000000000000"],
        ["--data", "DATA", "--out", "OUT_NEW", "--stop-after", "0"],
        ["--data", "DATA", "--out", "OUT_NEW", "--steps", "x"],
        ["--data", "DATA", "--out", "OUT_NEW", "--steps", "0"],
        ["--data", "DATA", "--out", "OUT_NEW", "--preset", "huge"],
        ["--data", "DATA", "--out", "OUT_NEW", "--preset", "tiny", "--config", "BAD_JSON"],
        ["--data", "DATA", "--out", "OUT_NEW", "--config", "BAD_JSON"],
        ["--data", "DATA", "--out", "OUT_NEW", "--config", "LIST_JSON"],
        ["--data", "DATA", "--out", "OUT_NEW", "--train-config", "EMPTY_DIR"],
        ["--data", "DATA", "--out", "EMPTY_FILE", "--steps", "1", "--seq-chunks", "2"],
        ["--data", "a\x00b", "--out", "OUT_NEW"],
        ["--data", "EMPTY_DIR", "--out", "OUT_NEW", "--retrofit", "MISSING"],
    ],
)
def test_edge_cases_are_one_line_exit_2(sandbox, argv):
    argv = [_value(sandbox, a, 10**9 + len(argv)) for a in argv]
    rc, err, _ = _run(sandbox, argv)
    assert rc == 2, (argv, err)
    lines = _message_lines(err)
    assert len(lines) == 1 and lines[0].startswith("retro-train: error: "), lines
    assert not (sandbox / "missing").exists()  # a missing path named is never created
