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
