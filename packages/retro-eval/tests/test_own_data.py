"""A user's own data and own models: plain-text / SQuAD-shaped benchmarks, a `retro-train` run
directory as the model of every command, resumable evaluation and QA retrieval recall."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from retro_core import RetroConfig, TrainConfig, train
from retro_core.checkpoint import load_checkpoint
from retro_core.generate import generate
from retro_core.train import latest_checkpoint
from retro_db import Database, Document, build_database, write_neighbours
from retro_eval.benchmarks import BenchmarkError, load_benchmark, read_text_documents
from retro_eval.benchmarks.pile import read_pile
from retro_eval.cli import main
from retro_eval.packs import pack_path

torch.set_num_threads(1)
M = 8
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _articles(n: int, chars: int, offset: int = 0) -> list[tuple[str, str]]:
    """(title, text) of real Wikipedia articles of the shipped pile-mini pack, cut to ``chars``."""
    wiki = read_pile(pack_path("pile-mini"), "train", subsets=["Wikipedia (en)"])
    out = [(d.meta["title"], d.text[:chars]) for d in wiki if len(d.text) > chars]
    assert len(out) >= offset + n
    return out[offset : offset + n]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny database, a training dataset from it and a `retro_core.train` run directory."""
    root = tmp_path_factory.mktemp("own")
    docs = [Document(doc_id=t, text=x, meta={}) for t, x in _articles(8, 1200)]
    db = build_database(
        docs, root / "db", embedder="hash:32", chunk_size=M, index_factory="Flat", progress=False
    )
    write_neighbours(db, None, root / "dataset", k=2, progress=False)
    cfg = RetroConfig(
        vocab_size=db.tokenizer.vocab_size, d_model=16, n_heads=2, n_layers=3, chunk_size=M,
        num_neighbours=2, max_seq_len=4 * M, pad_id=db.tokenizer.pad_id,
        tokenizer_id=db.tokenizer_id, enc_layers=1,
    )  # fmt: skip
    tc = TrainConfig(
        steps=3, batch_size=2, warmup_steps=1, eval_every=0, eval_batches=0, seq_chunks=4,
        checkpoint_every=1, keep_checkpoints=2, log_every=1,
    )  # fmt: skip
    train(cfg, tc, root / "dataset", root / "run", progress=False)
    return {"root": root, "db": root / "db", "run": root / "run"}


def _write_config(path: Path, **cfg: object) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------------------------ readers


def test_own_text_jsonl_plain_files_and_folder(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "body": {"text": "First document."}, "src": "news"},
        {"body": {"text": ["Para one.", "Para two."]}, "src": "blog"},
    ]
    f = tmp_path / "own" / "docs.jsonl"
    f.parent.mkdir()
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "own" / "note.txt").write_bytes(b"caf\xe9 and more\n")  # a Latin-1 byte
    (tmp_path / "own" / ".hidden.txt").write_text("never read")
    (tmp_path / "own" / "image.png").write_bytes(b"\x89PNG")
    docs = read_text_documents(f, text_field="body.text", subset_field="src")
    assert [(d.doc_id, d.text, d.meta["subset"]) for d in docs] == [
        ("a", "First document.", "news"),
        ("docs.jsonl:2", "Para one.\n\nPara two.", "blog"),
    ]
    txt = read_text_documents(tmp_path / "own" / "note.txt")
    assert txt[0].text == "caf\ufffd and more\n" and txt[0].meta["replaced_bytes"] == 1
    # A folder: its .jsonl and .txt files (sorted), no hidden file, the .png skipped.
    bench = load_benchmark(str(tmp_path / "own"), text_field="body.text")
    assert [d.doc_id for d in bench.documents] == ["a", "docs.jsonl:2", "note.txt"]
    # Errors: one line naming the file, line and field, and the fields the record has.
    with pytest.raises(BenchmarkError, match=r"docs\.jsonl:1: field 'text'.*has: body, id, src"):
        read_text_documents(f)
    with pytest.raises(BenchmarkError, match=r"docs\.jsonl:1: subset field 'nope'"):
        read_text_documents(f, text_field="body.text", subset_field="nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.csv").write_text("a,b\n")
    with pytest.raises(BenchmarkError, match=r"empty: cannot tell which benchmark"):
        load_benchmark(str(empty))


def test_own_text_ids_from_a_plain_jsonl(tmp_path: Path) -> None:
    f = tmp_path / "mine.jsonl"
    f.write_text('{"text": "hello"}\n\n{"text": "world", "id": 7}\n')
    bench = load_benchmark(str(f))
    assert bench.kind == "lm" and bench.split == "test"
    assert [(d.doc_id, d.text, d.meta) for d in bench.documents] == [
        ("mine.jsonl:1", "hello", {}),
        ("7", "world", {}),
    ]


@pytest.mark.parametrize(
    "answers",
    [
        ["Paris", "the city of Paris"],  # NQ-open form under 'answer' (below) and a list here
        [{"text": "Paris", "answer_start": 3}, {"text": "the city of Paris", "answer_start": 0}],
        {"text": ["Paris", "the city of Paris"], "answer_start": [3, 0]},
    ],
)
def test_squad_shaped_answers_equal_nq_open(tmp_path: Path, answers: object) -> None:
    nq = tmp_path / "nq.jsonl"
    nq.write_text(
        json.dumps({"question": "Capital of France?", "answer": ["Paris", "the city of Paris"]})
        + "\n"
    )
    sq = tmp_path / "sq.jsonl"
    sq.write_text(json.dumps({"id": "q1", "question": "Capital of France?", "answers": answers}))
    a, b = load_benchmark(str(nq)), load_benchmark(str(sq))
    assert a.kind == b.kind == "qa"
    assert [(e.question, e.answers) for e in a.examples] == [
        (e.question, e.answers) for e in b.examples
    ]
    assert b.examples[0].id == "q1"
    # A JSON list of the same records reads the same.
    js = tmp_path / "sq.json"
    js.write_text(json.dumps([{"question": "Capital of France?", "answers": answers}]))
    assert load_benchmark(str(js)).examples[0].answers == a.examples[0].answers


def test_qa_answer_errors_name_the_field(tmp_path: Path) -> None:
    f = tmp_path / "q.jsonl"
    f.write_text('{"question": "who?", "gold": ["x"]}\n')
    with pytest.raises(BenchmarkError, match=r"q\.jsonl:1: expected 'answer'.*has: gold, question"):
        load_benchmark(str(f))
    f.write_text('{"question": "who?", "answers": {"answer_start": [1]}}\n')
    with pytest.raises(BenchmarkError, match=r"q\.jsonl:1: expected 'answers' to be a non-empty"):
        load_benchmark(str(f))


# ------------------------------------------------------------------------- retrieval recall


def test_answer_hit_ranks_against_hand_counted_neighbours() -> None:
    from retro_eval.benchmarks import QAExample
    from retro_eval.qa import answer_hit_ranks, recall_at
    from retro_eval.testing import ByteTokenizer

    tok = ByteTokenizer()
    texts = ["nothing here", "The Eiffel Tower, in Paris!", "towers of eiffel"]

    class Fixed:
        chunk_size = 4
        tokenizer_id = "bytes"

        def retrieve(self, chunks, k, exclude_doc_ids=None):
            from retro_core.retrieval import Neighbours

            q = len(chunks)
            ids = [tok.encode(t) for t in texts][:k]
            r = max(len(x) for x in ids)
            toks = np.zeros((q, k, r), np.int64)
            lens = np.zeros((q, k), np.int64)
            for j, x in enumerate(ids):
                toks[:, j, : len(x)] = x
                lens[:, j] = len(x)
            return Neighbours(toks, lens, np.tile(np.arange(k), (q, 1)), np.zeros((q, k)), 0)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = RetroConfig(
                vocab_size=256, d_model=8, n_heads=2, n_layers=3, chunk_size=4, max_seq_len=16,
                enc_layers=1, tokenizer_id="bytes", pad_id=0,
            )  # fmt: skip

    examples = [
        QAExample("1", "where?", ["an Eiffel tower"]),  # article + case: rank 1
        QAExample("2", "what?", ["Tower in"]),  # "tower in" is in neighbour 1 as words
        QAExample("3", "which?", ["eiffe"]),  # a part of a word only: no hit
        QAExample("4", "who?", ["NOTHING"]),  # rank 0
    ]
    from retro_eval.perplexity import model_geometry

    model = Model()
    assert model_geometry(model)[1] == 4
    ranks = answer_hit_ranks(model, tok, examples, Fixed(), depth=3, max_new_tokens=4)
    assert ranks == [1, 1, -1, 0]
    assert recall_at(ranks) == {"top1": 25.0, "top2": 75.0, "top10": 75.0, "questions": 4}


# ------------------------------------------------------------ run directories as model arguments


def test_run_directory_resolves_to_its_latest_checkpoint(world, caplog) -> None:
    from retro_eval.checkpoints import load_eval_model, resolve_checkpoint

    run = world["run"]
    steps = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert steps == ["step_00000002", "step_00000003"]
    with caplog.at_level(logging.INFO, logger="retro_eval.checkpoints"):
        model = load_eval_model(run)
    assert resolve_checkpoint(run) == run / "checkpoints" / "step_00000003"
    assert "latest checkpoint" in caplog.text and "step_00000003" in caplog.text
    ref = load_checkpoint(run / "checkpoints" / "step_00000003")
    older = load_checkpoint(run / "checkpoints" / "step_00000002")
    sd, rsd, osd = model.state_dict(), ref.state_dict(), older.state_dict()
    assert all(torch.equal(sd[k], rsd[k]) for k in rsd)
    assert not all(torch.equal(rsd[k], osd[k]) for k in rsd)  # the steps really differ
    with pytest.raises(ValueError, match="no such checkpoint"):
        resolve_checkpoint(world["root"] / "nope")


def test_lm_eval_model_and_generate_take_a_run_directory(world, capsys) -> None:
    from retro_eval.lm import RetroLM

    run, dbp = world["run"], world["db"]
    latest = latest_checkpoint(run)
    lm = RetroLM(checkpoint=str(run), database=str(dbp), k=2)
    ref = load_checkpoint(latest)
    assert all(torch.equal(lm.model.state_dict()[k], v) for k, v in ref.state_dict().items())
    db = Database.open(dbp)
    prompt = "The history of the"
    assert main(["generate", str(run), "--database", str(dbp), "--prompt", prompt,
                 "--max-new-tokens", "12"]) == 0  # fmt: skip
    out = capsys.readouterr().out.rstrip("\n")
    ids = db.tokenizer.encode(prompt)
    new = generate(ref, ids, db, 12, eos_id=db.tokenizer.eos_id)
    assert out == prompt + db.tokenizer.decode(new)
    assert main(["generate", str(world["root"] / "nope"), "--prompt", "x"]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    nope = f"checkpoint={world['root'] / 'nope'}"
    assert main(["lm-eval", "--model", "retro", "--model_args", nope, "--tasks",
                 "retro_wikitext_mini", "--limit", "1"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("retro-eval: error: ") and "no such checkpoint" in err[-1]


# -------------------------------------------------------------- retro-eval run on own data


def _own_files(root: Path) -> tuple[Path, Path]:
    arts = _articles(6, 400, offset=8)
    text = root / "mine.jsonl"
    text.write_text(
        "".join(
            json.dumps({"text": t, "source": "even" if i % 2 == 0 else "odd"}) + "\n"
            for i, (_, t) in enumerate(arts)
        )
    )
    ctx = _articles(3, 1200)  # the database's own articles: answers the passages contain
    words = [c[1].split()[40:42] for c in ctx]
    qa = root / "squad.jsonl"
    qa.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"q{i}",
                    "question": f"What follows {ctx[i][0]}?",
                    "answers": {"text": [" ".join(w)], "answer_start": [0]},
                }
            )
            + "\n"
            for i, w in enumerate(words)
        )  # fmt: skip
        + json.dumps({"question": "Nothing?", "answers": [{"text": "zzqx unobtainium"}]})
        + "\n"
    )
    return text, qa


@pytest.mark.slow
def test_run_on_plain_text_and_squad_from_a_run_directory(world, tmp_path, caplog) -> None:
    from retro_eval.perplexity import score_documents

    text, qa = _own_files(tmp_path)
    cfg = _write_config(
        tmp_path / "run.yaml",
        retro=str(world["run"]),
        database={"path": str(world["db"])},
        benchmarks=[
            {"name": "mine", "path": str(text), "subset_field": "source"},
            {"name": "squad-own", "path": str(qa)},
        ],
        k=2, k_sweep=[], overlap=["rc"], batch_size=2, max_new_tokens=4, output="out",
        bootstrap_samples=50, cache_group=2,
    )  # fmt: skip
    with caplog.at_level(logging.INFO):
        assert main(["run", "--config", str(cfg)]) == 0
    assert "step_00000003" in caplog.text and "latest checkpoint" in caplog.text
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["config"]["retro_checkpoint"].endswith("step_00000003")
    mine = res["benchmarks"]["mine"]
    assert mine["documents"] == 6 and set(mine["subsets"]) == {"even", "odd"}
    assert set(mine["bins"]) == {"rc"} and mine["buckets"]["rc"]
    # The numbers equal retro-eval's scorer on the latest checkpoint, called directly.
    db = Database.open(world["db"])
    model = load_checkpoint(latest_checkpoint(world["run"]))
    texts = [json.loads(line)["text"] for line in text.read_text().splitlines()]
    on = score_documents(model, db.tokenizer, texts, retriever=db, k=2, batch_size=2,
                         progress=False)  # fmt: skip
    off = score_documents(model, db.tokenizer, texts, batch_size=2, progress=False)
    assert mine["models"]["retro_on"]["bpb"] == pytest.approx(on.bpb(), rel=1e-6)
    assert mine["models"]["retro_off"]["bpb"] == pytest.approx(off.bpb(), rel=1e-6)
    even = on.select_documents([0, 2, 4])
    assert mine["subsets"]["even"]["retro_on"] == pytest.approx(on.bpb(even), rel=1e-6)
    sq = res["benchmarks"]["squad-own"]
    assert sq["questions"] == 4 and set(sq["models"]) == {"retro_on", "retro_off"}
    rec = sq["retrieval_recall"]["db"]
    assert rec["questions"] == 4
    assert 0 <= rec["top1"] <= rec["top2"] <= rec["top10"] <= 75.0  # the 4th never matches
    report = (tmp_path / "out" / "report.md").read_text()
    assert "retrieval recall" in report.lower()
    # A second run reuses every entry and writes the same numbers.
    first = res["benchmarks"]
    assert main(["run", "--config", str(cfg)]) == 0
    again = json.loads((tmp_path / "out" / "results.json").read_text())
    assert again["benchmarks"] == first
    assert again["cache"]["misses"] == 0 and again["cache"]["hits"] > 0


def _run_cli(cfg: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-m", "retro_eval.cli", "run", "--config", str(cfg), *extra],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
def test_killed_run_resumes_with_identical_numbers(world, tmp_path) -> None:
    # 24 documents of 500 characters: pieces of the pile-mini pack's test documents.
    pile = [
        d.text[i : i + 500]
        for d in read_pile(pack_path("pile-mini"), "test")
        for i in range(0, len(d.text) - 500, 500)
    ]
    assert len(pile) >= 24
    text = tmp_path / "many.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in pile[:24]))
    common = dict(
        retro=str(world["run"]), database={"path": str(world["db"])},
        benchmarks=[{"name": "many", "path": str(text)}], k=2, k_sweep=[1, 2], overlap=["rc"],
        batch_size=2, bootstrap_samples=50, cache_group=1,
    )  # fmt: skip
    cfg = _write_config(tmp_path / "a.yaml", **common, output="a")
    proc = _run_cli(cfg)
    cache = tmp_path / "a" / "cache"

    def entries() -> list[Path]:  # complete entries (not a temporary file being written)
        return sorted(cache.glob("*/[!.]*.npz"))

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if len(entries()) >= 28:  # retrieval done (24 entries), scoring under way
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "a" / "results.json").exists()
    cached = len(entries())
    assert cached >= 28
    # Started again, it finishes, reusing what the killed run stored.
    proc = _run_cli(cfg)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-2000:]
    resumed = json.loads((tmp_path / "a" / "results.json").read_text())
    assert resumed["cache"]["hits"] >= cached
    # An uninterrupted run without the cache gives identical numbers.
    ref_cfg = _write_config(tmp_path / "b.yaml", **common, output="b")
    assert main(["run", "--config", str(ref_cfg), "--no-cache"]) == 0
    ref = json.loads((tmp_path / "b" / "results.json").read_text())
    assert not (tmp_path / "b" / "cache").exists()
    assert resumed["benchmarks"] == ref["benchmarks"]
    # Corrupted entries are detected and recomputed, never used: truncate one, alter one's
    # numbers (its checksum no longer matches), put one under another entry's name.
    files = entries()
    files[0].write_bytes(files[0].read_bytes()[:100])
    with np.load(files[1]) as z:
        data = {n: z[n] for n in z.files}
    data["bits"] = data["bits"] + 1.0 if "bits" in data else data["tokens"] + 1
    np.savez(files[1], **data)
    files[3].write_bytes(files[2].read_bytes())
    assert main(["run", "--config", str(cfg)]) == 0
    fixed = json.loads((tmp_path / "a" / "results.json").read_text())
    assert fixed["cache"]["corrupted"] == 3
    assert fixed["benchmarks"] == ref["benchmarks"]
    # --max-documents stays: the first N documents, their entries reused.
    assert main(["run", "--config", str(cfg), "--max-documents", "5"]) == 0
    five = json.loads((tmp_path / "a" / "results.json").read_text())
    assert five["benchmarks"]["many"]["documents"] == 5 and five["cache"]["misses"] > 0
    assert main(["run", "--config", str(cfg), "--max-documents", "0"]) == 2


def test_bad_own_benchmark_is_exit_2(world, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "t", "paragraphs": 3}\n')
    cfg = _write_config(
        tmp_path / "run.yaml", retro=str(world["run"]),
        benchmarks=[{"name": "bad", "path": str(bad), "text_field": "paragraphs"}], output="out",
    )  # fmt: skip
    assert main(["run", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "bad.jsonl:1: field 'paragraphs'" in err and "has: paragraphs, title" in err


def test_result_cache_refuses_corrupted_entries(tmp_path: Path) -> None:
    from retro_eval.cache import ResultCache, cache_key

    rc = ResultCache(tmp_path / "cache")
    a, b = cache_key("a"), cache_key("b")
    rc.put_json(a, {"em": [1.0, 0.0], "predictions": ["x", "y"]})
    rc.put_json(b, {"em": [0.0], "predictions": ["z"]})
    assert rc.get_json(a) == {"em": [1.0, 0.0], "predictions": ["x", "y"]}
    path_a = next((tmp_path / "cache").glob(f"*/{a}.json"))
    path_b = next((tmp_path / "cache").glob(f"*/{b}.json"))
    entry = json.loads(path_a.read_text())
    entry["value"]["em"][1] = 1.0  # a changed number: the checksum no longer matches
    path_a.write_text(json.dumps(entry))
    assert rc.get_json(a) is None and not path_a.exists()
    path_b.write_text(path_b.read_text()[:-5])  # truncated
    assert rc.get_json(b) is None
    rc.put_arrays(a, {"bits": np.arange(3.0)})
    npz = next((tmp_path / "cache").glob(f"*/{a}.npz"))
    other = tmp_path / "cache" / b[:2] / f"{b}.npz"  # where b's entry lives
    other.parent.mkdir(exist_ok=True)
    other.write_bytes(npz.read_bytes())  # an entry under another entry's name
    assert rc.get_arrays(b) is None and not other.exists()
    np.testing.assert_array_equal(rc.get_arrays(a)["bits"], np.arange(3.0))
    npz.write_bytes(b"PK\x03\x04 not a zip")
    assert rc.get_arrays(a) is None
    assert rc.corrupted == 4
    with pytest.raises(TypeError, match="no pickled objects"):
        rc.put_arrays(a, {"x": np.array([{"a": 1}], dtype=object)})
    assert ResultCache(None).get_arrays(a) is None  # disabled: stores and finds nothing
