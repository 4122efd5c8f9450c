"""Functions the retro-eval lm-eval task YAMLs refer to (``!function utils.<name>`` or, from a YAML
written elsewhere, ``!function retro_eval.tasks.utils.<name>``)."""

from __future__ import annotations

import re
from typing import Any

_WS = re.compile(r"\s+")


def load_documents(
    benchmark: str | None = None,
    split: str = "test",
    subset: str | None = None,
    text_field: str = "text",
    subset_field: str | None = None,
    **_: Any,
) -> Any:
    """``custom_dataset`` for a loglikelihood_rolling task: a retro-eval benchmark as a DatasetDict.

    Args:
        benchmark: a pack name (``wikitext-mini``, ``pile-mini``) or a path in a native format
            (read by ``retro_eval.benchmarks.load_benchmark``).
        split: the split to read (``train``, ``validation``/``valid``, ``test``).
        subset: keep only the documents of this subset (the Pile's ``pile_set_name``, or the
            value of ``subset_field`` in a user's own ``{"text"}`` JSONL).
        text_field, subset_field: a user's own JSONL: the text's field and the grouping field.

    Returns:
        ``datasets.DatasetDict`` with that one split; rows ``{"doc_id", "text", "words", "subset"}``.
    """
    import datasets

    from retro_eval.benchmarks import load_benchmark
    from retro_eval.benchmarks.types import BenchmarkError

    if not benchmark:
        raise BenchmarkError("task dataset_kwargs.benchmark: expected a pack name or a path")
    bench = load_benchmark(benchmark, split, text_field=text_field, subset_field=subset_field)
    docs = bench.documents
    if subset:
        docs = [d for d in docs if _subset(d.meta) == subset]
        if not docs:
            raise BenchmarkError(
                f"{benchmark}: subset {subset!r} has no documents in split {split!r}"
            )
    rows = [document_row(d.doc_id, d.text, d.meta) for d in docs]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def document_row(doc_id: str, text: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """One task row: the text scored, its word count (``meta["words"]`` when the reader gives one,
    e.g. Wikitext's raw-page count; else lm-eval's count on the text) and its subset."""
    meta = meta or {}
    words = meta.get("words")
    return {
        "doc_id": str(doc_id),
        "text": text,
        "words": int(words) if words is not None else len(_WS.split(text)),
        "subset": _subset(meta),
    }


def _subset(meta: dict[str, Any]) -> str:
    return str(meta.get("subset", meta.get("pile_set_name", "")))


def process_results(doc: dict[str, Any], results: list[float]) -> dict[str, Any]:
    """Rolling-loglikelihood metrics with the row's own word count (UTF-8 bytes of the text)."""
    (loglikelihood,) = results
    words = int(doc["words"]) if doc.get("words") is not None else len(_WS.split(doc["text"]))
    nbytes = len(doc["text"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, nbytes),
        "bits_per_byte": (loglikelihood, nbytes),
    }
