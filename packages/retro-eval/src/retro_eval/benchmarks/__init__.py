"""Benchmark readers in their native formats (Wikitext-103, the Pile, NQ-open, SQuAD v1.1) and a
user's own evaluation text (``{"text"}`` JSONL, plain text files).

Every reader returns plain records (:class:`Document`, :class:`QAExample`); :func:`load_benchmark` picks
the reader for a pack name, a local path or a hub name.
"""

from .load import HUB_BENCHMARKS, load_benchmark, read_qa_dir
from .pile import group_by_subset, read_pile
from .qa import read_nq_open, read_passages, read_squad
from .text import read_text_documents
from .types import Benchmark, BenchmarkError, Document, QAExample, canonical_split
from .wikitext import read_wikitext, split_articles, wikitext_detokenize, wikitext_word_count

__all__ = [
    "HUB_BENCHMARKS",
    "Benchmark",
    "BenchmarkError",
    "Document",
    "QAExample",
    "canonical_split",
    "group_by_subset",
    "load_benchmark",
    "read_nq_open",
    "read_passages",
    "read_pile",
    "read_qa_dir",
    "read_squad",
    "read_text_documents",
    "read_wikitext",
    "split_articles",
    "wikitext_detokenize",
    "wikitext_word_count",
]
