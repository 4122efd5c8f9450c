"""The training dataset format (DESIGN.md 2.2): writer, reader, sequence index, errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from dataset_writer import write_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retro_core.data import (
    DatasetFormatError,
    RetroDataset,
    chunk_documents,
    document_split,
    manifest_checksum,
    verify_dataset,
)

PAD = 0


def _hand_arrays() -> dict[str, np.ndarray]:
    """Two documents, m=2, k=2, r=4, built by hand.

    doc 7: tokens 1 2 3 4 5 -> chunks [1,2] [3,4] [5,pad]
    doc 9: tokens 6 7       -> chunk  [6,7]
    """
    return {
        "tokens": np.array([[1, 2], [3, 4], [5, 0], [6, 7]]),
        "lengths": np.array([2, 2, 1, 2]),
        "doc_ids": np.array([7, 7, 7, 9]),
        "neighbours": np.array(
            [
                [[6, 7, 0, 0], [0, 0, 0, 0]],
                [[6, 7, 0, 0], [0, 0, 0, 0]],
                [[6, 7, 0, 0], [0, 0, 0, 0]],
                [[1, 2, 3, 4], [3, 4, 5, 0]],
            ]
        ),
        "neighbour_lengths": np.array([[2, 0], [2, 0], [2, 0], [4, 3]]),
        "neighbour_ids": np.array([[3, -1], [3, -1], [3, -1], [0, 1]]),
        "neighbour_distances": np.array([[0.5, np.inf], [0.25, np.inf], [1, np.inf], [2, 3]]),
    }


def _write(directory: Path, arrays: dict[str, np.ndarray] | None = None, **kw) -> Path:
    arrays = _hand_arrays() if arrays is None else arrays
    args = dict(tokenizer_id="toy-tok", vocab_size=16, pad_id=PAD, source_db=None)
    args.update(kw)
    return write_dataset(directory, **arrays, **args)


def test_round_trip_by_hand(tmp_path):
    d = _write(tmp_path / "ds", database_doc_ids=_hand_arrays()["doc_ids"])
    ds = RetroDataset(d, seq_chunks=2, verify=True)
    assert (ds.chunk_size, ds.k, ds.r, ds.vocab_size, ds.pad_id) == (2, 2, 4, 16, PAD)
    assert ds.tokenizer_id == "toy-tok" and ds.source_db is None
    assert (ds.num_chunks, ds.num_documents, ds.seq_len) == (4, 2, 4)
    # doc 7 (3 chunks) -> sequences [c0 c1] and [c2]; doc 9 -> [c3]
    assert len(ds) == 3
    assert [ds.sequence_chunks(i) for i in range(3)] == [(0, 2), (2, 1), (3, 1)]

    s0 = ds[0]
    assert s0["tokens"].tolist() == [1, 2, 3, 4]
    # the document goes on into the next sequence: the last position predicts token 5
    assert s0["targets"].tolist() == [2, 3, 4, 5]
    assert s0["loss_mask"].tolist() == [True, True, True, True]
    assert s0["neighbours"].tolist() == [[[6, 7, 0, 0], [0, 0, 0, 0]]] * 2
    assert s0["neighbour_lengths"].tolist() == [[2, 0], [2, 0]]

    s1 = ds[1]  # [5, pad] + a padding chunk; 5 is the document's last token: nothing to predict
    assert s1["tokens"].tolist() == [5, 0, 0, 0]
    assert s1["loss_mask"].tolist() == [False] * 4
    assert s1["targets"].tolist() == [PAD] * 4
    assert s1["neighbour_lengths"].tolist() == [[2, 0], [0, 0]]
    assert s1["neighbours"][1].tolist() == [[PAD] * 4] * 2

    s2 = ds[2]
    assert s2["tokens"].tolist() == [6, 7, 0, 0]
    assert s2["targets"].tolist() == [7, 0, 0, 0]
    assert s2["loss_mask"].tolist() == [True, False, False, False]
    assert s2["neighbours"][0].tolist() == [[1, 2, 3, 4], [3, 4, 5, 0]]
    for key, dtype in (
        ("tokens", torch.long),
        ("targets", torch.long),
        ("loss_mask", torch.bool),
        ("neighbours", torch.long),
        ("neighbour_lengths", torch.long),
    ):
        assert s2[key].dtype == dtype

    # k' < k: neighbours sliced to the first k'
    ds1 = RetroDataset(d, seq_chunks=2, num_neighbours=1)
    assert ds1[2]["neighbours"].shape == (2, 1, 4)
    assert ds1[2]["neighbours"][0, 0].tolist() == [1, 2, 3, 4]


def test_manifest_records_every_file(tmp_path):
    d = _write(tmp_path / "ds")
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["format"] == "retro-dataset" and manifest["version"] == 1
    assert manifest["counts"] == {"chunks": 4, "documents": 2}
    assert (manifest["chunk_size"], manifest["num_neighbours"], manifest["neighbour_len"]) == (
        2,
        2,
        4,
    )
    expected_dtypes = {
        "tokens.npy": "uint16",
        "lengths.npy": "int32",
        "doc_ids.npy": "int64",
        "neighbours.npy": "uint16",
        "neighbour_lengths.npy": "int32",
        "neighbour_ids.npy": "int64",
        "neighbour_distances.npy": "float32",
    }
    assert set(manifest["files"]) == set(expected_dtypes)
    for name, entry in manifest["files"].items():
        raw = (d / name).read_bytes()
        assert entry["sha256"] == hashlib.sha256(raw).hexdigest()
        arr = np.load(d / name, allow_pickle=False)
        assert entry["shape"] == list(arr.shape) and entry["dtype"] == arr.dtype.name
        assert arr.dtype.name == expected_dtypes[name]
    np.testing.assert_array_equal(np.load(d / "tokens.npy"), _hand_arrays()["tokens"])
    # no temporary files left behind
    assert sorted(p.name for p in d.iterdir()) == sorted([*expected_dtypes, "manifest.json"])


def test_large_vocab_uses_int32_and_distances_optional(tmp_path):
    a = _hand_arrays()
    del a["neighbour_distances"]
    a["tokens"] = a["tokens"].copy()
    a["tokens"][0, 0] = 70000
    d = _write(tmp_path / "ds", a, vocab_size=70001)
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["files"]["tokens.npy"]["dtype"] == "int32"
    assert "neighbour_distances.npy" not in manifest["files"]
    assert RetroDataset(d, 1, verify=True)[0]["tokens"][0].item() == 70000


def test_existing_dataset_needs_overwrite(tmp_path):
    d = _write(tmp_path / "ds")
    with pytest.raises(FileExistsError, match="overwrite"):
        _write(d)
    a = _hand_arrays()
    del a["neighbour_distances"]
    _write(d, a, overwrite=True)
    assert not (d / "neighbour_distances.npy").exists()
    RetroDataset(d, 2, verify=True)


def test_dataloader_batches(tmp_path):
    ds = RetroDataset(_write(tmp_path / "ds"), seq_chunks=2)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["tokens"].shape == (3, 4)
    assert batch["neighbours"].shape == (3, 2, 2, 4)
    assert batch["neighbour_lengths"].shape == (3, 2, 2)


# ----------------------------------------------------------------------------------------------
# sequences never cross documents, and tile them


def _random_dataset(rng: np.random.Generator, doc_lengths: list[int], m: int, k: int, vocab: int):
    """Documents of the given token lengths, chunked by plain Python loops (independent of
    chunk_documents), with random neighbours from other documents."""
    docs = [rng.integers(1, vocab, size=n).tolist() for n in doc_lengths]
    tokens, lengths, doc_ids = [], [], []
    for d, doc in enumerate(docs):
        for s in range(0, len(doc), m):
            piece = doc[s : s + m]
            tokens.append(piece + [PAD] * (m - len(piece)))
            lengths.append(len(piece))
            doc_ids.append(100 + 3 * d)  # arbitrary ids, not 0..D-1
    n, r = len(tokens), 2 * m
    nb_lengths = rng.integers(0, r + 1, size=(n, k))
    nb = rng.integers(1, vocab, size=(n, k, r))
    nb[np.arange(r) >= nb_lengths[..., None]] = PAD
    nb_ids = np.where(nb_lengths > 0, rng.integers(0, 10**6, size=(n, k)), -1)
    arrays = {
        "tokens": np.array(tokens),
        "lengths": np.array(lengths),
        "doc_ids": np.array(doc_ids),
        "neighbours": nb,
        "neighbour_lengths": nb_lengths,
        "neighbour_ids": nb_ids,
    }
    return docs, arrays


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    doc_lengths=st.lists(st.integers(1, 23), min_size=1, max_size=8),
    m=st.integers(1, 4),
    seq_chunks=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_sequences_stay_in_one_document_and_tile_it(
    tmp_path_factory, doc_lengths, m, seq_chunks, seed
):
    rng = np.random.default_rng(seed)
    docs, arrays = _random_dataset(rng, doc_lengths, m, k=2, vocab=50)
    d = write_dataset(
        tmp_path_factory.mktemp("ds"),
        **arrays,
        tokenizer_id="t",
        vocab_size=50,
        pad_id=PAD,
        source_db=None,
    )
    ds = RetroDataset(d, seq_chunks=seq_chunks, verify=True)
    doc_of_chunk = arrays["doc_ids"]
    covered = []
    streams: dict[int, list[int]] = {}
    predicted: dict[int, int] = {}
    for i in range(len(ds)):
        start, c = ds.sequence_chunks(i)
        assert 1 <= c <= seq_chunks
        assert len(set(doc_of_chunk[start : start + c].tolist())) == 1, "sequence crosses documents"
        covered.extend(range(start, start + c))
        item = ds[i]
        doc = int(doc_of_chunk[start])
        real = np.arange(m) < arrays["lengths"][start : start + c, None]
        toks = item["tokens"].numpy().reshape(seq_chunks, m)
        streams.setdefault(doc, []).extend(toks[:c][real].tolist())
        assert (toks[c:] == PAD).all() and (item["neighbour_lengths"][c:] == 0).all()
        np.testing.assert_array_equal(
            item["neighbours"][:c].numpy(), arrays["neighbours"][start : start + c]
        )
        # every masked target is the next token of the document
        offset = (start - int(np.flatnonzero(doc_of_chunk == doc)[0])) * m
        d_idx = (doc - 100) // 3
        mask = item["loss_mask"].numpy()
        for t in np.flatnonzero(mask):
            assert item["targets"][t].item() == docs[d_idx][offset + t + 1]
        predicted[doc] = predicted.get(doc, 0) + int(mask.sum())
    # sequences tile the dataset: every chunk exactly once, in order within a document
    assert covered == list(range(len(doc_of_chunk)))
    for d_idx, doc in enumerate(docs):
        assert streams[100 + 3 * d_idx] == doc
        # every token except a document's last one is predicted exactly once
        assert predicted[100 + 3 * d_idx] == len(doc) - 1


def test_chunk_documents_matches_loops():
    docs = [[1, 2, 3, 4, 5], [6], [7, 8, 9, 10]]
    tokens, lengths, doc_ids = chunk_documents(docs, chunk_size=2, pad_id=0)
    assert tokens.tolist() == [[1, 2], [3, 4], [5, 0], [6, 0], [7, 8], [9, 10]]
    assert lengths.tolist() == [2, 2, 1, 1, 2, 2]
    assert doc_ids.tolist() == [0, 0, 0, 1, 2, 2]


# ----------------------------------------------------------------------------------------------
# train/valid split


def test_document_split_is_deterministic_and_by_document(tmp_path):
    ids = np.arange(2000, dtype=np.int64) * 7919
    a = document_split(ids, 0.1, seed=3)
    assert np.array_equal(a, document_split(ids, 0.1, seed=3))
    # a document's decision does not depend on the others or their order
    perm = np.random.default_rng(0).permutation(ids.shape[0])
    assert np.array_equal(document_split(ids[perm], 0.1, seed=3), a[perm])
    assert 0.07 < a.mean() < 0.13
    assert not np.array_equal(a, document_split(ids, 0.1, seed=4))
    assert not document_split(ids, 0.0).any() and document_split(ids, 1.0).all()

    rng = np.random.default_rng(1)
    _, arrays = _random_dataset(rng, [5] * 40, m=2, k=1, vocab=30)
    d = write_dataset(
        tmp_path / "ds", **arrays, tokenizer_id="t", vocab_size=30, pad_id=0, source_db=None
    )
    full = RetroDataset(d, 2)
    train = RetroDataset(d, 2, split="train", valid_fraction=0.3, split_seed=5)
    valid = RetroDataset(d, 2, split="valid", valid_fraction=0.3, split_seed=5)
    assert len(train) + len(valid) == len(full) and len(valid) > 0 and len(train) > 0

    def docs_of(ds):
        return {int(arrays["doc_ids"][ds.sequence_chunks(i)[0]]) for i in range(len(ds))}

    assert docs_of(train).isdisjoint(docs_of(valid))
    assert docs_of(train) | docs_of(valid) == docs_of(full)


# ----------------------------------------------------------------------------------------------
# writer refuses bad arrays


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: a.update(lengths=a["lengths"][:3]), "lengths: expected shape"),
        (lambda a: a.update(tokens=a["tokens"].astype(np.float32)), "tokens: expected an integer"),
        (
            lambda a: a["tokens"].__setitem__((0, 0), 16),
            r"tokens: token ids must lie in \[0, vocab_size=16\)",
        ),
        (
            lambda a: (a["lengths"].__setitem__(1, 1), a["tokens"].__setitem__((1, 1), PAD)),
            "chunk 1 has 1 < m=2 real tokens but is not the last chunk of its document",
        ),
        (lambda a: a["tokens"].__setitem__((2, 1), 9), "positions past lengths must hold pad_id"),
        (lambda a: a.update(doc_ids=np.array([7, 9, 7, 7])), "consecutive"),
        (lambda a: a["neighbour_ids"].__setitem__((0, 1), 2), "missing neighbour must have id -1"),
        (
            lambda a: a["neighbour_lengths"].__setitem__((0, 0), 5),
            r"neighbour_lengths: expected values in \[0, r=4\]",
        ),
        (
            lambda a: a.update(neighbour_ids=a["neighbour_ids"][:, :1]),
            r"neighbour_ids: expected shape \[4, 2\]",
        ),
    ],
)
def test_writer_refuses_bad_arrays(tmp_path, change, match):
    a = _hand_arrays()
    a = {k: v.copy() for k, v in a.items()}
    change(a)
    with pytest.raises(DatasetFormatError, match=match):
        _write(tmp_path / "ds", a)
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_writer_refuses_neighbour_from_own_document(tmp_path):
    a = _hand_arrays()
    a["neighbour_ids"] = a["neighbour_ids"].copy()
    a["neighbour_ids"][1, 0] = 2  # chunk 2 belongs to doc 7, like chunk 1
    with pytest.raises(
        DatasetFormatError, match="chunk 1 .document 7. has neighbour 0 = database chunk 2"
    ):
        _write(tmp_path / "ds", a, database_doc_ids=a["doc_ids"])
    # without database doc ids the check cannot be made and is skipped
    _write(tmp_path / "ds2", a)


# ----------------------------------------------------------------------------------------------
# reader refuses corrupt datasets


def _edit_manifest(d: Path, edit) -> None:
    """Edit the manifest and refresh its checksum (the field checks must refuse, not the checksum)."""
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    m["checksum"] = manifest_checksum(m)
    (d / "manifest.json").write_text(json.dumps(m))


def test_manifest_checksum_refuses_edits_and_old_datasets_load_with_a_warning(tmp_path, caplog):
    d = _write(tmp_path / "ds")
    m = json.loads((d / "manifest.json").read_text())
    body = {k: v for k, v in m.items() if k != "checksum"}
    canonical = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    assert m["checksum"] == hashlib.sha256(canonical.encode()).hexdigest()
    m["tokenizer_id"] = "toy-tol"  # a field no other check can see
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatasetFormatError) as e:
        RetroDataset(d, 2)
    assert "manifest.json: contents differ from its field 'checksum'" in str(e.value)
    assert "\n" not in str(e.value)
    m.pop("checksum")  # a dataset written before manifests carried a checksum
    (d / "manifest.json").write_text(json.dumps(m))
    assert RetroDataset(d, 2).tokenizer_id == "toy-tol"
    assert "no 'checksum' field" in caplog.text


def test_verify_dataset_reads_every_file_once_and_names_the_changed_one(tmp_path):
    d = _write(tmp_path / "ds")
    assert verify_dataset(d)["counts"]["chunks"] == 4
    raw = bytearray((d / "neighbour_distances.npy").read_bytes())
    raw[-1] ^= 0x01  # a float's low bit: no value rule can see it
    (d / "neighbour_distances.npy").write_bytes(bytes(raw))
    RetroDataset(d, 2)  # the cheap checks pass
    with pytest.raises(DatasetFormatError) as e:
        verify_dataset(d)
    assert "neighbour_distances.npy: sha256" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.update(format="something-else"), "manifest.json: field 'format'"),
        (lambda m: m.update(version=2), "manifest.json: field 'version' is 2"),
        (lambda m: m.pop("pad_id"), "manifest.json: missing field 'pad_id'"),
        (
            lambda m: m.update(chunk_size="2"),
            "manifest.json: field 'chunk_size' has the wrong type",
        ),
        (lambda m: m.update(chunk_size=3), "manifest.json: field 'chunk_size' is 3"),
        (
            lambda m: m["files"].pop("doc_ids.npy"),
            "manifest.json: field 'files' has no entry for 'doc_ids.npy'",
        ),
        (lambda m: m["files"]["tokens.npy"].update(dtype="float64"), r"files.tokens.npy.dtype"),
        (lambda m: m["counts"].update(chunks=5), "field 'counts.chunks' is 5"),
    ],
)
def test_reader_refuses_bad_manifest(tmp_path, edit, match):
    d = _write(tmp_path / "ds")
    _edit_manifest(d, edit)
    with pytest.raises(DatasetFormatError, match=match):
        RetroDataset(d, 2)


def test_reader_refuses_unparsable_or_missing_manifest(tmp_path):
    d = _write(tmp_path / "ds")
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetFormatError, match="manifest.json: not valid JSON"):
        RetroDataset(d, 2)
    (d / "manifest.json").unlink()
    with pytest.raises(DatasetFormatError, match="manifest.json: missing"):
        RetroDataset(d, 2)


def test_reader_refuses_missing_file(tmp_path):
    d = _write(tmp_path / "ds")
    (d / "neighbour_ids.npy").unlink()
    with pytest.raises(DatasetFormatError, match=r"neighbour_ids.npy: missing"):
        RetroDataset(d, 2)


def test_reader_refuses_truncated_array(tmp_path):
    d = _write(tmp_path / "ds")
    raw = (d / "neighbours.npy").read_bytes()
    (d / "neighbours.npy").write_bytes(raw[: len(raw) - 10])
    with pytest.raises(DatasetFormatError, match=r"neighbours.npy: unreadable or truncated"):
        RetroDataset(d, 2)


def test_every_header_byte_flip_is_a_one_line_error_naming_the_file(tmp_path):
    """Each byte of the .npy header of tokens.npy flipped in turn (numpy's parser then raises
    ValueError, SyntaxError or tokenize.TokenError): the open or the sha256 check names the file."""
    d = _write(tmp_path / "ds")
    p = d / "tokens.npy"
    raw = p.read_bytes()
    header = 10 + int.from_bytes(raw[8:10], "little")  # magic, version, length, dict
    for offset in range(header):
        flipped = bytearray(raw)
        flipped[offset] ^= 1 << (offset % 8)
        p.write_bytes(bytes(flipped))
        try:
            RetroDataset(d, 2)
            verify_dataset(d)
        except DatasetFormatError as e:
            assert str(p) in str(e) and "\n" not in str(e), (offset, str(e))
        else:
            raise AssertionError(f"a flip at header byte {offset} went unnoticed")
    p.write_bytes(raw)
    verify_dataset(d)


def test_reader_refuses_array_of_other_shape(tmp_path):
    d = _write(tmp_path / "ds")
    np.save(d / "lengths.npy", np.array([2, 2, 1], dtype=np.int32))
    with pytest.raises(
        DatasetFormatError, match=r"lengths.npy: shape \[3\] does not match manifest.json"
    ):
        RetroDataset(d, 2)
    # the manifest updated to match, but the arrays disagree with each other
    _edit_manifest(d, lambda m: m["files"]["lengths.npy"].update(shape=[3]))
    with pytest.raises(
        DatasetFormatError, match=r"lengths.npy: shape \[3\] is inconsistent with tokens.npy"
    ):
        RetroDataset(d, 2)


def test_reader_refuses_pickled_array(tmp_path):
    d = _write(tmp_path / "ds")
    np.save(d / "doc_ids.npy", np.array([7, 7, 7, 9], dtype=object), allow_pickle=True)
    with pytest.raises(DatasetFormatError, match="doc_ids.npy"):
        RetroDataset(d, 2)


@pytest.mark.parametrize("name", ["tokens.npy", "neighbours.npy"])
def test_out_of_vocabulary_id_is_a_one_line_error_at_load(tmp_path, name):
    d = _write(tmp_path / "ds")
    a = np.load(d / name, mmap_mode="r+")
    a.reshape(len(a), -1)[3, 1] = 16  # vocab_size is 16: the embedding table has no row 16
    a.flush()
    del a
    with pytest.raises(DatasetFormatError) as e:
        RetroDataset(d, 2)  # without verify: the range check runs on every load
    msg = str(e.value)
    assert f"{name}: row 3 holds token id 16, outside the vocabulary [0, vocab_size=16)" in msg
    assert "\n" not in msg


def test_verify_checks_hashes_and_values(tmp_path):
    d = _write(tmp_path / "ds")
    tokens = np.load(d / "tokens.npy")
    tokens[2, 1] = 3  # a non-pad token in padding: same shape and dtype, different bytes
    np.save(d / "tokens.npy", tokens)
    RetroDataset(d, 2)  # without verify only the header is checked
    with pytest.raises(DatasetFormatError, match="tokens.npy: sha256"):
        RetroDataset(d, 2, verify=True)
    _edit_manifest(
        d,
        lambda m: m["files"]["tokens.npy"].update(
            sha256=hashlib.sha256((d / "tokens.npy").read_bytes()).hexdigest()
        ),
    )
    with pytest.raises(DatasetFormatError, match="positions past lengths must hold pad_id"):
        RetroDataset(d, 2, verify=True)
