"""lm-eval task YAMLs for the retro-eval packs, and a writer for tasks over user files.

Use ``TaskManager(include_path=retro_eval.tasks.TASKS_DIR)`` (or ``--include_path`` on the command
line; ``retro-eval lm-eval`` adds it for you).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["TASKS_DIR", "write_rolling_task"]

TASKS_DIR = Path(__file__).resolve().parent

_TEMPLATE = """\
# Written by retro_eval.tasks.write_rolling_task: a loglikelihood_rolling task over a local JSONL.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
process_results: !function retro_eval.tasks.utils.process_results
should_decontaminate: true
doc_to_decontamination_query: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def write_rolling_task(
    task: str,
    documents: Iterable[Any],
    out_dir: str | Path,
) -> Path:
    """Write ``<out_dir>/<task>.jsonl`` and ``<out_dir>/<task>.yaml`` (absolute data path).

    Args:
        task: the lm-eval task name (letters, digits, ``_``, ``-``).
        documents: ``retro_eval.benchmarks.Document`` objects (``doc_id``, ``text``, ``meta``; a
            ``meta["words"]`` count is used for word perplexity) or plain strings.
        out_dir: directory for both files (pass it as ``include_path`` to lm-eval's TaskManager).

    Returns:
        The YAML path.
    """
    from .utils import document_row

    if not task or not all(c.isalnum() or c in "_-" for c in task):
        raise ValueError(f"task name {task!r}: expected letters, digits, '_' or '-'")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows: Sequence[dict[str, Any]] = [
        document_row(str(i), d)
        if isinstance(d, str)
        else document_row(d.doc_id, d.text, getattr(d, "meta", None))
        for i, d in enumerate(documents)
    ]
    if not rows:
        raise ValueError(f"task {task}: no documents")
    data = out / f"{task}.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    yaml_path = out / f"{task}.yaml"
    yaml_path.write_text(
        _TEMPLATE.format(task=task, data_file=json.dumps(str(data))), encoding="utf-8"
    )
    return yaml_path
