import os
import sys
from pathlib import Path

# Nothing may load from a model or data hub at test time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The test helpers beside this file (dataset_writer.py: the reference writer of the dataset
# format) are importable by the test modules (pytest runs with --import-mode=importlib, which does
# not put this directory on sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parent))
