"""retro_eval: the evaluation harness for RETRO.

Wikitext-103, Pile and QA benchmarks, leakage-aware bits-per-byte bpb(alpha), lm-eval
integration and reports. Wires retro_core (the model) to retro_db (the database).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("retro-eval")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

from .benchmarks import Benchmark, BenchmarkError, Document, QAExample, load_benchmark
from .metrics import exact_match, f1, normalize_answer, squad_evaluate
from .overlap import ALPHAS, bucket_bpb, chunk_overlap_ratios, minhash_overlaps
from .packs import pack_path

__all__ = [
    "ALPHAS",
    "Benchmark",
    "BenchmarkError",
    "Document",
    "QAExample",
    "__version__",
    "bucket_bpb",
    "chunk_overlap_ratios",
    "exact_match",
    "f1",
    "load_benchmark",
    "minhash_overlaps",
    "normalize_answer",
    "pack_path",
    "squad_evaluate",
]
