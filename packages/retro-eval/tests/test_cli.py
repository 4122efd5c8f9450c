"""run.yaml parsing, one-line errors, `retro-eval report` and `retro-eval lm-eval` wiring."""

from __future__ import annotations

import json
import sys

import pytest

from retro_eval.cli import main
from retro_eval.run import RunConfigError, load_run_config, parse_run_config

GOOD = {
    "retro": "ckpt/retro",
    "baseline": "ckpt/base",
    "database": {"path": "db", "build_from": ["wikitext-mini:train"], "dedup": True},
    "benchmarks": ["wikitext-mini", {"name": "pile-mini", "split": "valid", "max_documents": 3}],
    "k_sweep": [4, 1, 2],
    "output": "out",
}


def test_parse_good_config(tmp_path):
    cfg = parse_run_config(GOOD, tmp_path)
    assert cfg.retro == tmp_path / "ckpt/retro"
    assert cfg.baseline == tmp_path / "ckpt/base"
    assert cfg.database.path == tmp_path / "db" and cfg.database.dedup
    assert cfg.database.build_from == ["wikitext-mini:train"]
    assert [b.name for b in cfg.benchmarks] == ["wikitext-mini", "pile-mini"]
    assert cfg.benchmarks[1].max_documents == 3
    assert cfg.k_sweep == [1, 2, 4]
    assert cfg.alphas == [0.0, 0.125, 0.25, 0.5, 0.75, 1.0]
    alt = parse_run_config(
        {"checkpoints": {"retro": "a", "baseline": "b"}, "benchmarks": ["x"], "output": "o"},
        tmp_path,
    )
    assert alt.retro == tmp_path / "a" and alt.baseline == tmp_path / "b"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"retro": None}, "'retro'"),
        ({"benchmarks": []}, "'benchmarks'"),
        ({"benchmarks": [{"split": "test"}]}, r"benchmarks\[0\]"),
        (
            {"benchmarks": [{"name": "x", "splitt": "test"}]},
            r"benchmarks\[0\]: unknown field\(s\) splitt",
        ),
        ({"k_sweep": [0, 2]}, "'k_sweep'"),
        ({"alphas": [0.5, 2]}, "'alphas'"),
        ({"overlap": ["rc", "bleu"]}, "'overlap'"),
        ({"window": "big"}, "'window'"),
        ({"output": None}, "'output'"),
        ({"database": {"build_from": ["x"]}}, "database"),
        ({"database": {"path": "db", "dedup_threshold": 3}}, "dedup_threshold"),
        ({"colour": "blue"}, r"unknown field\(s\) colour"),
    ],
)
def test_config_errors_are_one_line(tmp_path, change, match):
    data = {**GOOD, **change}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(RunConfigError, match=match) as e:
        parse_run_config(data, tmp_path, "run.yaml")
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("run.yaml")


def test_cli_exit_code_2_on_bad_config(tmp_path, capsys):
    bad = tmp_path / "run.yaml"
    bad.write_text("retro: x\nbenchmarks: [a]\n")  # no output
    assert main(["run", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'output'" in err and err.startswith("retro-eval: error:")
    bad.write_text("retro: [unclosed\n")
    assert main(["run", "--config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["run", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err
    with pytest.raises(RunConfigError):
        load_run_config(tmp_path / "missing.yaml")


def test_cli_missing_split_and_unknown_benchmark(tmp_path, capsys):
    """The reader's one-line errors reach the CLI before any model is needed."""
    from retro_eval.run import BenchmarkSpec, _load_bench

    with pytest.raises(ValueError, match="split") as e:
        _load_bench(BenchmarkSpec(name="wikitext-mini", split="dev-2"))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="nonexistent-bench") as e:
        _load_bench(BenchmarkSpec(name="nonexistent-bench", split="test"))
    assert "\n" not in str(e.value)


def test_cli_report_renders_again(tmp_path, capsys):
    results = {
        "version": 1,
        "benchmarks": {
            "b": {
                "kind": "lm",
                "split": "test",
                "models": {"retro_on": {"bpb": 1.0}, "retro_off": {"bpb": 1.2}},
                "buckets": {"rc": [{"alpha": 0.5, "chunks": 0, "bpb": {"retro_on": None}}]},
            }
        },
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert main(["report", str(path), "--out", str(tmp_path / "r")]) == 0
    assert "empty" in (tmp_path / "r" / "report.md").read_text()
    assert (tmp_path / "r" / "bpb_vs_alpha_b.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["report", str(tmp_path / "nope.json")]) == 2
    assert "no such results file" in capsys.readouterr().err


def test_cli_lm_eval_registers_model_and_tasks(monkeypatch, tmp_path):
    import lm_eval.__main__ as lm_main

    seen = {}

    def fake_cli():
        from lm_eval.api.registry import get_model

        seen["argv"] = list(sys.argv)
        seen["model"] = get_model("retro")

    monkeypatch.setattr(lm_main, "cli_evaluate", fake_cli)
    assert main(["lm-eval", "--model", "retro", "--tasks", "retro_wikitext_mini"]) == 0
    from retro_eval.lm import RetroLM
    from retro_eval.tasks import TASKS_DIR

    assert seen["model"] is RetroLM
    assert seen["argv"][:2] == ["lm-eval", "run"]
    assert seen["argv"][-2:] == ["--include_path", str(TASKS_DIR)]
    main(["lm-eval", "ls", "tasks", "--include_path", str(tmp_path)])
    assert seen["argv"].count("--include_path") == 1
    # the global -v before lm-eval reaches lm-eval with the same arguments (it was a silent no-op)
    seen.clear()
    assert main(["-v", "lm-eval", "--model", "retro", "--tasks", "retro_wikitext_mini"]) == 0
    assert seen["argv"][:4] == ["lm-eval", "run", "--model", "retro"]
