"""report.md and PNG plots from a results.json."""

from __future__ import annotations

import json

import pytest

from retro_eval.report import ReportError, load_results, render_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def results() -> dict:
    models = {"retro_on": 0.9, "retro_shuffled": 1.11, "retro_off": 1.1, "baseline": 1.05}
    return {
        "version": 1,
        "config": {
            "retro": "runs/demo/retro",
            "baseline": "runs/demo/baseline",
            "window": 2048,
            "stride": 1024,
        },
        "stage_times": {"database": 12.5, "wikitext-mini": 3.25},
        "benchmarks": {
            "wikitext-mini": {
                "kind": "lm",
                "split": "test",
                "documents": 3,
                "chunks": 10,
                "tokens": 600,
                "bytes": 2400,
                "models": {
                    k: {"bpb": v, "word_perplexity": 30.0 + v, "bits": v * 2400}
                    for k, v in models.items()
                },
                "buckets": {
                    "rc": [
                        {"alpha": 0.0, "chunks": 0, "bpb": {k: None for k in models}},
                        {
                            "alpha": 0.125,
                            "chunks": 4,
                            "bpb": {k: v + 0.1 for k, v in models.items()},
                        },
                        {"alpha": 1.0, "chunks": 10, "bpb": dict(models)},
                    ],
                    "minhash": [
                        {
                            "alpha": 0.5,
                            "chunks": 7,
                            "bpb": {k: v + 0.05 for k, v in models.items()},
                        },
                        {"alpha": 1.0, "chunks": 10, "bpb": dict(models)},
                    ],
                },
                "k_sweep": [{"k": 1, "bpb": 0.95}, {"k": 2, "bpb": 0.9}, {"k": 4, "bpb": 0.88}],
                "vs_off": {
                    "retro_on": {"delta": -0.2, "ci95": [-0.25, -0.15]},
                    "retro_shuffled": {"delta": 0.01, "ci95": [-0.005, 0.02]},
                },
                "shuffle": {"seed": 0, "same_document_chunks": 0},
                "bootstrap": {"samples": 1000, "seed": 0, "level": 0.95},
                "bins": {
                    "rc": [
                        {
                            "bin": "[0%, 12.5%]",
                            "lower": 0.0,
                            "upper": 0.125,
                            "chunks": 4,
                            "bytes": 900,
                            "bpb": {k: v + 0.1 for k, v in models.items()},
                            "vs_off": {
                                "retro_on": {"delta": -0.2, "ci95": [-0.3, -0.1]},
                                "retro_shuffled": {"delta": 0.0, "ci95": [-0.01, 0.01]},
                            },
                        },
                        {
                            "bin": "(12.5%, 50%]",
                            "lower": 0.125,
                            "upper": 0.5,
                            "chunks": 0,
                            "bytes": 0,
                            "bpb": {k: None for k in models},
                            "vs_off": {},
                        },
                        {
                            "bin": "(50%, 100%]",
                            "lower": 0.5,
                            "upper": 1.0,
                            "chunks": 6,
                            "bytes": 1500,
                            "bpb": dict(models),
                            "vs_off": {"retro_on": {"delta": -0.2, "ci95": [-0.4, -0.05]}},
                        },
                    ]
                },
            },
            "pile-mini": {
                "kind": "lm",
                "split": "test",
                "models": {k: {"bpb": v} for k, v in models.items()},
                "subsets": {
                    "Wikipedia (en)": {"retro_on": 0.8, "retro_off": 1.0, "baseline": 0.95},
                    "DM Mathematics": {"retro_on": 1.2, "retro_off": 1.1, "baseline": 1.1},
                },
            },
            "squad-open-mini": {
                "kind": "qa",
                "split": "validation",
                "questions": 20,
                "models": {
                    "retro_on": {"exact_match": 15.0, "f1": 22.5},
                    "retro_off": {"exact_match": 5.0, "f1": 9.75},
                },
            },
        },
    }


def test_report_files_and_pngs(tmp_path):
    import matplotlib.image as mpimg
    from PIL import Image

    path = tmp_path / "results.json"
    path.write_text(json.dumps(results()))
    written = render_report(path, tmp_path / "out")
    report = (tmp_path / "out" / "report.md").read_text()
    assert written["report"] == tmp_path / "out" / "report.md"
    pngs = {k: v for k, v in written.items() if k != "report"}
    assert set(pngs) == {
        "bpb_vs_alpha:wikitext-mini",
        "bpb_per_bin:wikitext-mini",
        "bpb_vs_k:wikitext-mini",
        "subsets:pile-mini",
    }
    for p in pngs.values():
        data = p.read_bytes()
        assert data[:8] == PNG_SIGNATURE
        with Image.open(p) as im:
            im.verify()
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert f"]({p.name})" in report

    # Side by side columns, the empty bucket marked, QA and stage times present.
    assert "| model | bits per byte | word perplexity | minus RETRO[OFF] [95% interval] |" in report
    assert "| RETRO[ON] | 0.9000 | 30.90 | -0.2000 [-0.2500, -0.1500] |" in report
    assert "| RETRO[shuffled] | 1.1100 | 31.11 | +0.0100 [-0.0050, +0.0200] |" in report
    assert "| baseline | 1.0500 | 31.05 | - |" in report
    assert "(a derangement, seed 0; 0 chunks from their own document)" in report
    assert "| alpha | chunks | RETRO[ON] | RETRO[shuffled] | RETRO[OFF] | baseline |" in report
    assert "| 0% | 0 | empty | empty | empty | empty |" in report
    assert "| 12.5% | 4 | 1.0000 | 1.2100 | 1.2000 | 1.1500 |" in report
    # The disjoint overlap bins, with the differences from RETRO[OFF] and their intervals.
    assert "### bpb per overlap bin, overlap = r(C)" in report
    assert (
        "| bin | chunks | RETRO[ON] | RETRO[shuffled] | RETRO[OFF] | baseline "
        "| RETRO[ON] minus RETRO[OFF] [95%] | RETRO[shuffled] minus RETRO[OFF] [95%] |"
    ) in report
    assert (
        "| [0%, 12.5%] | 4 | 1.0000 | 1.2100 | 1.2000 | 1.1500 | -0.2000 [-0.3000, -0.1000] "
        "| +0.0000 [-0.0100, +0.0100] |"
    ) in report
    assert "| (12.5%, 50%] | 0 | empty | empty | empty | empty | empty | empty |" in report
    assert (
        "| (50%, 100%] | 6 | 0.9000 | 1.1100 | 1.1000 | 1.0500 | -0.2000 [-0.4000, -0.0500] | - |"
        in report
    )
    assert "| 4 | 0.8800 |" in report
    assert "| DM Mathematics | 1.2000 | 1.1000 | 1.1000 |" in report
    assert "| RETRO[OFF] | 5.00 | 9.75 |" in report
    assert "| database | 12.5 |" in report


def test_render_again_is_identical(tmp_path):
    render_report(results(), tmp_path / "a")
    render_report(results(), tmp_path / "b")
    assert (tmp_path / "a" / "report.md").read_text() == (tmp_path / "b" / "report.md").read_text()


def test_bad_results_are_one_line_errors(tmp_path):
    with pytest.raises(ReportError, match="no such results file"):
        load_results(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ReportError, match="not valid JSON") as e:
        load_results(bad)
    assert "\n" not in str(e.value)
    bad.write_text("[]")
    with pytest.raises(ReportError, match="'benchmarks'"):
        load_results(bad)
