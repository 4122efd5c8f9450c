"""retro_eval: the evaluation harness for RETRO.

Wikitext-103, Pile and QA benchmarks, leakage-aware bits-per-byte bpb(alpha), lm-eval
integration and reports. Wires retro_core (the model) to retro_db (the database).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("retro-eval")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
