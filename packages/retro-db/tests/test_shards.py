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


def test_long_document_in_windows_builds_the_same_database(tmp_path, monkeypatch, load_records):
    """Issue 16: a document longer than the tokenising window is tokenised in windows (memory does
    not grow with its length) and the database equals the one tokenised whole, file for file."""
    import retro_db.tokenizer
    from retro_db.build import build_database

    text = "\n\n".join(r["text"] for r in load_records("moby_dick", 6, max_chars=4000))
    docs = [Document("long", text), Document("short", "A short one. Two sentences.")]
    files = {}
    for name, window in [("whole", 1 << 30), ("windows", 97)]:
        monkeypatch.setattr(retro_db.tokenizer, "TOKENIZE_WINDOW", window)
        build_database(
            docs,
            tmp_path / name,
            embedder="hash:16",
            chunk_size=16,
            shard_chunks=64,
            progress=False,
        )
        shards = sorted((tmp_path / name / "shards").iterdir())
        files[name] = {
            f"{s.name}/{p.name}": p.read_bytes() for s in shards for p in sorted(s.iterdir())
        }
    assert len(retro_db.tokenizer.window_cuts(text, 97)[0]) > 100  # many windows, none hard
    assert retro_db.tokenizer.window_cuts(text, 97)[1] == 0
    assert files["windows"] == files["whole"]
