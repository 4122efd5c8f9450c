"""retro_db: the RETRO retrieval database.

Chunking into m-token chunks, frozen-BERT keys, a faiss index, neighbour precomputation and
MinHash dedup. ``import retro_db`` needs neither torch nor transformers: those are imported only
by the embedding module (extra ``[embed]``).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("retro-db")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]

# Loaded on first use: MinHash dedup (minhash.py, datasketch) and the frozen-BERT embedder
# (embed.py, needs the [embed] extra: `import retro_db` must not import torch).
_LAZY = {
    "ChunkOverlapIndex": "retro_db.minhash",
    "DedupReport": "retro_db.minhash",
    "dedup_documents": "retro_db.minhash",
    "minhash_signatures": "retro_db.minhash",
    "shingle_hashes": "retro_db.minhash",
    "to_minhash": "retro_db.minhash",
    "ChunkEmbedder": "retro_db.embed",
    "embed_chunks": "retro_db.embed",
    # database (db-A): none of these import torch
    "Document": "retro_db.ingest",
    "IngestError": "retro_db.ingest",
    "IngestStats": "retro_db.ingest",
    "read_documents": "retro_db.ingest",
    "read_sources": "retro_db.ingest",
    "LMTokenizer": "retro_db.tokenizer",
    "load_tokenizer": "retro_db.tokenizer",
    "ChunkStore": "retro_db.chunks",
    "DatabaseError": "retro_db.manifest",
    "HashingEmbedder": "retro_db.embedders",
    "load_embedder": "retro_db.embedders",
    "Database": "retro_db.database",
    "RetrievedNeighbours": "retro_db.database",
    "build_database": "retro_db.build",
    "add_documents": "retro_db.build",
    "collect_garbage": "retro_db.build",
    "GcResult": "retro_db.build",
    "write_neighbours": "retro_db.neighbours",
}
__all__ += list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'retro_db' has no attribute {name!r}")
