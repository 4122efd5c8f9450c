"""Tests of retro_core.checkpoint: exact round trip, clear errors on corrupt or mismatched files."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from retro_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from retro_core.config import RetroConfig
from retro_core.model import Retro


def tiny(**kw) -> Retro:
    torch.manual_seed(0)
    cfg = dict(
        vocab_size=29,
        d_model=16,
        n_heads=2,
        n_layers=4,
        chunk_size=4,
        max_seq_len=32,
        tokenizer_id="tok-abc",
    )
    cfg.update(kw)
    return Retro(RetroConfig(**cfg))


@pytest.mark.parametrize("cca", [None, ()])
def test_round_trip_is_exact(tmp_path, cca):
    model = tiny(cca_layers=cca)
    save_checkpoint(model, tmp_path / "ckpt", extra={"step": 7, "note": "hi"})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]  # no temporary files left behind
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert loaded.checkpoint_extra == {"step": 7, "note": "hi"}
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randint(0, 29, (2, 11))
    nb = torch.randint(0, 29, (2, 3, 2, 8))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, nb), loaded(x, nb))
    # The output projection stays tied after loading.
    assert "lm_head.weight" not in b


def test_float64_round_trip(tmp_path):
    model = tiny().double()
    save_checkpoint(model, tmp_path)
    loaded = load_checkpoint(tmp_path)
    assert loaded.tok_emb.weight.dtype == torch.float64
    assert torch.equal(loaded.tok_emb.weight, model.tok_emb.weight)


def test_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_checkpoint(tmp_path)
    save_checkpoint(tiny(), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "not valid JSON"),
        ('{"format": "other"}', "format"),
        ('{"format": "retro-checkpoint", "version": 99, "config": {}}', "unsupported version"),
        (
            '{"format": "retro-checkpoint", "version": 1, "config": {"d_model": 8}}',
            'invalid "config"',
        ),
        (
            '{"format": "retro-checkpoint", "version": 1, "config": {"vocab_size": 29, "d_model": 15}}',
            "RetroConfig.d_model",
        ),
    ],
)
def test_bad_config_json(tmp_path, text, match):
    save_checkpoint(tiny(), tmp_path)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(tmp_path)
    assert "config.json" in str(info.value) and "\n" not in str(info.value)


def test_corrupt_weights(tmp_path):
    save_checkpoint(tiny(), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 .* differs"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors"):
        load_checkpoint(tmp_path, verify=False)


def test_weights_not_matching_the_config(tmp_path):
    # RETRO weights under a baseline config: unexpected CCA/encoder tensors.
    save_checkpoint(tiny(), tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["config"]["cca_layers"] = []
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"missing \[\], unexpected \[.blocks.0.cca"):
        load_checkpoint(tmp_path, verify=False)  # verify refuses any edit (test_integrity_*)
    # A config with a different width: shapes differ.
    save_checkpoint(tiny(), tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["config"]["d_ff"] = 32
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"shape \(64, 16\), expected \(32, 16\)"):
        load_checkpoint(tmp_path, verify=False)
    # A tensor removed from the file: missing.
    save_checkpoint(tiny(), tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["norm_f.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing \['norm_f.weight'\]"):
        load_checkpoint(tmp_path, verify=False)


def test_extra_must_be_json(tmp_path):
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tiny(), tmp_path, extra={"x": object()})


def test_integrity_flipped_weight_bytes_are_refused(tmp_path):
    """Seeded byte flips over the tensor data of model.safetensors: every one is refused."""
    import numpy as np

    save_checkpoint(tiny(), tmp_path)
    p = tmp_path / "model.safetensors"
    pristine = p.read_bytes()
    header = 8 + int.from_bytes(pristine[:8], "little")
    rng = np.random.default_rng(6)
    offsets = rng.integers(header, len(pristine), size=12)
    for off in offsets:
        raw = bytearray(pristine)
        raw[int(off)] ^= 0x01
        p.write_bytes(bytes(raw))
        with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 .* differs"):
            load_checkpoint(tmp_path)
    load_checkpoint(tmp_path, verify=False)  # the flip itself loads: only the hash finds it
    p.write_bytes(pristine)
    load_checkpoint(tmp_path)


def test_integrity_config_edit_is_refused(tmp_path):
    save_checkpoint(tiny(), tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert set(meta["integrity"]) == {"weights_sha256", "meta_sha256"}
    meta["config"]["chunk_size"] = 8  # shapes still match: only the record finds the edit
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"config\.json: contents differ from the recorded"):
        load_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path, verify=False).config.chunk_size == 8
    # a checkpoint from before the record existed still loads (with a warning)
    del meta["integrity"]
    (tmp_path / "config.json").write_text(json.dumps(meta))
    assert load_checkpoint(tmp_path).config.chunk_size == 8
