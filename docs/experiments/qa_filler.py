"""QA prompt filler (issue 13): what fills a question's first chunk before it, measured.

The question is aligned to end a chunk (paper section 4.3). Left-padding it with dozens of pad
tokens (SmolLM2's pad id is ``<|im_end|>``) makes the frozen base babble; the harness now fills
with the end of ``retro_eval.qa.FEW_SHOT``. This script answers the first N SQuAD-open-mini
questions with a demo run's model: ``pad`` mode compares no alignment, pad-token padding and two
other filler tokens (closed book); ``filler`` mode the few-shot filler closed book and with
retrieval (the query is the question alone, ``PromptQueries``).

    python docs/experiments/qa_filler.py pad 30      # after `retro-eval demo --run-dir runs/demo-ind`
    python docs/experiments/qa_filler.py filler 40
"""

import sys
from pathlib import Path

import torch

import retro_eval
from retro_core import load_model
from retro_core.generate import generate
from retro_db.database import Database
from retro_db.tokenizer import load_tokenizer
from retro_eval.benchmarks.load import read_qa_dir
from retro_eval.metrics import exact_match, f1_score
from retro_eval.qa import DEFAULT_TEMPLATE, FEW_SHOT, PromptQueries, align_prompt, format_prompt


def answer(model, tok, prompt, retriever, max_new=16):
    new = generate(model, prompt, retriever, max_new, eos_id=tok.eos_id, k=2)
    if tok.eos_id in new:
        new = new[: new.index(tok.eos_id)]
    return tok.decode(new).lstrip().split("\n", 1)[0].strip()


def score(preds, examples):
    em = [exact_match(p, e.answers) for p, e in zip(preds, examples, strict=True)]
    f1 = [max(f1_score(p, a) for a in e.answers) for p, e in zip(preds, examples, strict=True)]
    return 100 * sum(em) / len(em), 100 * sum(f1) / len(f1)


def main() -> None:
    torch.set_num_threads(2)
    mode, n, run = sys.argv[1], int(sys.argv[2]), Path("runs/demo-ind")
    model = load_model(run / "retro")
    tok = load_tokenizer(run / "tokenizer" / "smollm2-tokenizer")
    packs = Path(retro_eval.__file__).parent / "packs"
    examples = read_qa_dir(packs / "squad-open-mini", "validation")[0][:n]
    m, pad_id = 64, model.config.pad_id
    ids = [tok.encode(format_prompt(e.question, DEFAULT_TEMPLATE)) for e in examples]
    if mode == "pad":  # closed book: no alignment, then padding with pad / end-of-text / newline
        for pad in (None, pad_id, 0, 198):
            preds = [
                answer(model, tok, x if pad is None else align_prompt(x, m, pad), None, 24)
                for x in ids
            ]
            print("padding", pad, "EM {:.1f} F1 {:.1f}".format(*score(preds, examples)), preds[:4])
        return
    db, filler = Database.open(run / "db"), tok.encode(FEW_SHOT)
    for name, retriever in (("closed book", None), ("retrieval", db)):
        preds = []
        for x in ids:
            prompt = align_prompt(x, m, pad_id, filler=filler)
            queries = None
            if retriever is not None:
                queries = PromptQueries(retriever, m, pad_id)
                queries.register(prompt, len(prompt) - len(x))
            preds.append(answer(model, tok, prompt, queries))
        print(name, "EM {:.1f} F1 {:.1f}".format(*score(preds, examples)), preds[:4])


if __name__ == "__main__":
    main()
