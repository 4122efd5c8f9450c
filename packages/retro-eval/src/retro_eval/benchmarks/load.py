"""``load_benchmark``: one entry point for packs, local native files and ``datasets`` hub names."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._io import iter_jsonl, strip_compression
from .pile import PILE_SPLIT_NAMES, pile_documents, pile_split_files, read_pile
from .qa import nq_open_examples, read_nq_open, read_passages, read_squad, squad_flat_examples
from .text import read_text_documents, text_files
from .types import Benchmark, BenchmarkError, canonical_split
from .wikitext import WIKITEXT_FILES, read_wikitext, rows_to_lines, wikitext_documents

__all__ = ["HUB_BENCHMARKS", "HubSpec", "load_benchmark", "read_qa_dir"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubSpec:
    """A benchmark that ``datasets.load_dataset`` can fetch by name.

    Attributes:
        path, config: arguments of ``datasets.load_dataset``.
        kind: reader kind (``wikitext``, ``pile``, ``nq_open``, ``squad``).
        splits: canonical splits the hub copy has.
    """

    path: str | None
    config: str | None
    kind: str
    splits: tuple[str, ...]


_W3 = HubSpec(
    "Salesforce/wikitext", "wikitext-103-raw-v1", "wikitext", ("train", "validation", "test")
)
_W2 = HubSpec(
    "Salesforce/wikitext", "wikitext-2-raw-v1", "wikitext", ("train", "validation", "test")
)
_NQ = HubSpec("google-research-datasets/nq_open", None, "nq_open", ("train", "validation"))
_SQ = HubSpec("rajpurkar/squad", None, "squad", ("train", "validation"))
# The Pile has no maintained hub copy: "pile" works with data_files= (the same JSONL schema).
_PILE = HubSpec(None, None, "pile", ("train", "validation", "test"))

#: usual names -> hub spec.
HUB_BENCHMARKS: dict[str, HubSpec] = {
    **dict.fromkeys(
        [
            "wikitext-103",
            "wikitext103",
            "wikitext-103-raw-v1",
            "wikitext/wikitext-103-raw-v1",
            "Salesforce/wikitext/wikitext-103-raw-v1",
        ],
        _W3,
    ),
    **dict.fromkeys(
        [
            "wikitext-2",
            "wikitext-2-raw-v1",
            "wikitext/wikitext-2-raw-v1",
            "Salesforce/wikitext/wikitext-2-raw-v1",
        ],
        _W2,
    ),
    **dict.fromkeys(["nq_open", "nq-open", "google-research-datasets/nq_open"], _NQ),
    **dict.fromkeys(["squad", "squad_v1", "squad-v1.1", "rajpurkar/squad"], _SQ),
    **dict.fromkeys(["pile", "the_pile"], _PILE),
}

_DEFAULT_SPLIT = {
    "wikitext": "test",
    "pile": "test",
    "qa": "validation",
    "nq_open": "validation",
    "squad": "validation",
}
_QA_STEMS = {"train": ("train",), "validation": ("dev", "validation", "val"), "test": ("test",)}


def read_qa_dir(path: str | Path, split: str = "validation") -> tuple[list, list | None, str]:
    """Read a QA directory: ``*.{dev,train,test}.jsonl[.gz|.zst]`` (NQ-open) or ``{dev,train}-v1.1.json[.gz]``
    (SQuAD), plus an optional ``passages.jsonl[.gz|.zst]`` corpus.

    Returns:
        ``(examples, corpus or None, file read)``.

    Raises:
        BenchmarkError: no file for the split (names what was looked for).
    """
    path = Path(path)
    canon = canonical_split(split)
    stems = _QA_STEMS[canon]
    files = sorted(p for p in path.iterdir() if p.is_file())
    chosen = None
    for stem in stems:
        pat = re.compile(rf"(^|.*\.){re.escape(stem)}\.jsonl(\.gz|\.zst)?$")
        chosen = next((p for p in files if pat.match(p.name)), None)
        if chosen:
            examples = read_nq_open(chosen)
            break
        sq = re.compile(rf"^{re.escape(stem)}-v1\.1\.json(\.gz)?$")
        chosen = next((p for p in files if sq.match(p.name)), None)
        if chosen:
            examples = read_squad(chosen)
            break
    if chosen is None:
        want = ", ".join(f"*.{s}.jsonl or {s}-v1.1.json" for s in stems)
        raise BenchmarkError(f"{path}: no QA split {canon!r} (expected {want})")
    corpus_file = next((p for p in files if strip_compression(p.name) == "passages.jsonl"), None)
    corpus = read_passages(corpus_file) if corpus_file else None
    return examples, corpus, str(chosen)


def _is_pile_record(rec: Mapping[str, Any]) -> bool:
    meta = rec.get("meta")
    return isinstance(meta, Mapping) and isinstance(meta.get("pile_set_name"), str)


def _detect(path: Path) -> str:
    """Reader kind of a local path: wikitext, pile, text, nq_open, squad or qa (a QA directory)."""
    if path.is_dir():
        names = [p.name for p in path.iterdir()]
        if any(
            strip_compression(n) in WIKITEXT_FILES.values() or n.endswith(".parquet") for n in names
        ):
            return "wikitext"
        if any(re.search(r"(\.(dev|train|test)\.jsonl|-v1\.1\.json)", n) for n in names):
            return "qa"
        if any(re.match(r"^(train|val|valid|validation|test)(\.jsonl|\.json|$)", n) for n in names):
            return "pile"
        if text_files(path)[0]:
            return "text"
        raise BenchmarkError(
            f"{path}: cannot tell which benchmark this directory holds (no Wikitext, Pile or QA "
            "layout, and no .jsonl / .txt / .md evaluation text)"
        )
    name = strip_compression(path.name)
    if name.endswith((".raw", ".parquet", ".tokens")):
        return "wikitext"
    if name.endswith(".json"):
        return "squad"
    if name.endswith((".txt", ".md")):
        return "text"
    if name.endswith(".jsonl"):
        for _, rec in iter_jsonl(path):
            if "question" in rec:
                return "nq_open"
            if _is_pile_record(rec):
                return "pile"
            return "text"
        raise BenchmarkError(f"{path}: empty benchmark (no record)")
    raise BenchmarkError(
        f"{path}: unknown benchmark file type (expected .raw, .parquet, .jsonl[.zst], .json, "
        ".txt, .md)"
    )


def _from_local(
    name: str,
    path: Path,
    split: str | None,
    detokenize: bool,
    text_field: str = "text",
    subset_field: str | None = None,
) -> Benchmark:
    kind = _detect(path)
    own = text_field != "text" or subset_field is not None
    if own and kind == "pile" and path.is_file():
        kind = "text"  # the user named the fields: read the records as their own text
    canon = canonical_split(split or _DEFAULT_SPLIT.get(kind, "test"))
    if kind == "wikitext":
        docs = read_wikitext(path, canon, detokenize=detokenize)
        return Benchmark(name, canon, "lm", documents=docs, source=str(path))
    if kind == "text":
        docs = read_text_documents(path, text_field=text_field, subset_field=subset_field)
        return Benchmark(name, canon, "lm", documents=docs, source=str(path))
    if kind == "pile":
        files = pile_split_files(path, canon) if path.is_dir() else [path]
        if path.is_dir() and not files:
            names = " or ".join(f"{s}.jsonl[.zst]" for s in PILE_SPLIT_NAMES[canon])
            raise BenchmarkError(f"{path}: no split {canon!r} (expected {names})")
        first = next((rec for _, rec in iter_jsonl(files[0])), {})
        if own or not _is_pile_record(first):
            # A train/val/test folder of the user's own {"text"} records.
            docs = [
                d
                for f in files
                for d in read_text_documents(f, text_field=text_field, subset_field=subset_field)
            ]
            return Benchmark(name, canon, "lm", documents=docs, source=str(path))
        return Benchmark(name, canon, "lm", documents=read_pile(path, canon), source=str(path))
    if kind == "qa":
        examples, corpus, src = read_qa_dir(path, canon)
        return Benchmark(name, canon, "qa", examples=examples, corpus=corpus, source=src)
    reader = read_nq_open if kind == "nq_open" else read_squad
    return Benchmark(name, canon, "qa", examples=reader(path), source=str(path))


def _hf_builder(data_files: Any) -> str:
    files: list[str] = []
    if isinstance(data_files, Mapping):
        for v in data_files.values():
            files.extend([v] if isinstance(v, str | Path) else list(v))
    else:
        files.extend([data_files] if isinstance(data_files, str | Path) else list(data_files))
    exts = {strip_compression(str(f)).rsplit(".", 1)[-1] for f in files}
    if exts == {"parquet"}:
        return "parquet"
    if exts <= {"json", "jsonl"}:
        return "json"
    raise BenchmarkError(
        f"data_files: expected only .parquet or only .json/.jsonl files, got {sorted(exts)}"
    )


def _from_hub(
    name: str,
    spec: HubSpec,
    split: str | None,
    data_files: str | Sequence[str] | Mapping[str, Any] | None,
    detokenize: bool,
    cache_dir: str | Path | None = None,
) -> Benchmark:
    import datasets

    canon = canonical_split(split or _DEFAULT_SPLIT[spec.kind])
    if data_files is not None:
        builder, config = _hf_builder(data_files), None
        hf_split = canon if isinstance(data_files, Mapping) else "train"
        if isinstance(data_files, Mapping) and canon not in data_files:
            raise BenchmarkError(
                f"{name}: data_files has no split {canon!r} (has {sorted(data_files)})"
            )
        source = f"{builder}:{data_files}"
    else:
        if spec.path is None:
            raise BenchmarkError(
                f"{name}: no hub copy is maintained; pass a local directory or data_files="
            )
        if canon not in spec.splits:
            raise BenchmarkError(
                f"{name}: no split {canon!r} on the hub (has {', '.join(spec.splits)})"
            )
        builder, config, hf_split = spec.path, spec.config, canon
        source = f"hub:{spec.path}" + (f"/{spec.config}" if spec.config else "")
    try:
        ds = datasets.load_dataset(
            builder,
            config,
            data_files=data_files,
            split=hf_split,
            cache_dir=str(cache_dir) if cache_dir else None,
        )
    except Exception as exc:  # datasets raises many types (offline, not found, bad split)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise BenchmarkError(
            f"{name}: cannot load split {canon!r} from {source} ({type(exc).__name__}: {first[:200]}); "
            "offline? pass a local path or data_files="
        ) from None
    logger.info("%s: loaded %d rows from %s", name, len(ds), source)
    if spec.kind == "wikitext":
        if "text" not in ds.column_names:
            raise BenchmarkError(f"{name}: {source} has no column 'text' (has {ds.column_names})")
        docs = wikitext_documents(rows_to_lines(ds["text"]), detokenize=detokenize, source=source)
        bench = Benchmark(name, canon, "lm", documents=docs, source=source)
    elif spec.kind == "pile":
        bench = Benchmark(
            name, canon, "lm", documents=pile_documents(ds, prefix=f"{canon}:"), source=source
        )
    elif spec.kind == "nq_open":
        bench = Benchmark(
            name, canon, "qa", examples=nq_open_examples(ds, source=source), source=source
        )
    else:
        bench = Benchmark(
            name, canon, "qa", examples=squad_flat_examples(ds, source=source), source=source
        )
    return bench


def load_benchmark(
    name_or_path: str | Path,
    split: str | None = None,
    *,
    data_files: str | Sequence[str] | Mapping[str, Any] | None = None,
    detokenize: bool = True,
    cache_dir: str | Path | None = None,
    text_field: str = "text",
    subset_field: str | None = None,
) -> Benchmark:
    """Load a benchmark split by pack name, local path or usual hub name.

    Resolution order: a shipped pack (``wikitext-mini``, ``pile-mini``, ``squad-open-mini``); an existing
    local file or directory in the native format (Wikitext raw/Parquet, Pile JSONL[.zst], NQ-open JSONL,
    SQuAD v1.1 JSON) or a user's own text (``{"text"}`` JSONL, plain ``.txt`` / ``.md``, a folder of
    them) or flat QA JSONL (``answer`` as NQ-open or ``answers`` as SQuAD); a usual hub name (``wikitext-103`` / ``wikitext/wikitext-103-raw-v1``,
    ``wikitext-2``, ``nq_open``, ``squad``, ``pile``) through ``datasets.load_dataset``. With
    ``data_files`` the hub name picks the schema and the files (same schema, Parquet or JSON) are read
    by ``datasets`` instead of the hub.

    Args:
        name_or_path: pack name, path or hub name.
        split: ``train``, ``validation`` (``valid``, ``val``, ``dev``) or ``test``; None = the usual
            evaluation split (``test`` for LM benchmarks, ``validation`` for QA).
        data_files: local files for a hub name (a dict split -> files, or files for the one split).
        detokenize: Wikitext only: score detokenised articles (as lm-eval does).
        cache_dir: ``datasets`` cache directory for the hub / data_files path (default: its own).
        text_field, subset_field: a user's own evaluation text (``{"text"}`` JSONL, ``.txt`` /
            ``.md`` files or a folder of them; :func:`~retro_eval.benchmarks.text.read_text_documents`):
            the field holding the text and the optional field grouping documents in the report.

    Returns:
        A :class:`Benchmark` with ``documents`` (LM) or ``examples`` (+ ``corpus``) (QA).

    Raises:
        BenchmarkError: unknown name, missing split, wrong schema, unreachable hub or empty benchmark,
        as one line naming it.
    """
    from ..packs import PACKS, pack_path

    key = str(name_or_path)
    if key in PACKS and data_files is None:
        bench = _from_local(key, pack_path(key), split, detokenize)
    elif data_files is None and Path(key).exists():
        bench = _from_local(key, Path(key), split, detokenize, text_field, subset_field)
    elif key in HUB_BENCHMARKS:
        bench = _from_hub(key, HUB_BENCHMARKS[key], split, data_files, detokenize, cache_dir)
    else:
        known = sorted(set(PACKS) | {"wikitext-103", "wikitext-2", "nq_open", "squad", "pile"})
        raise BenchmarkError(
            f"{key}: not a pack, an existing path or a known benchmark ({', '.join(known)})"
        )
    if len(bench) == 0:
        raise BenchmarkError(f"{key}: empty benchmark (split {bench.split!r} has no documents)")
    return bench
