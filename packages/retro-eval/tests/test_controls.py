"""Controls: shuffled neighbours (a seeded derangement), per-bin overlap sums, bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retro_eval.overlap import (
    BIN_EDGES,
    bin_labels,
    bin_totals,
    bootstrap_bpb_difference,
    bucket_bpb,
    overlap_bins,
)
from retro_eval.perplexity import (
    DocumentNeighbours,
    retrieve_document_neighbours,
    score_documents,
    score_token_documents,
    shuffle_document_neighbours,
    shuffled_slots,
)
from retro_eval.testing import ByteTokenizer, InMemoryRetriever

torch.set_num_threads(1)


def _tagged(counts: list[int], k: int, r: int) -> list[DocumentNeighbours]:
    """Neighbours whose every token, length and id is the chunk's global slot (to trace moves)."""
    out, slot = [], 0
    for c in counts:
        s = np.arange(slot, slot + c, dtype=np.int64)
        out.append(
            DocumentNeighbours(
                np.broadcast_to(s[:, None, None], (c, k, r)).copy(),
                np.broadcast_to(s[:, None], (c, k)).copy(),
                np.broadcast_to(s[:, None], (c, k)).copy() + 1000,
            )
        )
        slot += c
    return out


@settings(max_examples=200, deadline=None)
@given(
    counts=st.lists(st.integers(1, 12), min_size=1, max_size=8).filter(lambda c: sum(c) >= 2),
    k=st.integers(1, 3),
    r=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_shuffled_neighbours_never_come_from_the_own_slot(counts, k, r, seed):
    nbs = _tagged(counts, k, r)
    out = shuffle_document_neighbours(nbs, seed=seed)
    assert [o.tokens.shape for o in out] == [n.tokens.shape for n in nbs]
    assert [o.lengths.shape for o in out] == [n.lengths.shape for n in nbs]
    src = np.concatenate([o.tokens[:, 0, 0] for o in out])
    own = np.arange(sum(counts))
    assert (src != own).all()  # a derangement: never the chunk's own slot
    assert sorted(src.tolist()) == own.tolist()  # a permutation: each slot's neighbours used once
    # tokens, lengths and database ids move together
    for o in out:
        assert (o.tokens == o.tokens[:, :1, :1]).all()
        assert (o.lengths == o.tokens[:, :, 0]).all() and (o.chunk_ids == o.lengths + 1000).all()
    # Never from the own document when no document holds more than half of the chunks; else the
    # fewest possible (the biggest document's surplus).
    doc = np.repeat(np.arange(len(counts)), counts)
    same = int((doc[src] == doc).sum())
    assert same == max(0, 2 * max(counts) - sum(counts))
    # Seeded: the same seed gives the same permutation.
    again = shuffle_document_neighbours(nbs, seed=seed)
    assert all(np.array_equal(a.tokens, b.tokens) for a, b in zip(out, again, strict=True))


@settings(max_examples=100, deadline=None)
@given(c=st.integers(2, 40), seed=st.integers(0, 1000))
def test_shuffled_slots_without_groups_is_a_derangement(c, seed):
    src = shuffled_slots(np.zeros(c, dtype=np.int64), seed=seed)
    assert (src != np.arange(c)).all() and sorted(src.tolist()) == list(range(c))
    src = shuffled_slots(np.arange(c), seed=seed, avoid_same_group=False)
    assert (src != np.arange(c)).all() and sorted(src.tolist()) == list(range(c))


def test_shuffled_slots_mix_and_depend_on_the_seed():
    groups = np.repeat(np.arange(10), 10)  # 10 documents of 10 chunks
    a = shuffled_slots(groups, seed=0)
    b = shuffled_slots(groups, seed=1)
    assert not np.array_equal(a, b)
    # Mixed: a document's chunks take their neighbours from several documents, not one.
    donors = [len(set(groups[a[groups == d]].tolist())) for d in range(10)]
    assert min(donors) >= 3


def test_a_single_chunk_has_no_shuffled_neighbours():
    with pytest.raises(ValueError, match="at least 2 evaluation chunks, got 1") as e:
        shuffle_document_neighbours(_tagged([1], 2, 3))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="got 0"):
        shuffled_slots(np.zeros(0, dtype=np.int64))
    assert shuffle_document_neighbours([]) == []
    # Two chunks of one document: they swap.
    out = shuffle_document_neighbours(_tagged([2], 1, 1), seed=5)
    assert out[0].tokens[:, 0, 0].tolist() == [1, 0]


def test_shuffled_scoring_reuses_the_precomputed_path():
    """Scoring with shuffled neighbours = scoring each chunk with its donor's neighbours."""
    tok = ByteTokenizer()
    from retro_core.config import RetroConfig
    from retro_core.model import Retro

    torch.manual_seed(0)
    model = Retro(
        RetroConfig(
            vocab_size=258,
            d_model=32,
            n_heads=2,
            n_layers=3,
            chunk_size=8,
            enc_layers=1,
            max_seq_len=32,
            tokenizer_id=tok.id,
        )  # fmt: skip
    ).eval()
    texts = ["The cat sat on the mat and looked at the dog.", "Dogs bark at cats all day long."]
    db = InMemoryRetriever(
        [tok.encode(t) for t in ["The dog sat on a mat.", "Cats and dogs."]], chunk_size=8
    )
    docs = [tok.encode(t) for t in texts]
    full = retrieve_document_neighbours(db, docs, chunk_size=8, k=2, pad_id=0, progress=False)
    shuffled = shuffle_document_neighbours(full, seed=3)
    a = score_token_documents(
        model, docs, decode=tok.decode, prefix_id=1, neighbours=shuffled, progress=False
    )
    b = score_documents(model, tok, texts, neighbours=shuffled, progress=False)
    on = score_documents(model, tok, texts, neighbours=full, progress=False)
    np.testing.assert_allclose(a.bits, b.bits)
    assert not np.allclose(a.bits, on.bits)


def test_bins_equal_hand_computation():
    bits = np.array([10.0, 20.0, 5.0, 8.0, 1.0, 3.0])
    nbytes = np.array([4, 5, 2, 3, 1, 2])
    ov = np.array([0.0, 0.125, 0.126, 0.5, 0.75, 1.0])
    assert BIN_EDGES == (0.0, 0.125, 0.5, 1.0)
    assert bin_labels() == ["[0%, 12.5%]", "(12.5%, 50%]", "(50%, 100%]"]
    bins = overlap_bins(ov)
    assert bins.tolist() == [0, 0, 1, 1, 2, 2]
    b_bits, b_bytes, b_chunks = bin_totals(bits, nbytes, bins, 3)
    np.testing.assert_allclose(b_bits, [30.0, 13.0, 4.0])
    assert b_bytes.tolist() == [9, 5, 3] and b_chunks.tolist() == [2, 2, 2]
    # bpb per bin by hand: 30/9, 13/5, 4/3; the bins add up to the whole.
    np.testing.assert_allclose(b_bits / b_bytes, [30 / 9, 13 / 5, 4 / 3])
    assert b_bits.sum() == bits.sum() and b_bytes.sum() == nbytes.sum()
    # The first bin is the paper's cumulative bucket alpha = 12.5%.
    assert bucket_bpb(bits, nbytes, ov, [0.125])[0]["bpb"] == pytest.approx(30 / 9)
    # An empty bin; an overlap outside [0, 1] falls in no bin.
    bins = overlap_bins([0.9, 1.5])
    assert bins.tolist() == [2, -1]
    b_bits, b_bytes, b_chunks = bin_totals([1.0, 2.0], [1, 1], bins, 3)
    assert b_chunks.tolist() == [0, 0, 1] and b_bytes.tolist() == [0, 0, 1]


def test_bin_errors():
    with pytest.raises(ValueError, match="increasing"):
        overlap_bins([0.1], edges=[0.5, 0.2])
    with pytest.raises(ValueError, match="finite"):
        overlap_bins([np.nan])
    with pytest.raises(ValueError, match="one entry per chunk"):
        bin_totals([1.0], [1, 2], [0], 3)
    with pytest.raises(ValueError, match="out of range"):
        bin_totals([1.0], [1], [3], 3)


def test_bootstrap_interval_contains_the_estimate_and_is_seeded():
    rng = np.random.default_rng(0)
    nbytes = rng.integers(100, 300, 81)
    off = nbytes * rng.uniform(2.0, 3.0, 81)
    on = off - nbytes * rng.uniform(0.0, 0.2, 81)  # ON better by 0..0.2 bpb per chunk
    est, lo, hi = bootstrap_bpb_difference(on, off, nbytes, samples=1000, seed=7)
    assert est == pytest.approx((on.sum() - off.sum()) / nbytes.sum())
    assert lo <= est <= hi and hi < 0  # clearly better: the interval excludes 0
    assert np.array_equal(
        bootstrap_bpb_difference(on, off, nbytes, samples=1000, seed=7), [est, lo, hi]
    )
    other = bootstrap_bpb_difference(on, off, nbytes, samples=1000, seed=8)
    assert other[0] == est and not np.array_equal(other, [est, lo, hi])
    # The memory bound on draws at once does not change the result.
    np.testing.assert_array_equal(
        bootstrap_bpb_difference(on, off, nbytes, seed=7, max_draws=333), [est, lo, hi]
    )
    # Noise around zero: the interval straddles 0.
    noise = off + nbytes * rng.normal(0.0, 0.05, 81)
    _, lo, hi = bootstrap_bpb_difference(noise, off, nbytes, seed=7)
    assert lo < 0 < hi


def test_bootstrap_degenerate_cases():
    assert bootstrap_bpb_difference([3.0], [1.0], [2]).tolist() == [1.0, 1.0, 1.0]
    assert np.isnan(bootstrap_bpb_difference([], [], [])).all()
    same = bootstrap_bpb_difference([1.0, 2.0], [1.0, 2.0], [1, 1])
    assert same.tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="one entry per chunk"):
        bootstrap_bpb_difference([1.0], [1.0, 2.0], [1])
    with pytest.raises(ValueError, match="samples"):
        bootstrap_bpb_difference([1.0], [1.0], [1], samples=0)
