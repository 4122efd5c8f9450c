"""Tests of retro_core.model: causality, the CCA shift, padding, RETRO[OFF], golden logits, learning."""

import math

import pytest
import torch

from retro_core.config import RetroConfig
from retro_core.model import Retro

V, M, K = 37, 4, 2  # vocabulary, chunk size m, neighbours k
R = 2 * M


def tiny_config(**kw) -> RetroConfig:
    base = dict(
        vocab_size=V,
        d_model=32,
        n_heads=2,
        n_layers=4,
        chunk_size=M,
        num_neighbours=K,
        max_seq_len=64,
    )
    base.update(kw)
    return RetroConfig(**base)


def tiny_model(seed: int = 0, dtype=torch.float64, **kw) -> Retro:
    torch.manual_seed(seed)
    return Retro(tiny_config(**kw)).to(dtype).eval()


def test_forward_shapes_any_length_and_k():
    model = tiny_model(dtype=torch.float32)
    for n in (1, 3, 4, 5, 8, 15):
        n_chunks = math.ceil(n / M)
        for k in (1, 2, 3):
            x = torch.randint(0, V, (2, n))
            nb = torch.randint(0, V, (2, n_chunks, k, R))
            out = model(x, nb)
            assert out.shape == (2, n, V)
            assert torch.isfinite(out).all()
    assert model(torch.randint(0, V, (1, 7))).shape == (1, 7, V)


def test_bad_inputs_raise_clear_errors():
    model = tiny_model(dtype=torch.float32)
    x = torch.randint(0, V, (2, 9))
    with pytest.raises(ValueError, match="neighbours"):
        model(x, torch.randint(0, V, (2, 1, K, R)))  # 2 complete chunks need l >= 2
    with pytest.raises(ValueError, match="neighbour_lengths"):
        model(x, torch.randint(0, V, (2, 3, K, R)), torch.zeros(2, 3, K + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.randint(0, V, (1, 65)))
    with pytest.raises(ValueError, match="tokens"):
        model(torch.rand(2, 9))
