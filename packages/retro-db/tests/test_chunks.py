"""Chunk store invariants: chunking, padding, offsets, continuations never crossing documents."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retro_db.chunks import ChunkStore, chunk_document, token_dtype, write_chunk_segment
from retro_db.manifest import DatabaseError

PAD = 7


def _store(tmp_path, docs: list[list[int]], m: int, per_segment: int) -> ChunkStore:
    """Write docs (token lists) as segments of ``per_segment`` documents each, like a build."""
    dirs = []
    for s in range(0, len(docs), per_segment):
        toks, lens, dids, offs = [], [], [], []
        for j, d in enumerate(docs[s : s + per_segment]):
            t, n = chunk_document(d, m, PAD, np.uint16)
            toks.append(t)
            lens.append(n)
            dids.append(np.full(len(t), s + j))
            offs.append(np.arange(len(t)) * m)
        d = tmp_path / f"seg{s}"
        write_chunk_segment(
            d,
            np.concatenate(toks),
            np.concatenate(lens),
            np.concatenate(dids),
            np.concatenate(offs),
        )
        dirs.append(d)
    return ChunkStore(dirs, m, PAD)


def test_chunk_document_pads_last_and_keeps_length():
    t, n = chunk_document(list(range(10, 20)), 4, PAD)
    assert t.tolist() == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19, PAD, PAD]]
    assert n.tolist() == [4, 4, 2]
    t, n = chunk_document(list(range(8)), 4, PAD)
    assert n.tolist() == [4, 4]
    assert chunk_document([], 4, PAD)[0].shape == (0, 4)


def test_token_dtype():
    assert token_dtype(50257) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.int32


docs_strategy = st.lists(
    st.lists(st.integers(0, 60000), min_size=1, max_size=40), min_size=1, max_size=12
)


@settings(max_examples=25, deadline=None)
@given(docs=docs_strategy, m=st.integers(1, 9), per_segment=st.integers(1, 5))
def test_store_invariants(tmp_path_factory, docs, m, per_segment):
    store = _store(tmp_path_factory.mktemp("s"), docs, m, per_segment)
    n = store.num_chunks
    assert n == sum(-(-len(d) // m) for d in docs)
    ids = np.arange(n)
    tokens, lengths = store.chunk_tokens(ids)
    doc_ids = store.doc_ids
    offsets = store.offsets_of(ids)
    # Each document is its chunks' real tokens, concatenated in order; padding is pad_id.
    for d, toks in enumerate(docs):
        sel = np.flatnonzero(doc_ids == d)
        assert np.all(np.diff(sel) == 1)  # consecutive
        assert offsets[sel].tolist() == [i * m for i in range(len(sel))]
        got = np.concatenate([tokens[c, : lengths[c]] for c in sel]).tolist()
        assert got == toks
        assert np.all(lengths[sel[:-1]] == m)
    for c in ids:
        assert np.all(tokens[c, lengths[c] :] == PAD)
    # Continuation = next chunk of the same document, never another document's.
    cont = store.continuation_ids(ids)
    for c in ids:
        if c + 1 < n and doc_ids[c + 1] == doc_ids[c]:
            assert cont[c] == c + 1
        else:
            assert cont[c] == -1
    rows, rlen = store.neighbour_rows(ids)
    assert rows.shape == (n, 2 * m)
    for c in ids:
        doc = docs[doc_ids[c]]
        start = offsets[c]
        expect = doc[start : start + 2 * m]  # chunk + continuation, all within the document
        assert rows[c, : rlen[c]].tolist() == expect
        assert np.all(rows[c, rlen[c] :] == PAD)
    empty_rows, empty_len = store.neighbour_rows(np.array([-1]))
    assert empty_len.tolist() == [0] and np.all(empty_rows == PAD)


def test_store_rejects_wrong_chunk_size_and_truncation(tmp_path):
    store = _store(tmp_path, [[1, 2, 3, 4, 5]], 2, 1)
    assert store.num_chunks == 3
    with pytest.raises(DatabaseError, match=r"tokens\.npy: shape \(3, 2\), expected \[n, m=4\]"):
        ChunkStore([tmp_path / "seg0"], 4, PAD)
    p = tmp_path / "seg0" / "lengths.npy"
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(DatabaseError, match="lengths.npy"):
        ChunkStore([tmp_path / "seg0"], 2, PAD)
