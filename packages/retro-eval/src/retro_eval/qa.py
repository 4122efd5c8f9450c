"""Open-domain QA with RETRO: the question retrieves passages, the model answers greedily.

As in the paper (section 4.3), the prompt is placed so that it *ends a chunk*: it is left-filled to
a multiple of m, so the last chunk (holding the end of the question) retrieves neighbours from the
database, and those neighbours condition every answer token (CCA's causal shift). The filler is the
end of a fixed few-shot text (:data:`FEW_SHOT`: three general-knowledge question/answer pairs in
the template's format, none from a benchmark), then the pad id where that runs out: a pretrained
base fed dozens of pad tokens before the question babbles (SmolLM2-135M closed book: F1 0 % on 30
squad-open-mini questions after pad tokens, 5.3 % on 40 after the few-shot filler;
``docs/experiments/qa_filler.py``), and the pairs show the answer format. The filler never reaches retrieval: the query is the question alone
(:class:`PromptQueries`). Generation is ``retro_core.generate.generate`` (greedy, KV-cached, retrieving each time a
chunk completes). Answers are scored with SQuAD's normalisation (``retro_eval.metrics``): exact match
and token F1, maximised over the gold answers. The closed-book row is the same model with no
retriever (RETRO[OFF]).

The query of a left-padded chunk is its real tokens only (:class:`PromptQueries`): embedding the
padding as well retrieved near-random passages (measured on squad-open-mini, 200 questions,
all-MiniLM-L6-v2: answer in the top 10 for 7.0 % of questions with the padding, 97.5 % without).

Retrieval recall (:func:`answer_hit_ranks`, :func:`recall_at`): for each question, the chunk that
ends its aligned prompt (the query whose neighbours condition the answer) retrieves its top 10
neighbours (chunk + continuation, as the model reads them); a question is a hit at k when a gold
answer, normalised as exact match normalises it (lower case, no punctuation, no articles, single
spaces), appears as whole words in the normalised text of one of its first k neighbours.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from retro_core.interface import RetrievalLM

from .perplexity import check_retriever_for, has_retrieval, model_geometry

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TEMPLATE",
    "FEW_SHOT",
    "RECALL_KS",
    "PromptQueries",
    "QAResult",
    "align_prompt",
    "answer_hit_ranks",
    "answer_questions",
    "format_prompt",
    "recall_at",
]

#: top-k cut-offs of the retrieval recall reported beside EM / F1.
RECALL_KS = (1, 2, 10)

DEFAULT_TEMPLATE = "question: {question}\nanswer:"

#: The few-shot text whose end fills a question's first chunk (see the module docstring): three
#: general-knowledge pairs in DEFAULT_TEMPLATE's format, not from any benchmark of the suite.
FEW_SHOT = (
    "question: who wrote the play romeo and juliet?\nanswer: William Shakespeare\n\n"
    "question: what is the capital city of japan?\nanswer: Tokyo\n\n"
    "question: in which year did apollo 11 land on the moon?\nanswer: 1969\n\n"
)


def align_prompt(
    ids: Sequence[int],
    chunk_size: int,
    pad_id: int,
    max_len: int | None = None,
    filler: Sequence[int] | None = None,
) -> list[int]:
    """Left-fill (and, past ``max_len``, left-truncate) a prompt so its length is a multiple of m.

    Args:
        ids: prompt token ids.
        chunk_size: m.
        pad_id: the padding token.
        max_len: most tokens kept (rounded down to a multiple of m), or None.
        filler: token ids whose last ``(-len) mod m`` fill the left instead of padding (the pad
            id before them where the filler is shorter), or None (padding only).

    Returns:
        ``fill + ids`` with ``len(fill) = (-len) mod m`` (a whole number of chunks, the prompt
        ending the last one).
    """
    ids = list(map(int, ids))
    m = int(chunk_size)
    if max_len is not None:
        keep = max(m, int(max_len) // m * m)
        ids = ids[-keep:]
    need = -len(ids) % m
    tail = [int(t) for t in filler][-need:] if filler and need else []
    return [int(pad_id)] * (need - len(tail)) + tail + ids


class PromptQueries:
    """A retriever that queries with a left-padded prompt chunk's real tokens only.

    :func:`align_prompt` left-pads a prompt so that it ends a chunk; sent as it is, its first
    chunk's query would embed the padding too (a retro_db database drops only *trailing* padding)
    and retrieve for "<pad> <pad> ... question". Each prompt registered with :meth:`register` has its
    padded first chunk replaced, in queries only, by its real tokens followed by the retriever's
    padding; every other query (generated chunks, documents) passes through unchanged. The model
    still reads the neighbours at the same chunk.
    """

    def __init__(self, retriever: Any, chunk_size: int, pad_id: int) -> None:
        self.base = retriever
        self.m = int(chunk_size)
        self.model_pad = int(pad_id)
        self.query_pad = int(getattr(retriever, "pad_id", pad_id))
        self._queries: dict[tuple[int, ...], list[int]] = {}

    @property
    def chunk_size(self) -> int:
        return int(self.base.chunk_size)

    @property
    def tokenizer_id(self) -> str:
        return str(self.base.tokenizer_id)

    @property
    def pad_id(self) -> int:
        return self.query_pad

    def register(self, prompt: Sequence[int], padding: int) -> None:
        """A prompt from :func:`align_prompt` whose first ``padding`` tokens are padding."""
        if padding <= 0:
            return
        first = [int(t) for t in prompt[: self.m]]
        real = first[padding:]
        self._queries[tuple(first)] = real + [self.query_pad] * (self.m - len(real))

    def query(self, chunks: Any) -> Any:
        """The query rows sent to the base retriever (registered padded chunks replaced)."""
        import numpy as np

        rows = np.array(chunks, dtype=np.int64, copy=True)
        for i, row in enumerate(rows):
            real = self._queries.get(tuple(int(t) for t in row))
            if real is not None:
                rows[i] = real
        return rows

    def retrieve(self, chunks: Any, k: int, exclude_doc_ids: Any = None) -> Any:
        """``base.retrieve`` of :meth:`query` rows."""
        if exclude_doc_ids is None:
            return self.base.retrieve(self.query(chunks), k)
        return self.base.retrieve(self.query(chunks), k, exclude_doc_ids)


def format_prompt(question: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The prompt text of a question (``template`` has a ``{question}`` field)."""
    return template.format(question=question.strip())


def _em_f1(prediction: str, answers: Sequence[str]) -> tuple[float, float]:
    from . import metrics

    return (
        float(metrics.exact_match(prediction, list(answers))),
        float(metrics.f1(prediction, list(answers))),
    )


@dataclass
class QAResult:
    """Per-question predictions and scores; ``em`` and ``f1`` are in [0, 1]."""

    ids: list[str] = field(default_factory=list)
    questions: list[str] = field(default_factory=list)
    predictions: list[str] = field(default_factory=list)
    answers: list[list[str]] = field(default_factory=list)
    em: list[float] = field(default_factory=list)
    f1: list[float] = field(default_factory=list)
    retrieval: bool = False
    k: int | None = None

    def summary(self) -> dict[str, Any]:
        n = len(self.em)
        return {
            "exact_match": 100.0 * sum(self.em) / n if n else float("nan"),
            "f1": 100.0 * sum(self.f1) / n if n else float("nan"),
            "questions": n,
            "retrieval": self.retrieval,
            "k": self.k,
        }


def answer_questions(
    model: RetrievalLM,
    tokenizer: Any,
    examples: Sequence[Any],
    *,
    retriever: Any = None,
    k: int | None = None,
    max_new_tokens: int = 24,
    template: str = DEFAULT_TEMPLATE,
    progress: bool = True,
    few_shot: str | None = FEW_SHOT,
) -> QAResult:
    """Answer each question greedily and score it (EM / F1 against every gold answer).

    Args:
        model: ``retro_core.model.Retro``.
        tokenizer: LM tokenizer (``encode``, ``decode``, ``eos_id``).
        examples: QA examples with ``id``, ``question``, ``answers`` (``retro_eval.benchmarks``).
        retriever: the passage database (a Retriever); None = closed book (RETRO[OFF]).
        k: neighbours per chunk (default the model's).
        max_new_tokens: answer length limit; the answer is the generated text up to its first newline.
        template: prompt template with ``{question}``.
        few_shot: text whose end fills the question's first chunk (:func:`align_prompt`), or None
            for the pad id.

    Returns:
        QAResult (EM and F1 per question; ``summary()`` gives percentages).
    """
    from retro_core.generate import generate

    if not examples:
        raise ValueError("QA benchmark has no questions")
    if retriever is not None:
        if not has_retrieval(model):
            raise ValueError("the model has no CCA layers (a decoder-only baseline): no retriever")
        check_retriever_for(model, retriever)
    n, m, _, pad_id = model_geometry(model)
    kk = int(k) if k else int(model.config.num_neighbours)
    max_new = max(1, min(int(max_new_tokens), n - m))
    budget = (n - max_new) // m * m
    eos = getattr(tokenizer, "eos_id", None)
    out = QAResult(retrieval=retriever is not None, k=kk if retriever is not None else None)
    queries = PromptQueries(retriever, m, pad_id) if retriever is not None else None
    filler = tokenizer.encode(few_shot) if few_shot else None
    model.eval()
    for ex in tqdm(examples, desc="qa", disable=not progress, unit="q"):
        ids = tokenizer.encode(format_prompt(ex.question, template))
        prompt = align_prompt(ids, m, pad_id, budget, filler)
        if queries is not None:
            queries.register(prompt, len(prompt) - min(len(ids), len(prompt)))
        new = generate(model, prompt, queries, max_new, k=kk, eos_id=eos)
        if eos is not None and eos in new:
            new = new[: new.index(eos)]
        text = tokenizer.decode(new).lstrip().split("\n", 1)[0].strip()  # the first line of text
        em, f1 = _em_f1(text, ex.answers)
        out.ids.append(str(ex.id))
        out.questions.append(ex.question)
        out.predictions.append(text)
        out.answers.append(list(ex.answers))
        out.em.append(em)
        out.f1.append(f1)
    logger.info(
        "QA (%s): %s", "RETRO[ON]" if retriever is not None else "closed book", out.summary()
    )
    return out


def answer_hit_ranks(
    model: RetrievalLM,
    tokenizer: Any,
    examples: Sequence[Any],
    retriever: Any,
    *,
    depth: int = max(RECALL_KS),
    template: str = DEFAULT_TEMPLATE,
    max_new_tokens: int = 24,
) -> list[int]:
    """Rank (0-based) of the first retrieved neighbour holding a gold answer, per question; -1 when
    none of the first ``depth`` does.

    The query is the last chunk of the prompt :func:`answer_questions` gives the model (same
    template, alignment and length budget), so the neighbours are those its answer is conditioned
    on (``depth`` of them instead of k). Answers and neighbour text are compared after
    ``metrics.normalize_answer``, as whole words.
    """
    from .metrics import normalize_answer

    check_retriever_for(model, retriever)
    n, m, _, pad_id = model_geometry(model)
    max_new = max(1, min(int(max_new_tokens), n - m))
    budget = (n - max_new) // m * m
    adapter = PromptQueries(retriever, m, pad_id)
    queries = []
    for ex in examples:
        ids = tokenizer.encode(format_prompt(ex.question, template))
        prompt = align_prompt(ids, m, pad_id, budget)
        adapter.register(prompt, len(prompt) - min(len(ids), len(prompt)))
        queries.append(prompt[-m:])  # the chunk whose neighbours condition the answer
    if not queries:
        return []
    import numpy as np

    nb = adapter.retrieve(np.asarray(queries, dtype=np.int64), int(depth))
    toks, lens = np.asarray(nb.tokens), np.asarray(nb.lengths)
    ranks = []
    for i, ex in enumerate(examples):
        golds = [g for g in (normalize_answer(a) for a in ex.answers) if g]
        rank = -1
        for j in range(min(int(depth), toks.shape[1])):
            text = " " + normalize_answer(tokenizer.decode(toks[i, j, : lens[i, j]].tolist())) + " "
            if any(f" {g} " in text for g in golds):
                rank = j
                break
        ranks.append(rank)
    return ranks


def recall_at(ranks: Sequence[int], ks: Sequence[int] = RECALL_KS) -> dict[str, Any]:
    """Retrieval recall from :func:`answer_hit_ranks`: ``{"top1": %, "top2": %, "top10": %,
    "questions": n}`` (percent of questions with a hit among the first k neighbours)."""
    n = len(ranks)
    out: dict[str, Any] = {
        f"top{k}": (100.0 * sum(1 for r in ranks if 0 <= r < k) / n if n else float("nan"))
        for k in ks
    }
    out["questions"] = n
    return out
