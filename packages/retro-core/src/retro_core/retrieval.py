"""The retrieval contract between the model and any database (DESIGN.md section 2.1).

Plain numpy at the boundary so that a database (retro_db) needs no torch and never imports this
module: it satisfies :class:`Retriever` structurally (duck typing).

Shapes use the paper's symbols: m chunk size, k neighbours, r = 2m neighbour tokens (the neighbour
chunk N followed by its continuation F), q query chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["Neighbours", "Retriever", "RetrieverMismatchError", "check_retriever"]


@dataclass(frozen=True)
class Neighbours:
    """Retrieved neighbours of a batch of chunks.

    Attributes:
        tokens: int [..., k, r] neighbour chunk followed by its continuation, padded with ``pad_id``
            after the first ``lengths`` tokens.
        lengths: int [..., k] number of real tokens in each row of ``tokens`` (0 = no neighbour).
            Real tokens always form a prefix: a neighbour chunk that ends its document has no
            continuation; a full chunk may have a partial continuation.
        chunk_ids: int64 [..., k] database id of each neighbour chunk, -1 where fewer than k
            neighbours were found.
        distances: float32 [..., k] squared L2 distance of each neighbour's key to the query key
            (``inf`` where absent), or None.
        pad_id: the token id used for padding.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    chunk_ids: np.ndarray
    distances: np.ndarray | None = None
    pad_id: int = 0

    def __post_init__(self) -> None:
        if self.tokens.ndim < 2:
            raise ValueError(
                f"Neighbours.tokens: expected [..., k, r], got shape {self.tokens.shape}"
            )
        lead = self.tokens.shape[:-1]
        if self.lengths.shape != lead:
            raise ValueError(
                f"Neighbours.lengths: expected shape {lead} (tokens [..., k, r] without r), "
                f"got {self.lengths.shape}"
            )
        if self.chunk_ids.shape != lead:
            raise ValueError(
                f"Neighbours.chunk_ids: expected shape {lead}, got {self.chunk_ids.shape}"
            )
        if self.distances is not None and self.distances.shape != lead:
            raise ValueError(
                f"Neighbours.distances: expected shape {lead}, got {self.distances.shape}"
            )
        if self.lengths.size and (
            self.lengths.min() < 0 or self.lengths.max() > self.tokens.shape[-1]
        ):
            raise ValueError(
                f"Neighbours.lengths: expected values in [0, r={self.tokens.shape[-1]}], got "
                f"[{self.lengths.min()}, {self.lengths.max()}]"
            )

    @property
    def k(self) -> int:
        """Number of neighbours per chunk."""
        return int(self.tokens.shape[-2])

    @property
    def r(self) -> int:
        """Tokens per neighbour (chunk + continuation, r = 2m)."""
        return int(self.tokens.shape[-1])

    def mask(self) -> np.ndarray:
        """bool [..., k, r]: True on real tokens, False on padding."""
        return np.arange(self.r) < self.lengths[..., None]


@runtime_checkable
class Retriever(Protocol):
    """Anything that finds the k nearest database chunks of query chunks.

    ``retro_db.Database`` satisfies it without importing it.
    """

    @property
    def chunk_size(self) -> int:
        """m, the number of tokens per chunk of the database."""
        ...

    @property
    def tokenizer_id(self) -> str:
        """Identity of the LM tokenizer the database was built with (name and file hash)."""
        ...

    def retrieve(
        self,
        chunks: np.ndarray,
        k: int,
        exclude_doc_ids: np.ndarray | None = None,
    ) -> Neighbours:
        """Return the k nearest neighbours of each query chunk.

        Args:
            chunks: int [q, m] token ids of the query chunks (a partial chunk is padded; callers
                pass its real tokens only through the tokens it has).
            k: number of neighbours to return per chunk.
            exclude_doc_ids: int64 [q] or None; neighbours from document ``exclude_doc_ids[i]``
                are never returned for query ``i`` (a value of -1 excludes nothing).

        Returns:
            Neighbours with tokens [q, k, r], lengths/chunk_ids/distances [q, k].
        """
        ...


class RetrieverMismatchError(ValueError):
    """The retriever was built for another chunk size or tokenizer than the model."""


def check_retriever(retriever: object, *, chunk_size: int, tokenizer_id: str | None) -> None:
    """Refuse a retriever whose chunk size or tokenizer differs from the model's.

    Args:
        retriever: an object satisfying :class:`Retriever`.
        chunk_size: the model's m.
        tokenizer_id: the model's tokenizer id, or None when the model does not record one (then
            only the chunk size is checked).

    Raises:
        RetrieverMismatchError: with a one-line message naming both values.
    """
    if not isinstance(retriever, Retriever):
        raise TypeError(
            f"{type(retriever).__name__} is not a Retriever: it needs chunk_size, tokenizer_id "
            "and retrieve(chunks, k, exclude_doc_ids)"
        )
    if int(retriever.chunk_size) != int(chunk_size):
        raise RetrieverMismatchError(
            f"retriever chunk_size={retriever.chunk_size} but the model expects m={chunk_size}"
        )
    if tokenizer_id is not None and retriever.tokenizer_id != tokenizer_id:
        raise RetrieverMismatchError(
            f"retriever tokenizer_id={retriever.tokenizer_id!r} but the model was trained with "
            f"{tokenizer_id!r}: rebuild the database with the model's tokenizer"
        )
