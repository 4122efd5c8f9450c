"""QA diagnosis of the default demo run (issue 13): the trained model's answers with and without
retrieval on the first N SQuAD-open-mini questions, printed beside the gold answers.

    python docs/experiments/qa_diagnosis.py 40   # after `retro-eval demo --run-dir runs/demo-ind`
"""

import sys
import time
from pathlib import Path

import torch

import retro_eval
from retro_core import load_model
from retro_db.database import Database
from retro_db.tokenizer import load_tokenizer
from retro_eval.benchmarks.load import read_qa_dir
from retro_eval.qa import answer_questions


def main() -> None:
    torch.set_num_threads(1)
    run, n = "runs/demo-ind", int(sys.argv[1])
    model = load_model(f"{run}/retro")
    db = Database.open(f"{run}/db")
    tok = load_tokenizer(f"{run}/tokenizer/smollm2-tokenizer")
    packs = Path(retro_eval.__file__).parent / "packs"
    examples = read_qa_dir(packs / "squad-open-mini", "validation")[0][:n]
    t = time.time()
    on = answer_questions(model, tok, examples, retriever=db, k=2, progress=False)
    off = answer_questions(model, tok, examples, retriever=None, progress=False)
    print("ON", on.summary(), "OFF", off.summary(), round(time.time() - t))
    for i in range(min(12, n)):
        print(
            repr(on.questions[i][:60]),
            "| ON:",
            repr(on.predictions[i]),
            "| OFF:",
            repr(off.predictions[i]),
            "| gold:",
            on.answers[i][:2],
        )


if __name__ == "__main__":
    main()
