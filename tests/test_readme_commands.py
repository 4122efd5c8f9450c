"""Every shell command of README.md and packages/*/README.md runs, at tiny scale.

The extractor is generic: every fenced block tagged ``bash``, ``sh``, ``shell`` or ``console``, or
untagged, is shell (tag other blocks: ``python``, ``yaml``, ``text``). Each command (backslash
continuations joined, trailing comments dropped) either runs, verbatim except for the visible
SCALE rewrites below, in a fresh sandbox folder holding every input the READMEs name, or is listed
in NOT_RUN with the reason. The commands of one block run in order in one sandbox (a block's later
lines use what its earlier lines wrote), except those listed in SEPARATE (alternatives to an
earlier line, e.g. another build into the same folder), which run alone in a fresh sandbox. A command added to a README is run from then on, so a
documented command cannot silently go wrong; one that cannot run here must be listed, with why.

Sandbox inputs (made from data committed in the repository): ``corpus.jsonl``, ``more.jsonl``,
``train.jsonl``, ``test.jsonl`` (``{"id", "text"}`` records of the pile-mini pack),
``articles.jsonl`` (``{"title", "paragraphs": [...]}``), ``my_folder/`` (a .txt, a .md in a
subfolder and a .jsonl),
``wiki.train.raw`` (the start of wikitext-mini's train split), ``pile/00.jsonl.zst`` (Pile
records), ``runs/dataset`` (a training dataset written by ``retro_db.write_neighbours``), ``DB`` (a
database, GPT-2 BPE, m = 64, hashing encoder), ``CKPT`` (a run directory written by
``retro_core.train``, a tiny model trained on ``runs/dataset``) and ``run.yaml`` (a tiny
``retro-eval run`` config of CKPT and DB writing into the sandbox).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHELL_TAGS = {"", "bash", "sh", "shell", "console"}

#: Commands not run, matched by regular expression (re.search), each with the reason.
NOT_RUN: list[tuple[str, str]] = [
    (r"^python -m pip install nox && nox -s demo\b", "the ~20-minute demo (nox -s demo itself)"),
    (r"^python -m pip install nox && nox\b", "all of CI: this test runs inside it"),
    (r"^ray start\b", "starts a Ray cluster node (head or worker)"),
    (
        r"--engine ray --address HEAD:6379",
        "needs a Ray cluster at HEAD and /nfs; the Ray engine is tested in retro-db's test_ray.py",
    ),
    (
        r"--engine ray --num-cpus 8",
        "needs Ray (retro-db[ray]), not in this session; retro-db's test_ray.py runs the engine",
    ),
    (r"^torchrun\b", "multi-process / multi-node CUDA training; retro-core's tests run torchrun"),
    (r"^pip install\b", "installs packages: nox installs exactly these in every session"),
    (
        r"^retro-eval demo\b",
        "the ~20-minute main job (nox -s demo); tests/test_demo.py runs it tiny",
    ),
]

#: Commands run alone, each in a fresh sandbox of its own rather than after the block's earlier
#: commands (regular expression, reason): alternatives that would collide with an earlier line.
SEPARATE: list[tuple[str, str]] = [
    (
        r"^retro-db build my_folder/ --out db\b",
        "an alternative to the block's first build, into the same `db` (which then exists)",
    ),
    (
        r"^retro-db build articles\.jsonl .*--out db\b",
        "an alternative to the block's first build, into the same `db` (which then exists)",
    ),
]

#: Tiny-scale rewrites (regular expression, replacement, why), applied to every command run.
SCALE: list[tuple[str, str, str]] = [
    (r"--steps \d+", "--steps 2", "two optimizer steps instead of thousands"),
    (r"--preset (small|base)\b", "--preset tiny", "the smallest model preset"),
    (
        r"^(retro-train .*)$",
        r"\1 --batch-size 2 --seq-chunks 2 --eval-every 0 --no-progress",
        "tiny batches of two chunks, no validation pass",
    ),
    (r"^(retro-eval lm-eval .*)$", r"\1 --limit 2", "two documents per task"),
]


@dataclass(frozen=True)
class Command:
    file: str  # path relative to the repository root
    line: int  # line of the command in that file
    block: int  # line of the block's opening fence
    text: str


def _strip_comment(line: str) -> str:
    """A shell line without its trailing ``# comment`` (a # outside quotes, after a blank)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def extract_commands(path: Path) -> list[Command]:
    """The commands of every shell block of a Markdown file."""
    rel = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    out: list[Command] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    fence = re.compile(r"^\s*```+\s*([\w+-]*)")
    i = 0
    while i < len(lines):
        m = fence.match(lines[i])
        if not m:
            i += 1
            continue
        tag, start = m.group(1).lower(), i + 1
        i += 1
        body: list[tuple[int, str]] = []
        while i < len(lines) and not lines[i].strip().startswith("```"):
            body.append((i + 1, lines[i]))
            i += 1
        i += 1
        if tag not in SHELL_TAGS:
            continue
        pending, first = "", 0
        for lineno, raw in body:
            text = raw[2:] if tag == "console" and raw.startswith("$ ") else raw
            if not pending:
                first = lineno
            if text.rstrip().endswith("\\"):
                pending += text.rstrip()[:-1] + " "
                continue
            cmd = _strip_comment(pending + text).strip()
            cmd = re.sub(r"\s+", " ", cmd)
            pending = ""
            if cmd:
                out.append(Command(rel, first, start, cmd))
    return out


def readme_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(ROOT.glob("packages/*/README.md"))]


def all_commands() -> list[Command]:
    return [c for f in readme_files() for c in extract_commands(f)]


def not_run_reason(cmd: str) -> str | None:
    for pattern, reason in NOT_RUN:
        if re.search(pattern, cmd):
            return reason
    return None


def separate(cmd: str) -> bool:
    return any(re.search(pattern, cmd) for pattern, _ in SEPARATE)


def scaled(cmd: str) -> str:
    for pattern, repl, _ in SCALE:
        cmd = re.sub(pattern, repl, cmd)
    return cmd


def _blocks() -> dict[str, list[Command]]:
    blocks: dict[str, list[Command]] = {}
    for c in all_commands():
        blocks.setdefault(f"{c.file}:{c.block}", []).append(c)
    return {k: v for k, v in blocks.items() if any(not_run_reason(c.text) is None for c in v)}


def test_the_extractor_reads_blocks_as_a_shell_would(tmp_path: Path) -> None:
    md = tmp_path / "check.md"
    md.write_text(
        "text\n```bash\nfoo a \\\n    b   # note\n\necho '# kept' \"x # y\"  # gone\n```\n"
        "```python\nprint(1)\n```\n```\nbar\n```\n```console\n$ baz --x\n```\n"
    )
    got = [(c.line, c.block, c.text) for c in extract_commands(md)]
    assert got == [
        (3, 2, "foo a b"),
        (6, 2, "echo '# kept' \"x # y\""),
        (12, 11, "bar"),
        (15, 14, "baz --x"),
    ]


def test_every_readme_command_is_run_or_marked() -> None:
    cmds = all_commands()
    assert len(cmds) >= 20, "the extractor found too few commands"
    for pattern, reason in NOT_RUN + SEPARATE:
        assert reason.strip(), pattern
        assert any(re.search(pattern, c.text) for c in cmds), (
            f"NOT_RUN / SEPARATE entry {pattern!r} matches no README command any more: remove it"
        )
    run = [c for c in cmds if not_run_reason(c.text) is None]
    assert len(run) >= 10, [c.text for c in run]


# ----------------------------------------------------------------------------------- sandbox


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The inputs every README command reads (see the module docstring)."""
    import torch
    import yaml
    import zstandard

    from retro_core import RetroConfig, TrainConfig, train
    from retro_db import Document, build_database, write_neighbours
    from retro_eval.benchmarks.pile import read_pile
    from retro_eval.packs import pack_path

    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("readme") / "base"
    base.mkdir()
    wiki = read_pile(pack_path("pile-mini"), "train", subsets=["Wikipedia (en)"])
    docs = [d for d in wiki if len(d.text) > 2000]
    rows = [{"id": d.meta["title"], "text": d.text[:2000]} for d in docs[:12]]
    _jsonl(base / "corpus.jsonl", rows[:6])
    _jsonl(base / "more.jsonl", rows[6:8])
    _jsonl(base / "train.jsonl", rows[:4])
    _jsonl(base / "test.jsonl", [rows[0], rows[9]])
    _jsonl(
        base / "articles.jsonl",
        [{"title": r["id"], "paragraphs": r["text"].split("\n\n")} for r in rows[2:5]],
    )
    folder = base / "my_folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(rows[5]["text"], encoding="utf-8")
    (folder / "sub" / "b.md").write_text(rows[6]["text"], encoding="utf-8")
    _jsonl(folder / "c.jsonl", rows[7:9])
    with gzip.open(pack_path("wikitext-mini") / "wiki.train.raw.gz", "rt", encoding="utf-8") as f:
        raw = f.read(6000)
    (base / "wiki.train.raw").write_text(raw[: raw.rindex("\n") + 1], encoding="utf-8")
    (base / "pile").mkdir()
    pile = [
        {"text": d.text[:1500], "meta": {"pile_set_name": "Wikipedia (en)"}} for d in docs[8:11]
    ]
    blob = "".join(json.dumps(r) + "\n" for r in pile).encode()
    (base / "pile" / "00.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(blob))
    # DB, runs/dataset, CKPT: GPT-2 BPE, m = 64, the hashing encoder (no model weights).
    db = build_database(
        [Document(doc_id=r["id"], text=r["text"], meta={}) for r in rows],
        base / "DB",
        embedder="hash:32",
        chunk_size=64,
        index_factory="Flat",
        progress=False,
    )
    write_neighbours(db, None, base / "runs" / "dataset", k=2, progress=False)
    cfg = RetroConfig(
        vocab_size=db.tokenizer.vocab_size, d_model=16, n_heads=2, n_layers=3, chunk_size=64,
        num_neighbours=2, max_seq_len=256, pad_id=db.tokenizer.pad_id,
        tokenizer_id=db.tokenizer_id, enc_layers=1,
    )  # fmt: skip
    tc = TrainConfig(
        steps=2, batch_size=2, warmup_steps=1, eval_every=0, eval_batches=0, seq_chunks=2
    )
    train(cfg, tc, base / "runs" / "dataset", base / "CKPT", progress=False)
    _jsonl(base / "mine.jsonl", [{"text": r["text"][:600]} for r in rows[9:12]])
    (base / "run.yaml").write_text(
        yaml.safe_dump(
            {
                "retro": "CKPT",
                "database": "DB",
                "benchmarks": [{"name": "mine", "path": "mine.jsonl"}],
                "k": 2,
                "k_sweep": [1, 2],
                "overlap": ["rc"],
                "bootstrap_samples": 20,
                "output": ".",
            }
        )
    )
    return base


BLOCKS = _blocks()


@pytest.mark.slow
@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_readme_block_runs(block: str, sandbox: Path, tmp_path: Path) -> None:
    work = tmp_path / "sandbox"
    shutil.copytree(sandbox, work, symlinks=True)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    for n, c in enumerate(BLOCKS[block]):
        if not_run_reason(c.text) is not None:
            continue
        cwd = work
        if separate(c.text):
            cwd = tmp_path / f"alone-{n}"
            shutil.copytree(sandbox, cwd, symlinks=True)
        cmd = scaled(c.text)
        t0 = time.perf_counter()
        proc = subprocess.run(
            ["bash", "-c", cmd],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, (
            f"{c.file}:{c.line}: `{c.text}` (run as `{cmd}`) exited {proc.returncode}:\n"
            f"{(proc.stdout + proc.stderr)[-3000:]}"
        )
        print(f"{time.perf_counter() - t0:7.1f} s  {cmd}")  # shown by pytest -rP
