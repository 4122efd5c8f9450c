"""QA diagnosis of the default demo run (issue 13): answers of the trained model with and without
retrieval on the first N SQuAD-open-mini questions, printed with the gold answers.

    python docs/experiments/qa_diagnosis.py 40   # after `retro-eval demo --run-dir runs/demo-ind`
"""
import json, sys, time, torch
torch.set_num_threads(1)
from retro_core import load_model
from retro_db.database import Database
from retro_db.tokenizer import load_tokenizer
from retro_eval.benchmarks import load_benchmark
from retro_eval.qa import answer_questions
run = "runs/demo-ind"
n = int(sys.argv[1])
model = load_model(f"{run}/retro")
db = Database.open(f"{run}/db")
tok = load_tokenizer(f"{run}/tokenizer/smollm2-tokenizer")
from retro_eval.benchmarks.load import read_qa_dir
from pathlib import Path
import retro_eval
exs, _, _ = read_qa_dir(Path(retro_eval.__file__).parent / "packs" / "squad-open-mini", "validation")
ex = exs[:n]
t = time.time()
on = answer_questions(model, tok, ex, retriever=db, k=2, progress=False)
off = answer_questions(model, tok, ex, retriever=None, progress=False)
print("ON", on.summary(), "OFF", off.summary(), round(time.time() - t))
for i in range(min(12, n)):
    print(repr(on.questions[i][:60]), "| ON:", repr(on.predictions[i]), "| OFF:", repr(off.predictions[i]), "| gold:", on.answers[i][:2])
