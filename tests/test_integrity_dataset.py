"""Cross-package fault injection (issue 16): a training dataset written by ``retro-db neighbours``
with random byte flips in every file is refused by retro_core, at open or by the sha256
verification ``retro-train`` runs, never used silently. (Database flips: retro-db's
test_integrity.py; crash safety: its test_resume.py.)

Synthetic documents (no data files), a hashing embedder, m=8.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retro_core.data import DatasetFormatError, RetroDataset, verify_dataset
from retro_db import Document, build_database, write_neighbours

WORDS = (
    "river stone light market winter garden paper engine silver window history music "
    "forest island letter bridge number circle morning harbour theory signal"
).split()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    docs = [
        Document(f"d{i}", " ".join(rng.choice(WORDS, size=int(rng.integers(30, 70)))))
        for i in range(10)
    ]
    root = tmp_path_factory.mktemp("integrity")
    db = build_database(docs, root / "db", embedder="hash:16", chunk_size=8, progress=False)
    out = root / "ds"
    write_neighbours(db, None, out, k=2, progress=False)
    return out


def _error(check) -> str | None:
    """The one-line error of ``check()`` (None: it passed)."""
    try:
        check()
    except DatasetFormatError as e:
        assert "\n" not in str(e), str(e)
        return str(e)
    return None


def test_random_byte_flips_in_every_dataset_file_are_all_detected(dataset: Path) -> None:
    files = sorted(p for p in dataset.iterdir() if p.is_file() and p.name != ".lock")
    assert len(files) == 8  # manifest.json and the 7 arrays
    pristine = {p: p.read_bytes() for p in files}
    assert _error(lambda: verify_dataset(dataset)) is None
    rng = np.random.default_rng(16)
    flips, at_open, at_verify, seen = 80, 0, 0, set()
    for _ in range(flips):
        p = files[int(rng.integers(len(files)))]
        offset = int(rng.integers(len(pristine[p])))
        raw = bytearray(pristine[p])
        raw[offset] ^= 1 << int(rng.integers(8))  # one bit
        p.write_bytes(bytes(raw))
        cheap = _error(lambda: RetroDataset(dataset, 2))
        err = cheap or _error(lambda: verify_dataset(dataset))
        assert err is not None, f"a flipped bit at {p.name}:{offset} went unnoticed"
        assert p.name in err, err
        at_open += cheap is not None
        at_verify += cheap is None
        seen.add(p.name)
        p.write_bytes(pristine[p])
    print(
        f"dataset bit flips: {flips} of {flips} detected ({at_open} at open, {at_verify} by verify)"
    )
    assert at_open + at_verify == flips and len(seen) == len(files)
    assert _error(lambda: verify_dataset(dataset)) is None
