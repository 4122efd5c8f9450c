"""Small real benchmark packs shipped inside the wheel (see PACKS.md beside this file).

- ``wikitext-mini``: Wikitext-103 raw format, ``wiki.{train,valid,test}.raw.gz``.
- ``pile-mini``: Pile format, ``{train,val,test}.jsonl.zst``.
- ``squad-open-mini``: SQuAD v1.1 dev as NQ-open JSONL (``squad-open.dev.jsonl.gz``), the official
  nested JSON (``dev-v1.1.json.gz``) and the passage corpus (``passages.jsonl.gz``).

Rebuild them with ``packages/retro-eval/scripts/build_packs.py``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["PACKS", "pack_path"]

_HERE = Path(__file__).resolve().parent

#: pack name -> reader kind.
PACKS = {"wikitext-mini": "wikitext", "pile-mini": "pile", "squad-open-mini": "qa"}


def pack_path(name: str) -> Path:
    """Directory of a shipped pack.

    Raises:
        ValueError: unknown pack name (lists the known ones), or the pack's files are missing.
    """
    if name not in PACKS:
        raise ValueError(f"unknown pack {name!r}: expected one of {', '.join(sorted(PACKS))}")
    path = _HERE / name
    if not path.is_dir():
        raise ValueError(f"pack {name!r} is not installed at {path} (run scripts/build_packs.py)")
    return path
