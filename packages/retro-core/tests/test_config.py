"""Tests of retro_core.config.RetroConfig: defaults, the CCA layer rule, validation, JSON round trip."""

import dataclasses
import json

import pytest

from retro_core.config import RetroConfig, default_cca_layers


def test_defaults_resolve_from_paper_rules():
    c = RetroConfig(vocab_size=100)
    assert c.d_ff == 4 * c.d_model
    assert c.neighbour_len == 2 * c.chunk_size == 128
    assert c.enc_d_model == c.d_model and c.enc_n_heads == c.n_heads
    assert c.cca_layers == (6, 9, 12)  # paper: every 3rd layer from layer 6 (12 layers)
    assert c.cond_layer == 6 and c.is_retro


@pytest.mark.parametrize(
    "n_layers, expected",
    [
        (1, (1,)),
        (2, (2,)),
        (3, (3,)),
        (4, (1, 4)),
        (5, (2, 5)),
        (6, (6,)),
        (8, (6,)),
        (9, (6, 9)),
        (12, (6, 9, 12)),
        (24, (6, 9, 12, 15, 18, 21, 24)),
    ],
)
def test_default_cca_rule(n_layers, expected):
    assert default_cca_layers(n_layers) == expected
    assert (
        RetroConfig(vocab_size=10, d_model=16, n_heads=2, n_layers=n_layers).cca_layers == expected
    )


def test_baseline_has_no_cca():
    c = RetroConfig(vocab_size=10, d_model=16, n_heads=2, n_layers=4)
    b = c.baseline()
    assert b.cca_layers == () and not b.is_retro and b.cond_layer is None
    assert dataclasses.replace(b, cca_layers=c.cca_layers) == c


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(d_model=30, n_heads=4), "d_model"),
        (dict(d_model=24, n_heads=8), "d_model"),  # head size 3 is odd: rotary needs pairs
        (dict(chunk_size=0), "chunk_size"),
        (dict(n_layers=0), "n_layers"),
        (dict(cca_layers=(0,)), "cca_layers"),
        (dict(cca_layers=(13,)), "cca_layers"),
        (dict(cca_layers=(9, 6)), "cca_layers"),
        (dict(cca_layers=(6, 6)), "cca_layers"),
        (dict(neighbour_len=10), "neighbour_len"),  # r < m
        (dict(num_neighbours=0), "num_neighbours"),
        (dict(dropout=1.0), "dropout"),
        (dict(enc_d_model=30, enc_n_heads=4), "enc_d_model"),
        (dict(pad_id=100), "pad_id"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(enc_layers=-1), "enc_layers"),
        (dict(max_seq_len=0), "max_seq_len"),
    ],
)
def test_invalid_values_name_the_field(kw, field):
    args = dict(vocab_size=100, chunk_size=16)
    args.update(kw)
    with pytest.raises(ValueError, match=f"RetroConfig.{field}"):
        RetroConfig(**args)


def test_json_round_trip_and_frozen():
    c = RetroConfig(vocab_size=100, d_model=64, n_heads=4, n_layers=6, tokenizer_id="gpt2-abc")
    d = json.loads(json.dumps(c.to_dict()))
    assert RetroConfig.from_dict(d) == c
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.d_model = 8
    with pytest.raises(ValueError, match="unknown fields"):
        RetroConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match="vocab_size"):
        RetroConfig.from_dict({"d_model": 8})
