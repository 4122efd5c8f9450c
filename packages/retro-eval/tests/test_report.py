"""report.md and PNG plots from a results.json."""

from __future__ import annotations

import json

import pytest

from retro_eval.report import ReportError, load_results, render_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def results() -> dict:
    models = {"retro_on": 0.9, "retro_off": 1.1, "baseline": 1.05}
    return {
        "version": 1,
        "config": {
            "retro": "/ckpt/retro",
            "baseline": "/ckpt/base",
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
    assert "| model | bits per byte | word perplexity |" in report
    assert "| RETRO[ON] | 0.9000 | 30.90 |" in report
    assert "| alpha | chunks | RETRO[ON] | RETRO[OFF] | baseline |" in report
    assert "| 0% | 0 | empty | empty | empty |" in report
    assert "| 12.5% | 4 | 1.0000 | 1.2000 | 1.1500 |" in report
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
