"""Cross-package: retro_db builds what retro_core consumes, through the contracts of DESIGN.md 2.

A tiny real pipeline: Wikipedia text (retro-eval's shipped pile-mini pack) -> GPT-2 BPE chunks ->
database (hashing embedder, exact index) -> training dataset with neighbours -> a few training
steps -> generation that retrieves from the database at chunk boundaries.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from retro_core import Retro, RetroConfig, RetroDataset, TrainConfig, train
from retro_core.checkpoint import load_checkpoint
from retro_core.generate import generate
from retro_core.retrieval import Neighbours, Retriever, RetrieverMismatchError, check_retriever
from retro_db import Database, Document, build_database, write_neighbours
from retro_eval.benchmarks.pile import read_pile
from retro_eval.packs import pack_path

M = 16  # a small chunk size keeps the test fast; the contract is the same for m = 64


def _documents(n: int = 12, chars: int = 3000) -> list[Document]:
    """n real Wikipedia articles of more than ``chars`` characters, cut to ``chars``.

    From retro-eval's shipped pile-mini pack (its "Wikipedia (en)" subset: gensim's Wikipedia test
    articles, CC BY-SA; see retro_eval/packs/PACKS.md), so the test needs no data beside the clone.
    """
    wiki = read_pile(pack_path("pile-mini"), "train", subsets=["Wikipedia (en)"])
    docs = [
        Document(doc_id=d.meta["title"], text=d.text[:chars], meta={})
        for d in wiki
        if len(d.text) > chars
    ][:n]
    assert len(docs) == n, len(docs)
    return docs


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Database:
    out = tmp_path_factory.mktemp("db") / "db"
    return build_database(
        _documents(), out, embedder="hash:64", chunk_size=M, index_factory="Flat", progress=False
    )


@pytest.fixture(scope="module")
def dataset_dir(db: Database, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "dataset"
    write_neighbours(db, None, out, k=2, progress=False)
    return out


def test_database_satisfies_the_retriever_protocol(db: Database) -> None:
    assert isinstance(db, Retriever)
    check_retriever(db, chunk_size=M, tokenizer_id=db.tokenizer_id)
    with pytest.raises(RetrieverMismatchError, match="chunk_size"):
        check_retriever(db, chunk_size=64, tokenizer_id=db.tokenizer_id)
    with pytest.raises(RetrieverMismatchError, match="tokenizer"):
        check_retriever(db, chunk_size=M, tokenizer_id="another-tokenizer")


def test_retrieved_neighbours_fit_the_core_type(db: Database) -> None:
    chunks, _ = db.chunk_tokens(np.arange(5))
    got = db.retrieve(chunks, k=3, exclude_doc_ids=db.doc_ids[:5])
    nb = Neighbours(
        tokens=got.tokens,
        lengths=got.lengths,
        chunk_ids=got.chunk_ids,
        distances=got.distances,
        pad_id=got.pad_id,
    )
    assert nb.tokens.shape == (5, 3, 2 * M)
    # Same-document exclusion holds at the contract level too.
    for i in range(5):
        own = db.doc_ids[i]
        assert all(db.doc_ids[c] != own for c in nb.chunk_ids[i] if c >= 0)


def test_dataset_written_by_db_is_read_by_core(db: Database, dataset_dir: Path) -> None:
    ds = RetroDataset(dataset_dir, seq_chunks=4, verify=True)
    assert (ds.chunk_size, ds.k, ds.r) == (M, 2, 2 * M)
    assert ds.tokenizer_id == db.tokenizer_id
    item = ds[0]
    assert item["tokens"].shape == (4 * M,)
    assert item["neighbours"].shape == (4, 2, 2 * M)
    # The sequence's tokens are the database's first chunks, in order.
    chunks, lengths = db.chunk_tokens(np.arange(4))
    first_doc = db.doc_ids[:4] == db.doc_ids[0]
    expect = np.concatenate(
        [c[:n] for c, n, same in zip(chunks, lengths, first_doc, strict=True) if same]
    )
    assert item["tokens"][: len(expect)].tolist() == expect.tolist()


def test_train_then_generate_with_database_retrieval(
    db: Database, dataset_dir: Path, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    ds = RetroDataset(dataset_dir, seq_chunks=4)
    cfg = RetroConfig(
        vocab_size=ds.vocab_size,
        d_model=32,
        n_heads=2,
        n_layers=3,
        chunk_size=M,
        num_neighbours=2,
        max_seq_len=8 * M,
        pad_id=ds.pad_id,
        tokenizer_id=ds.tokenizer_id,
        enc_layers=1,
    )
    tc = TrainConfig(
        steps=6, batch_size=2, warmup_steps=1, eval_every=0, eval_batches=0, seq_chunks=4
    )
    metrics = train(cfg, tc, dataset_dir, tmp_path / "run", progress=False)
    assert metrics["step"] == 6 and np.isfinite(metrics["loss"])
    model = load_checkpoint(metrics["checkpoint"])
    assert isinstance(model, Retro)

    calls: list[np.ndarray] = []

    class Spy:
        chunk_size = db.chunk_size
        tokenizer_id = db.tokenizer_id

        def retrieve(self, chunks, k, exclude_doc_ids=None):
            calls.append(np.asarray(chunks))
            return db.retrieve(chunks, k, exclude_doc_ids)

    prompt = db.tokenizer.encode("The history of the city begins with")
    new = generate(model, prompt, Spy(), max_new_tokens=2 * M)
    cached = generate(model, prompt, db, max_new_tokens=2 * M)
    uncached = generate(model, prompt, db, max_new_tokens=2 * M, use_cache=False)
    assert new == cached == uncached
    assert len(new) == 2 * M
    # One retrieval per completed chunk, each of the chunk's m tokens.
    completed = (len(prompt) + 2 * M - 1) // M
    assert len(calls) >= 1 and sum(len(c) for c in calls) == completed
    assert all(c.shape[-1] == M for c in calls)
