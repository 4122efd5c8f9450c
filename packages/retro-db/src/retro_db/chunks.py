"""The chunk store: documents cut into m-token chunks, kept as memmapped ``.npy`` segments.

A segment (one build shard) is a directory of four arrays, row i describing one chunk:

- ``tokens.npy``  uint16 (vocab <= 65536) or int32 [n, m]: the chunk's tokens, padded with pad_id
- ``lengths.npy`` int32 [n]: real tokens in the chunk (m except the last chunk of a document)
- ``doc_ids.npy`` int64 [n]: the database document index of the chunk
- ``offsets.npy`` int64 [n]: token offset of the chunk's first token within its document

A document's chunks are consecutive and in order, and never split across segments. Segments are
immutable once written; the store is their concatenation, chunk ids numbering rows globally.
The continuation of chunk c is chunk c + 1 if it belongs to the same document, else nothing
(the neighbour row is then padded): a continuation never crosses into another document.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .manifest import DatabaseError, atomic_save_npy

logger = logging.getLogger(__name__)

__all__ = [
    "CHUNK_FILES",
    "ChunkStore",
    "check_segment",
    "chunk_document",
    "read_npy",
    "release_pages",
    "token_dtype",
    "write_chunk_segment",
]

CHUNK_FILES = ("tokens.npy", "lengths.npy", "doc_ids.npy", "offsets.npy")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def chunk_document(
    ids: Sequence[int] | np.ndarray, m: int, pad_id: int, dtype: np.dtype | type = np.int32
) -> tuple[np.ndarray, np.ndarray]:
    """Cut one document's token ids into m-token chunks.

    Args:
        ids: the document's token ids (length T).
        m: chunk size.
        pad_id: fills the tail of the last chunk.

    Returns:
        tokens [ceil(T/m), m] and lengths int32 [ceil(T/m)] (m except possibly the last).
    """
    ids = np.asarray(ids)
    t = len(ids)
    c = -(-t // m)
    tokens = np.full((c, m), pad_id, dtype=dtype)
    tokens.reshape(-1)[:t] = ids
    lengths = np.full(c, m, dtype=np.int32)
    if c and t % m:
        lengths[-1] = t % m
    return tokens, lengths


def write_chunk_segment(
    directory: str | os.PathLike[str],
    tokens: np.ndarray,
    lengths: np.ndarray,
    doc_ids: np.ndarray,
    offsets: np.ndarray,
) -> None:
    """Write one segment's four arrays atomically (tokens [n, m], lengths/doc_ids/offsets [n])."""
    n = len(tokens)
    if not (len(lengths) == len(doc_ids) == len(offsets) == n):
        raise ValueError("write_chunk_segment: tokens, lengths, doc_ids, offsets differ in length")
    d = Path(directory)
    atomic_save_npy(d / "tokens.npy", tokens)
    atomic_save_npy(d / "lengths.npy", np.asarray(lengths, dtype=np.int32))
    atomic_save_npy(d / "doc_ids.npy", np.asarray(doc_ids, dtype=np.int64))
    atomic_save_npy(d / "offsets.npy", np.asarray(offsets, dtype=np.int64))


CHECK_ROWS = 1 << 16  # rows per block of check_segment (memory stays flat in N)


def release_pages(*arrays: np.ndarray) -> None:
    """Give back to the kernel the pages of read-only memory-mapped arrays (``np.load(...,
    mmap_mode="r")`` and views of them) that reading them brought into this process: the pages
    leave its RSS (``madvise(MADV_DONTNEED)``; the data stays in the file and the page cache and
    is read again on the next access). Anything else (an array in memory, a writable or
    copy-on-write map) is left alone, so it is always safe to call."""
    import ctypes

    page = mmap.PAGESIZE
    for arr in arrays:
        if not isinstance(arr, np.ndarray) or arr.nbytes == 0:
            continue
        mapped, base = False, arr
        while base is not None:  # a view of a view ... of the map: every memmap read-only
            if isinstance(base, np.memmap) and base.mode != "r":
                break
            if isinstance(base, mmap.mmap):
                mapped = True
                break
            base = getattr(base, "base", None)
        if not mapped or arr.flags.writeable:
            continue
        start = arr.ctypes.data - arr.ctypes.data % page
        end = arr.ctypes.data + arr.nbytes
        if arr.ndim and not (arr.flags.c_contiguous or arr.flags.f_contiguous):
            continue  # strided view: its span is not [data, data + nbytes)
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)


def check_segment(
    directory: str | os.PathLike[str],
    tokens: np.ndarray,
    lengths: np.ndarray,
    doc_ids: np.ndarray,
    offsets: np.ndarray,
    *,
    pad_id: int,
    vocab_size: int,
    first_doc: int,
) -> int:
    """Check the values of one segment against the rules of the format; return the next doc index.

    Rules (every one follows from how segments are written, so any violation is corruption):
    token ids lie in [0, vocab_size); 1 <= lengths <= m; positions at or after a chunk's length
    hold ``pad_id``; doc_ids start at ``first_doc`` and step by 0 or 1; a document's first chunk
    has offset 0 and each further chunk follows a full chunk at offset + m. Reads the arrays once,
    ``CHECK_ROWS`` rows at a time.

    Raises:
        DatabaseError: naming the file, the row and what was expected.
    """
    d = Path(directory)
    n, m = tokens.shape
    cols = np.arange(m)
    prev_doc, prev_off, prev_len = first_doc - 1, 0, m
    for a in range(0, n, CHECK_ROWS):
        b = min(n, a + CHECK_ROWS)
        t = np.asarray(tokens[a:b])
        ln = np.asarray(lengths[a:b], dtype=np.int64)
        di = np.asarray(doc_ids[a:b], dtype=np.int64)
        of = np.asarray(offsets[a:b], dtype=np.int64)
        _check_rows(d, a, t, ln, cols, pad_id=pad_id, vocab_size=vocab_size)
        pdoc = np.concatenate([[prev_doc], di[:-1]])
        step = di - pdoc
        bad = np.flatnonzero((step != 0) & (step != 1))
        if len(bad):
            i = int(bad[0])
            raise DatabaseError(
                f"{d / 'doc_ids.npy'}: row {a + i} is {int(di[i])} after {int(pdoc[i])}, expected "
                f"{int(pdoc[i])} or {int(pdoc[i]) + 1} (documents are numbered in order)"
            )
        if a == 0 and n and di[0] != first_doc:
            raise DatabaseError(
                f"{d / 'doc_ids.npy'}: row 0 is {int(di[0])}, expected {first_doc} (the document "
                "after the previous shard's last)"
            )
        poff = np.concatenate([[prev_off], of[:-1]])
        plen = np.concatenate([[prev_len], ln[:-1]])
        want = np.where(step == 1, 0, poff + m)
        bad = np.flatnonzero(of != want)
        if len(bad):
            i = int(bad[0])
            raise DatabaseError(
                f"{d / 'offsets.npy'}: row {a + i} is {int(of[i])}, expected {int(want[i])} "
                "(chunks of a document follow each other m tokens apart)"
            )
        bad = np.flatnonzero((step == 0) & (plen != m))
        if len(bad):
            i = int(bad[0]) - 1
            raise DatabaseError(
                f"{d / 'lengths.npy'}: row {a + i} is {int(plen[i + 1])} but its document "
                f"continues, expected m={m}"
            )
        prev_doc, prev_off, prev_len = int(di[-1]), int(of[-1]), int(ln[-1])
        # mapped files: the pages just read leave this process (memory flat in N, issue 18)
        release_pages(tokens[a:b], lengths[a:b], doc_ids[a:b], offsets[a:b])
    return prev_doc + 1


def _check_rows(
    d: Path,
    a: int,
    t: np.ndarray,
    ln: np.ndarray,
    cols: np.ndarray,
    *,
    pad_id: int,
    vocab_size: int,
) -> None:
    """The rules of :func:`check_segment` that hold row by row (token ids, lengths, padding) for
    the block of rows from ``a``: tokens ``t``, lengths ``ln``; ``cols`` is ``arange(m)``."""
    m = len(cols)
    bad = np.flatnonzero((t.min(1) < 0) | (t.max(1) >= vocab_size)) if len(t) else []
    if len(bad):
        i = int(bad[0])
        raise DatabaseError(
            f"{d / 'tokens.npy'}: row {a + i} holds token id "
            f"{int(t[i].max() if t[i].max() >= vocab_size else t[i].min())}, expected ids in "
            f"[0, vocab_size={vocab_size})"
        )
    bad = np.flatnonzero((ln < 1) | (ln > m))
    if len(bad):
        i = int(bad[0])
        raise DatabaseError(f"{d / 'lengths.npy'}: row {a + i} is {int(ln[i])}, expected 1..m={m}")
    bad = np.flatnonzero(((cols[None, :] >= ln[:, None]) & (t != pad_id)).any(1))
    if len(bad):
        i = int(bad[0])
        raise DatabaseError(
            f"{d / 'lengths.npy'}: row {a + i} is {int(ln[i])} but tokens.npy holds real "
            f"tokens after it (expected pad_id={pad_id} from position {int(ln[i])})"
        )


def read_npy(path: str | os.PathLike[str]) -> np.ndarray:
    """Memory-map a ``.npy`` file (no pickle); any unreadable header is a one-line DatabaseError."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # numpy's header parser raises ValueError, SyntaxError, TokenError...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatabaseError(f"{path}: not a readable .npy file, header corrupt ({first})") from None


class ChunkStore:
    """Read-only view over chunk segments (memmapped).

    Args:
        segment_dirs: segment directories in chunk-id order.
        chunk_size: m (checked against each segment's tokens).
        pad_id: padding id of the tokens.
    """

    def __init__(
        self, segment_dirs: Sequence[str | os.PathLike[str]], chunk_size: int, pad_id: int
    ):
        self.chunk_size = int(chunk_size)
        self.pad_id = int(pad_id)
        self._tokens: list[np.ndarray] = []
        self._lengths: list[np.ndarray] = []
        self._doc_ids: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = []
        for d in map(Path, segment_dirs):
            tok = read_npy(d / "tokens.npy")
            if tok.ndim != 2 or tok.shape[1] != self.chunk_size:
                raise DatabaseError(
                    f"{d / 'tokens.npy'}: shape {tok.shape}, expected [n, m={self.chunk_size}]"
                )
            arrays = [read_npy(d / name) for name in CHUNK_FILES[1:]]
            for name, a in zip(CHUNK_FILES[1:], arrays, strict=True):
                if a.shape != (tok.shape[0],):
                    raise DatabaseError(f"{d / name}: shape {a.shape}, expected [{tok.shape[0]}]")
            self._tokens.append(tok)
            self._lengths.append(arrays[0])
            self._doc_ids.append(arrays[1])
            self._offsets.append(arrays[2])
        sizes = [len(t) for t in self._tokens]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._doc_ids_all: np.ndarray | None = None

    @property
    def num_chunks(self) -> int:
        """N, the number of chunks."""
        return int(self._starts[-1])

    @property
    def dtype(self) -> np.dtype:
        return self._tokens[0].dtype if self._tokens else np.dtype(np.int32)

    def _gather(self, parts: list[np.ndarray], ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_chunks):
            raise IndexError(
                f"chunk ids must be in [0, {self.num_chunks}), got {ids.min()}..{ids.max()}"
            )
        seg = np.searchsorted(self._starts, ids, side="right") - 1
        out = np.empty((len(ids),) + parts[0].shape[1:], dtype=parts[0].dtype) if parts else None
        for s in np.unique(seg):
            sel = seg == s
            out[sel] = parts[s][ids[sel] - self._starts[s]]
        return out

    def chunk_tokens(self, ids: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """tokens [q, m] and lengths int32 [q] of chunks ``ids`` [q]."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not ids.size:
            return np.empty((0, self.chunk_size), self.dtype), np.empty(0, np.int32)
        return self._gather(self._tokens, ids), self._gather(self._lengths, ids)

    def doc_ids_of(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """int64 [q] document of each chunk id."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not ids.size:
            return np.empty(0, np.int64)
        return self._gather(self._doc_ids, ids)

    def offsets_of(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """int64 [q] token offset of each chunk within its document."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        return self._gather(self._offsets, ids) if ids.size else np.empty(0, np.int64)

    @property
    def doc_ids(self) -> np.ndarray:
        """int64 [N] document of every chunk (concatenated once, then cached)."""
        if self._doc_ids_all is None:
            parts = [np.asarray(a) for a in self._doc_ids]
            self._doc_ids_all = np.concatenate(parts) if parts else np.empty(0, np.int64)
        return self._doc_ids_all

    def continuation_ids(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """int64 [q]: id of each chunk's continuation (c + 1 in the same document) or -1."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        nxt = ids + 1
        ok = nxt < self.num_chunks
        out = np.full(len(ids), -1, dtype=np.int64)
        if ok.any():
            same = self.doc_ids_of(nxt[ok]) == self.doc_ids_of(ids[ok])
            out[np.flatnonzero(ok)[same]] = nxt[ok][same]
        return out

    def neighbour_rows(self, ids: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Neighbour chunk followed by its continuation, for each id (-1 gives an empty row).

        Returns:
            tokens [q, r = 2m] padded with pad_id, and lengths int32 [q] (real tokens, a prefix).
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        m = self.chunk_size
        q = len(ids)
        tokens = np.full((q, 2 * m), self.pad_id, dtype=self.dtype)
        lengths = np.zeros(q, dtype=np.int32)
        have = ids >= 0
        if not have.any():
            return tokens, lengths
        hid = ids[have]
        t1, l1 = self.chunk_tokens(hid)
        nxt = self.continuation_ids(hid)
        t2 = np.full((len(hid), m), self.pad_id, dtype=self.dtype)
        l2 = np.zeros(len(hid), dtype=np.int32)
        hn = nxt >= 0
        if hn.any():
            t2[hn], l2[hn] = self.chunk_tokens(nxt[hn])
        # A chunk with a continuation is full (length m), so [t1 | t2] keeps real tokens a prefix.
        tokens[have, :m] = t1
        tokens[have, m:] = t2
        lengths[have] = l1 + l2
        return tokens, lengths
