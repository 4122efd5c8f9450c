"""The shard machinery (shards.py) both engines use."""

from __future__ import annotations

import dataclasses

from retro_db.embedders import load_embedder
from retro_db.ingest import Document
from retro_db.shards import ShardWriter, text_fingerprint, tokenized
from retro_db.tokenizer import load_tokenizer

DOCS = [
    Document(doc_id="a", text="The cat sat on the mat and looked at the dog.", meta={"n": 1}),
    Document(doc_id="b", text="Caf\u00e9 na\u00efve \u2014 a second document, a little longer."),
    Document(doc_id="c", text=""),
]


def test_shard_written_without_text_equals_shard_with_text(tmp_path):
    # The Ray engine sends documents without their text, and their text fingerprints instead: the
    # shard must be the local engine's, byte for byte (documents.jsonl records the fingerprints).
    tok = load_tokenizer(None)
    emb = load_embedder("hash:16")
    pairs = list(tokenized(tok, iter(DOCS)))
    ids = [x for _, x in pairs]
    shas = [text_fingerprint(d.text) for d in DOCS]
    out = {}
    for name, docs, given in [
        ("local", DOCS, None),
        ("remote", [dataclasses.replace(d, text="") for d in DOCS], shas),
    ]:
        writer = ShardWriter(tmp_path / name, tok, emb, 8, 4, 2, False, 16)
        writer.write_shard(0, docs, ids, 0, "source-sha", given)
        shard = writer.shard_dir(0)
        out[name] = {p.name: p.read_bytes() for p in sorted(shard.iterdir())}
    assert out["remote"] == out["local"]
    lines = out["local"]["documents.jsonl"].decode().splitlines()
    assert len(lines) == 2  # the empty document has no tokens: skipped
    assert text_fingerprint(DOCS[1].text) in lines[1]
