"""Data-parallel training (DistributedDataParallel): the sharded sampler, the DDP code path in one
process, and ``torchrun --nproc_per_node 2 retro-train`` against a single-process run.

The independent truth is always the single-process run of the same global batch, which the rest
of the test suite checks against hand-computed losses.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from dataset_writer import chunk_documents, write_dataset
from hypothesis import given, settings
from hypothesis import strategies as st

from retro_core.checkpoint import load_checkpoint
from retro_core.config import RetroConfig
from retro_core.data import RetroDataset
from retro_core.parallel import DistInfo
from retro_core.train import TrainConfig, TrainError, latest_checkpoint, train
from retro_core.train_data import BatchSampler

V, M, K, PAD = 32, 4, 2, 0

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="this torch build has no torch.distributed with the gloo backend",
)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------
# the sampler


@settings(max_examples=60, deadline=None)
@given(
    num_items=st.integers(1, 40),
    world=st.integers(1, 4),
    per_rank=st.integers(1, 4),
    seed=st.integers(0, 2**31),
    start=st.integers(0, 150),
    n_batches=st.integers(1, 12),
)
def test_rank_slices_together_are_the_single_process_batches(
    num_items, world, per_rank, seed, start, n_batches
):
    B = world * per_rank  # the global micro-batch
    single = list(islice(BatchSampler(num_items, B, seed, start=start), n_batches))
    shards = [
        list(islice(BatchSampler(num_items, B, seed, start, rank=r, world_size=world), n_batches))
        for r in range(world)
    ]
    for j, batch in enumerate(single):
        assert len(batch) == B
        assert all(len(shard[j]) == per_rank for shard in shards)
        assert [
            i for shard in shards for i in shard[j]
        ] == batch  # rank r: the r-th contiguous slice


def test_sampler_is_the_seeded_permutation_stream():
    """Independent truth for the single-process stream: epochs of randperm, run together."""
    s = BatchSampler(5, 4, seed=7)
    got = [i for b in islice(s, 5) for i in b]  # 20 samples = 4 epochs
    perms = []
    for e in range(4):
        g = torch.Generator().manual_seed(7 * 1_000_003 + e)
        perms += torch.randperm(5, generator=g).tolist()
    assert got == perms
    for r in range(2):  # a resumed rank continues its slice of the same stream
        resumed = next(iter(BatchSampler(5, 4, seed=7, start=8, rank=r, world_size=2)))
        assert resumed == perms[8 + 2 * r : 10 + 2 * r]


def test_indivisible_global_batch_is_refused():
    with pytest.raises(TrainError, match=r"batch_size=3: .*divisible by .*WORLD_SIZE=2"):
        BatchSampler(10, 3, 0, rank=0, world_size=2)


# ----------------------------------------------------------------------------------------------
# data


def _make_dataset(directory: Path, n_docs: int = 24, seed: int = 0) -> Path:
    """Documents counting upwards mod 31 of random length 1..29 (one-token documents give
    sequences without a single target); neighbours are the chunk + continuation."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n_docs):
        start, n = int(rng.integers(0, 31)), 1 if i % 6 == 0 else int(rng.integers(2, 30))
        docs.append([1 + (start + t) % 31 for t in range(n)])
    tokens, lengths, doc_ids = chunk_documents(docs, M, PAD)
    N, r = tokens.shape[0], 2 * M
    nb = np.zeros((N, K, r), dtype=np.int64)
    for i in range(N):
        nb[i] = [1 + (int(tokens[i, 0]) - 1 + t) % 31 for t in range(r)]
    return write_dataset(
        directory,
        tokens=tokens,
        lengths=lengths,
        doc_ids=doc_ids,
        neighbours=nb,
        neighbour_lengths=np.full((N, K), r),
        neighbour_ids=np.tile(np.arange(K), (N, 1)),
        tokenizer_id="count-tok",
        vocab_size=V,
        pad_id=PAD,
        source_db=None,
    )


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    return _make_dataset(tmp_path_factory.mktemp("ds") / "ds")


MODEL = {"d_model": 32, "n_heads": 2, "n_layers": 2, "enc_layers": 1, "max_seq_len": 32}


def _model_config() -> RetroConfig:
    return RetroConfig(
        vocab_size=V, chunk_size=M, num_neighbours=K, pad_id=PAD, tokenizer_id="count-tok", **MODEL
    )


TRAIN = dict(
    steps=20,
    batch_size=2,  # the GLOBAL micro-batch: one sequence per rank with two ranks
    grad_accum=2,
    lr=3e-3,
    min_lr=3e-4,
    warmup_steps=2,
    seq_chunks=4,
    eval_every=5,
    eval_batches=2,
    valid_fraction=0.2,
    split_seed=0,
    checkpoint_every=10,
    log_every=1,
    seed=3,
)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _rank_tokens(dataset_dir: Path, world: int, steps: int, **kw) -> np.ndarray:
    """Real (loss) tokens of each rank's micro-batches: int [steps, grad_accum, world]."""
    tc = TrainConfig(**{**TRAIN, **kw})
    ds = RetroDataset(
        dataset_dir, tc.seq_chunks, split="train", valid_fraction=tc.valid_fraction, split_seed=0
    )
    counts = np.zeros((steps * tc.grad_accum, world), dtype=np.int64)
    for r in range(world):
        s = BatchSampler(len(ds), tc.batch_size, tc.seed, rank=r, world_size=world)
        for j, batch in enumerate(islice(s, steps * tc.grad_accum)):
            counts[j, r] = sum(int(ds[i]["loss_mask"].sum()) for i in batch)
    return counts.reshape(steps, tc.grad_accum, world)


def _assert_same_run(a: Path, b: Path, *, rel: float, atol_weights: float) -> None:
    ma, mb = _metrics(a), _metrics(b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == list(range(1, 21))
    for ra, rb in zip(ma, mb, strict=True):
        assert ra["tokens"] == rb["tokens"] and ra["tokens_total"] == rb["tokens_total"]
        assert ra["lr"] == rb["lr"]
        assert rb["loss"] == pytest.approx(ra["loss"], rel=rel), ra["step"]
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=10 * rel), ra["step"]
        assert ("val_loss" in ra) == ("val_loss" in rb)
        if "val_loss" in ra:
            assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=rel), ra["step"]
    wa = load_checkpoint(latest_checkpoint(a)).state_dict()
    wb = load_checkpoint(latest_checkpoint(b)).state_dict()
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=atol_weights, msg=name)


def test_the_data_has_ranks_with_unequal_and_with_no_tokens(dataset_dir):
    """What makes the two-process comparison below sensitive to the loss normalisation: the two
    ranks' micro-batches hold different numbers of real tokens, some none at all."""
    counts = _rank_tokens(dataset_dir, world=2, steps=20)
    per_step = counts.sum(1)  # (steps, world)
    assert (per_step[:, 0] != per_step[:, 1]).sum() >= 15
    assert (counts == 0).any()


# ----------------------------------------------------------------------------------------------
# the DDP code path in one process (a one-rank gloo group)


def _in_one_rank_group(fn):
    """fn() with a one-process gloo group initialised (train() then takes the DDP path)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        return fn()
    finally:
        dist.destroy_process_group()


@needs_gloo
@pytest.mark.parametrize("retrieval", [True, False])
def test_ddp_path_in_one_process_equals_the_plain_run(dataset_dir, tmp_path, retrieval):
    """Same TrainConfig through DistributedDataParallel (token-count all-reduce, no_sync
    accumulation, forward passes of empty micro-batches, sharded validation) and without it.
    retrieval=False leaves the encoder and CCA unused (find_unused_parameters)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    tc = TrainConfig(**{**TRAIN, "batch_size": 1, "retrieval": retrieval})
    assert (_rank_tokens(dataset_dir, 1, 20, batch_size=1) == 0).any()  # empty micro-batches
    plain = train(_model_config(), tc, dataset_dir, tmp_path / "plain", progress=False)
    ddp = _in_one_rank_group(
        lambda: train(_model_config(), tc, dataset_dir, tmp_path / "ddp", progress=False)
    )
    assert ddp["step"] == plain["step"] == 20
    assert ddp["tokens_total"] == plain["tokens_total"]
    assert ddp["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-5)
    # one rank: only the order of float operations differs (loss * (1/N) vs loss / N)
    _assert_same_run(tmp_path / "plain", tmp_path / "ddp", rel=1e-5, atol_weights=1e-5)


# ----------------------------------------------------------------------------------------------
# torchrun end to end


def _descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (Linux /proc; torchrun starts its workers in new sessions, so
    killing torchrun's process group would not reach them)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def _run(cmd: list[str], timeout: float) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [*_descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:6])} ... timed out after {timeout} s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    return out


def _cli_args(dataset_dir: Path, out: Path, config: Path) -> list[str]:
    flags = {k: v for k, v in TRAIN.items() if k not in ("split_seed",)}
    args = ["--data", str(dataset_dir), "--out", str(out), "--config", str(config)]
    for k, v in flags.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return [*args, "--no-progress", "--threads", "1"]


@needs_gloo
@pytest.mark.slow
def test_torchrun_two_processes_follow_the_single_process_loss_curve(dataset_dir, tmp_path):
    """Two ranks (gloo), paused at step 10 and resumed by both ranks from the checkpoint, against
    one uninterrupted process with the same global batch (2 sequences x 2 micro-batches/step).

    Tolerance: the runs do the same arithmetic except the order of float32 reductions (per-rank
    partial sums of the loss and of every gradient, then the all-reduce), about 1e-7 relative
    per step; after 20 AdamW steps the losses agree to ~1e-7 and the weights to ~1e-7 (measured
    2e-7 and 1.2e-7). rel 1e-5 / atol 1e-5 leave margin for other CPUs' kernels yet fail on a
    wrong normalisation (each rank's own token mean, DDP-averaged, changes the step-1 gradient
    norm by 2e-3 relative here: checked by mutating train.py).
    """
    config = tmp_path / "model.json"
    config.write_text(json.dumps(MODEL))
    from retro_core.cli import main

    single = tmp_path / "single"
    assert main(_cli_args(dataset_dir, single, config)) == 0  # in this process: WORLD_SIZE unset

    two = tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    torchrun += ["--nproc_per_node", "2", "-m", "retro_core.cli"]
    args = _cli_args(dataset_dir, two, config)
    log = _run([*torchrun, *args, "--stop-after", "10"], timeout=120)
    assert "data parallel over 2 processes" in log and "[rank 1]" not in log  # rank 0 logs
    assert json.loads((two / "final_metrics.json").read_text())["step"] == 10
    _run([*torchrun, *args, "--resume"], timeout=120)
    assert sorted(p.name for p in (two / "checkpoints").glob("step_*")) == [
        "step_00000010",
        "step_00000020",
    ]
    _assert_same_run(single, two, rel=1e-5, atol_weights=1e-5)


def test_indivisible_global_batch_is_refused_by_train(dataset_dir, tmp_path, monkeypatch):
    train_mod = importlib.import_module("retro_core.train")  # (retro_core.train is the function)

    fake = DistInfo(rank=0, world_size=2, created=False)  # checked before any collective
    monkeypatch.setattr(train_mod, "setup_distributed", lambda device, backend: (fake, device))
    tc = TrainConfig(**{**TRAIN, "batch_size": 3})
    with pytest.raises(TrainError, match=r"batch_size=3: .*divisible by .*WORLD_SIZE=2"):
        train(_model_config(), tc, dataset_dir, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@needs_gloo
def test_retrofit_trains_through_ddp_like_the_plain_run(tmp_path):
    """A retro-fitted GPT-2 (frozen base, left out of DDP) through the one-rank DDP path."""
    transformers = pytest.importorskip("transformers")
    from retro_core.retrofit import retrofit

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2Config(
        vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    base = tmp_path / "tiny-gpt2"
    transformers.GPT2LMHeadModel(gpt2).save_pretrained(str(base))
    ds = _make_dataset(tmp_path / "ds", n_docs=8)
    tc = TrainConfig(**{**TRAIN, "steps": 4, "eval_every": 2, "checkpoint_every": 2})

    def fresh():
        kw = dict(chunk_size=M, k=K, enc_layers=1, cca_layers=(2,), seed=0)
        return retrofit(base, tokenizer_id="count-tok", pad_id=PAD, **kw)

    model_a, model_b = fresh(), fresh()
    plain = train(model_a, tc, ds, tmp_path / "plain", progress=False)
    ddp = _in_one_rank_group(lambda: train(model_b, tc, ds, tmp_path / "ddp", progress=False))
    assert plain["tokens_total"] == ddp["tokens_total"]
    ma, mb = _metrics(tmp_path / "plain"), _metrics(tmp_path / "ddp")
    assert [r["loss"] for r in mb] == pytest.approx([r["loss"] for r in ma], rel=1e-5)
    assert mb[-1]["val_loss"] == pytest.approx(ma[-1]["val_loss"], rel=1e-5)
    new_a = {n: p for n, p in model_a.named_parameters() if p.requires_grad}
    new_b = dict(model_b.named_parameters())
    assert new_a
    for name, p in new_a.items():
        torch.testing.assert_close(new_b[name], p, rtol=0, atol=1e-5, msg=name)
    base_a = {n: p for n, p in model_a.named_parameters() if not p.requires_grad}
    assert all(torch.equal(new_b[n], p) for n, p in base_a.items())


def test_world_size_without_torchrun_variables_is_refused(dataset_dir, tmp_path, monkeypatch):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(TrainError, match="RANK is not set: launch data-parallel .* torchrun"):
        train(_model_config(), TrainConfig(**TRAIN), dataset_dir, tmp_path / "run", progress=False)
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node 1: a plain run
    final = train(
        _model_config(),
        TrainConfig(**{**TRAIN, "steps": 1}),
        dataset_dir,
        tmp_path / "one",
        progress=False,
    )
    assert final["step"] == 1 and not dist.is_initialized()
