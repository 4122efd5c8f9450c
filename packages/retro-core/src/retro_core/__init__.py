"""retro_core: the RETRO model (Borgeaud et al., 2021, arXiv:2112.04426) in PyTorch.

Owns the small contracts that the other packages satisfy (the ``Neighbours`` type and the
``Retriever`` protocol, and the training dataset format). Never imports faiss, datasketch or
retro_db.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("retro-core")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import RetroConfig
from .data import DatasetFormatError, RetroDataset
from .generate import generate
from .interface import Geometry, KVCache, RetrievalLM
from .loading import load_model
from .model import Retro
from .retrofit import RetrofittedLM, load_retrofitted, save_retrofitted  # retrofit(): the module's
from .train import TrainConfig, train  # retro_core.train is the function (issue 3)

__all__ = [
    "__version__",
    "RetroConfig",
    "Retro",
    "KVCache",
    "RetrievalLM",
    "Geometry",
    "generate",
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
    "CheckpointError",
    "DatasetFormatError",
    "RetroDataset",
    "TrainConfig",
    "train",
    "RetrofittedLM",
    "save_retrofitted",
    "load_retrofitted",
]
