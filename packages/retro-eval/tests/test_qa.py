"""QA: chunk-aligned prompts, greedy answers equal a hand decoding loop, EM/F1 plumbing;
RetroLM.generate_until with the same loop."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from retro_core.config import RetroConfig
from retro_core.model import Retro
from retro_eval.qa import (
    DEFAULT_TEMPLATE,
    FEW_SHOT,
    align_prompt,
    answer_questions,
    format_prompt,
)
from retro_eval.testing import ByteTokenizer, InMemoryRetriever

torch.set_num_threads(1)

M = 8
N = 48
DB = ["Paris is the capital of France.", "The Nile is a river in Africa, the longest."]


def tiny_model() -> Retro:
    torch.manual_seed(1)
    cfg = RetroConfig(
        vocab_size=258, d_model=32, n_heads=2, n_layers=3, chunk_size=M, enc_layers=1,
        max_seq_len=N, tokenizer_id=ByteTokenizer.id,
    )  # fmt: skip
    return Retro(cfg).eval()


def hand_greedy(model, prompt, retriever, k, max_new, eos, padding=0):
    """Reference decoding: full recomputation each step, retrieval for every complete chunk; the
    first chunk's query is its real tokens (the ``padding`` left-pad tokens moved to its end)."""
    seq = list(prompt)
    new = []
    with torch.no_grad():
        for _ in range(max_new):
            kwargs = {}
            full = len(seq) // M
            if retriever is not None and full:
                rows = [seq[u * M : (u + 1) * M] for u in range(full)]
                rows[0] = rows[0][padding:] + [0] * padding
                nb = retriever.retrieve(np.array(rows), k)
                kwargs = dict(
                    neighbours=torch.from_numpy(nb.tokens)[None],
                    neighbour_lengths=torch.from_numpy(nb.lengths)[None],
                )
            nxt = int(model(torch.tensor([seq]), **kwargs)[0, -1].argmax())
            seq.append(nxt)
            new.append(nxt)
            if nxt == eos:
                break
    return new


def test_align_prompt():
    assert align_prompt([5, 6, 7], 4, 0) == [0, 5, 6, 7]
    # a filler's last tokens take the padding's place; the pad id only where it runs out
    assert align_prompt([5, 6, 7], 4, 0, filler=[1, 2, 3]) == [3, 5, 6, 7]
    assert align_prompt([5], 4, 0, filler=[9, 8]) == [0, 9, 8, 5]
    assert align_prompt([5, 6, 7, 8], 4, 0, filler=[1, 2]) == [5, 6, 7, 8]
    assert align_prompt([5, 6, 7, 8], 4, 0) == [5, 6, 7, 8]
    assert align_prompt(list(range(1, 11)), 4, 0, max_len=9) == [3, 4, 5, 6, 7, 8, 9, 10]
    assert len(align_prompt(list(range(1, 100)), 8, 0)) % 8 == 0
    assert format_prompt("  who? ") == "question: who?\nanswer:"


@pytest.mark.parametrize("few_shot", [FEW_SHOT, None])
@pytest.mark.parametrize("closed_book", [False, True])
def test_answers_equal_hand_greedy_loop(closed_book, few_shot, monkeypatch):
    import retro_eval.qa as qa

    tok = ByteTokenizer()
    model = tiny_model()
    retriever = (
        None if closed_book else InMemoryRetriever([tok.encode(t) for t in DB], chunk_size=M)
    )
    questions = ["What is the capital of France?", "Which river is longest?"]
    max_new = 6
    budget = (N - max_new) // M * M
    refs = []
    for q in questions:
        ids = tok.encode(DEFAULT_TEMPLATE.format(question=q))
        filler = tok.encode(few_shot) if few_shot else None
        prompt = align_prompt(ids, M, 0, budget, filler)
        assert len(prompt) % M == 0
        pad = max(0, len(prompt) - len(ids))  # 0 when the prompt was cut to the budget
        if few_shot and pad:  # the few-shot text's end, not padding, precedes the question
            assert prompt[:pad] == filler[-pad:]
        new = hand_greedy(model, prompt, retriever, 2, max_new, tok.eos_id, pad)
        if tok.eos_id in new:
            new = new[: new.index(tok.eos_id)]
        refs.append(tok.decode(new).split("\n", 1)[0].strip())
    # Gold answers: the model's own answer for the first question, something else for the second.
    examples = [
        SimpleNamespace(id="a", question=questions[0], answers=[refs[0] or "x", "other"]),
        SimpleNamespace(id="b", question=questions[1], answers=["zzzz never"]),
    ]
    calls = []

    def fake_em_f1(pred, answers):
        calls.append((pred, answers))
        return float(pred in answers), 0.5

    monkeypatch.setattr(qa, "_em_f1", fake_em_f1)
    res = answer_questions(
        model,
        tok,
        examples,
        retriever=retriever,
        k=2,
        max_new_tokens=max_new,
        progress=False,
        few_shot=few_shot,
    )
    assert res.predictions == refs
    assert [c[0] for c in calls] == refs
    s = res.summary()
    assert s["questions"] == 2 and s["retrieval"] is (not closed_book)
    assert s["exact_match"] == pytest.approx(100.0 * sum(res.em) / 2)
    assert s["f1"] == pytest.approx(50.0)


def test_padded_prompt_chunk_is_queried_by_its_real_tokens():
    """The retriever never sees the left padding of a prompt as query text (measured: embedding it
    retrieved near-random passages), and sees every other chunk unchanged."""
    tok = ByteTokenizer()
    model = tiny_model()
    base = InMemoryRetriever([tok.encode(t) for t in DB], chunk_size=M)
    seen = []

    class Spy:
        chunk_size, tokenizer_id, pad_id = M, ByteTokenizer.id, 0

        def retrieve(self, chunks, k):
            seen.extend(np.asarray(chunks).tolist())
            return base.retrieve(chunks, k)

    q = "Nile?"
    ids = tok.encode(DEFAULT_TEMPLATE.format(question=q))
    prompt = align_prompt(ids, M, 0, (N - 2 * M) // M * M)
    pad = len(prompt) - len(ids)
    assert 0 < pad < M
    answer_questions(
        model, tok, [SimpleNamespace(id="a", question=q, answers=["Nile"])], retriever=Spy(),
        k=2, max_new_tokens=2 * M, progress=False,
    )  # fmt: skip
    chunks = [prompt[u * M : (u + 1) * M] for u in range(len(prompt) // M)]
    assert seen[0] == chunks[0][pad:] + [0] * pad  # the padded chunk: real tokens first
    assert seen[1 : len(chunks)] == chunks[1:]  # the other prompt chunks, as they are
    assert chunks[0] not in seen  # the padded chunk itself is never a query


def test_em_f1_come_from_squad_metrics():
    metrics = pytest.importorskip("retro_eval.metrics")
    import retro_eval.qa as qa

    em, f1 = qa._em_f1("The  Eiffel tower!", ["eiffel tower", "paris"])
    assert em == 1.0 and f1 == 1.0
    em, f1 = qa._em_f1("tower in paris", ["eiffel tower"])
    assert em == 0.0 and 0 < f1 < 1
    # the same numbers as retro_eval.metrics (SQuAD v1.1's official scoring), case by case
    cases = [
        ("The  Eiffel tower!", ["eiffel tower", "paris"]),
        ("tower in paris", ["eiffel tower"]),
        ("an apple a day", ["the apple", "a pear"]),
        ("", ["something"]),
    ]
    for pred, golds in cases:
        assert qa._em_f1(pred, golds) == (
            float(metrics.exact_match(pred, golds)),
            float(metrics.f1(pred, golds)),
        ), pred
    assert qa._em_f1("tower in paris", ["eiffel tower"])[1] == pytest.approx(0.4)


def test_empty_and_mismatched_inputs():
    tok = ByteTokenizer()
    model = tiny_model()
    with pytest.raises(ValueError, match="no questions"):
        answer_questions(model, tok, [], progress=False)
    bad = InMemoryRetriever([tok.encode(DB[0])], chunk_size=M, tokenizer_id="other")
    ex = [SimpleNamespace(id="a", question="q?", answers=["a"])]
    with pytest.raises(ValueError, match="tokenizer"):
        answer_questions(model, tok, ex, retriever=bad, progress=False)


def test_generate_until_equals_hand_loop():
    from retro_eval.lm import RetroLM

    tok = ByteTokenizer()
    model = tiny_model()
    retriever = InMemoryRetriever([tok.encode(t) for t in DB], chunk_size=M)
    lm = RetroLM(model=model, retriever=retriever, tokenizer=tok, k=2)
    ctx = "question: What is the capital of France?\nanswer:"
    (out,) = lm.generate_until([SimpleNamespace(args=(ctx, {"until": ["\n"], "max_gen_toks": 7}))])
    prompt = align_prompt(tok.encode(ctx), M, 0, (N - 7) // M * M)
    new = hand_greedy(model, prompt, retriever, 2, 7, tok.eos_id)
    text = tok.decode([t for t in new if t != tok.eos_id])
    assert out == text.split("\n")[0]
