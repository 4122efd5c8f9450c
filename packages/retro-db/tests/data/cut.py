"""Re-cut the test fixtures of this folder from the project's raw text (see README.md here).

    python packages/retro-db/tests/data/cut.py --data DIR

DIR is the folder of the raw JSONL files described in README.md (``wikipedia/...``, ``books/...``).
The output is deterministic (gzip without a timestamp): a re-cut of the same input is byte-identical.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: fixture name -> (source file under --data, records, max characters of each text)
FIXTURES = {
    "wikipedia": ("wikipedia/gensim_enwiki_sample.jsonl", 48, 10000),
    "moby_dick": ("books/moby_dick.jsonl", 40, 10000),
}


def cut(src: Path, n: int, max_chars: int) -> bytes:
    lines = []
    with src.open(encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            rec["text"] = rec["text"][:max_chars]
            lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
            if len(lines) == n:
                break
    if len(lines) < n:
        raise SystemExit(f"{src}: {len(lines)} records, wanted {n}")
    return "".join(lines).encode("utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of the raw JSONL files")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    for name, (rel, n, max_chars) in FIXTURES.items():
        raw = cut(args.data / rel, n, max_chars)
        out = args.out / f"{name}.jsonl.gz"
        with open(out, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", filename="", mtime=0) as g:
            g.write(raw)
        print(f"{out}: {n} records, {len(raw):,} B raw, {out.stat().st_size:,} B gzip")


if __name__ == "__main__":
    main()
