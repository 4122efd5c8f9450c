"""RETRO as an lm-eval model: ``RetroLM``, registered as ``retro``.

lm-eval 0.4.13 does not discover plugin models through entry points: importing this module runs
``@register_model("retro")``. ``retro-eval lm-eval ...`` imports it and then runs lm-eval's own
command line; from Python, pass ``model=RetroLM(...)`` to ``lm_eval.simple_evaluate``.

Model args (``--model_args``): ``checkpoint`` (a retro_core checkpoint directory), ``database``
(a retro_db database directory), ``k`` (neighbours per chunk; default the model's), ``retrieval``
(on/off/shuffled; off = RETRO[OFF]; shuffled = the control RETRO[shuffled], below), ``shuffle_seed``
(default 0), ``batch_size``, ``max_length`` (window n; default the model's max_seq_len), ``stride``
(default n/2), ``tokenizer`` (a tokenizer directory; default the database's tokenizer, else GPT-2).

The comparison methods of issue 17 (``loglikelihood_rolling`` only, i.e. the perplexity tasks; the
model reads no neighbours through CCA, so a decoder-only baseline or a retro-fitted model's frozen
base): ``retrieval=incontext`` (:mod:`retro_eval.incontext`: the nearest neighbour of the previous
chunk prepended at each chunk boundary) and ``retrieval=knnlm`` (:mod:`retro_eval.knnlm`, a
datastore over the database's text built on first use; ``knn_lambda`` default 0.25, ``knn_k``
default 1024, ``knn_max_tokens`` default all of the database's text). Both need ``database``.

``retrieval=shuffled``: every chunk gets the neighbours retrieved for another chunk of the same
request list (lm-eval hands a model all requests of a kind at once), paired by a seeded derangement
(``retro_eval.perplexity.shuffled_slots``) that also avoids the chunk's own document (rolling) or
request (loglikelihood, generation) where the sizes allow. In ``loglikelihood_rolling`` this is
exactly ``retro-eval run``'s RETRO[shuffled] (:func:`retro_eval.perplexity.shuffle_document_neighbours`);
in ``loglikelihood`` the distinct complete chunks of all inputs are paired; in ``generate_until`` the
prompts' chunks are paired and a chunk completed during generation takes a seeded random prompt
chunk's neighbours. A request list with a single distinct chunk is refused (ValueError: there is no
other chunk to take neighbours from).

Retrieval happens at chunk boundaries: a scored sequence is cut into chunks of m tokens from its
first token, and chunk u's neighbours condition the tokens after it (the causal shift in the model).
``loglikelihood_rolling`` is :func:`retro_eval.perplexity.score_token_documents`, so lm-eval's
word_perplexity / bits_per_byte on a document agree with retro-eval's own scorer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from retro_core.interface import RetrievalLM
from retro_core.retrieval import Neighbours

from .perplexity import (
    check_retriever_for,
    has_retrieval,
    model_device,
    model_geometry,
    retrieve_document_neighbours,
    score_token_documents,
    shuffle_document_neighbours,
    shuffled_slots,
)

logger = logging.getLogger(__name__)

__all__ = ["RetroLM", "parse_bool", "parse_retrieval"]


def parse_bool(value: Any, name: str = "retrieval") -> bool:
    """Parse an lm-eval model-arg boolean (``true/false``, ``on/off``, ``1/0``, ``yes/no``).

    Args:
        value: the argument's value (a bool, or a string as lm-eval passes it).
        name: the argument's name, for the error message.

    Raises:
        ValueError: ``"<name>=<value>: expected on/off (true/false)"``.
    """
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in {"1", "true", "on", "yes", "y"}:
        return True
    if s in {"0", "false", "off", "no", "n", "none"}:
        return False
    raise ValueError(f"{name}={value!r}: expected on/off (true/false)")


#: retrieval modes whose model reads no neighbours through CCA (rolling loglikelihood only)
METHOD_MODES = ("incontext", "knnlm")


def parse_retrieval(value: Any) -> str:
    """Parse the ``retrieval`` model arg: ``"on"``, ``"off"``, ``"shuffled"``, ``"incontext"`` or
    ``"knnlm"`` (booleans as on/off)."""
    if isinstance(value, str) and value.strip().lower() in {"shuffled", "shuffle"}:
        return "shuffled"
    if isinstance(value, str) and value.strip().lower() in METHOD_MODES:
        return value.strip().lower()
    try:
        return "on" if parse_bool(value) else "off"
    except ValueError:
        raise ValueError(
            f"retrieval={value!r}: expected on, off or shuffled (or incontext, knnlm)"
        ) from None


class _ShuffledNeighbours:
    """``retrieval=shuffled`` for loglikelihood and generation: each distinct chunk is paired with a
    donor chunk (a seeded derangement over the chunks given to :meth:`prepare`) and gets the
    neighbours retrieved for the donor. A Retriever itself (for ``retro_core.generate``)."""

    def __init__(self, retriever: Any, k: int, seed: int) -> None:
        self.base, self.k, self.seed = retriever, int(k), int(seed)
        self.pad_id = int(getattr(retriever, "pad_id", 0))
        self.cache: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.donor: dict[tuple[int, ...], tuple[int, ...]] = {}
        self.pool: list[tuple[int, ...]] = []
        self.rng = np.random.default_rng(self.seed)

    @property
    def chunk_size(self) -> int:
        return int(self.base.chunk_size)

    @property
    def tokenizer_id(self) -> str:
        return self.base.tokenizer_id

    def prepare(self, chunk_lists: Sequence[Sequence[tuple[int, ...]]]) -> None:
        """Retrieve the neighbours of every chunk (keys: m token ids) and pair the distinct chunks.

        ``chunk_lists[g]`` holds the complete chunks of request g; a chunk is grouped with the first
        request that holds it.

        Raises:
            ValueError: exactly one distinct chunk (no other chunk to take neighbours from).
        """
        keys: list[tuple[int, ...]] = []
        groups: list[int] = []
        seen: set[tuple[int, ...]] = set()
        for g, chunks in enumerate(chunk_lists):
            for key in chunks:
                if key not in seen:
                    seen.add(key)
                    keys.append(key)
                    groups.append(g)
        self.pool, self.donor = keys, {}
        if not keys:
            return
        src = shuffled_slots(np.asarray(groups, dtype=np.int64), seed=self.seed)
        missing = [key for key in keys if key not in self.cache]
        if missing:
            nb = self.base.retrieve(np.array(missing, dtype=np.int64), self.k)
            for j, key in enumerate(missing):
                self.cache[key] = (
                    np.asarray(nb.tokens[j], dtype=np.int64),
                    np.asarray(nb.lengths[j], dtype=np.int64),
                    np.asarray(nb.chunk_ids[j], dtype=np.int64),
                )
        self.donor = {key: keys[int(src[i])] for i, key in enumerate(keys)}

    def lookup(self, key: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Neighbours (tokens [k, r], lengths [k], chunk ids [k]) of the chunk's donor; a chunk not
        seen by :meth:`prepare` gets a seeded random other chunk of the pool as its donor."""
        donor = self.donor.get(key)
        if donor is None:
            others = len(self.pool) - (1 if key in self.cache else 0)
            if others < 1:
                raise ValueError(
                    "retrieval=shuffled: no other chunk to take neighbours from (the requests hold "
                    "a single distinct chunk)"
                )
            while donor is None or donor == key:
                donor = self.pool[int(self.rng.integers(len(self.pool)))]
            self.donor[key] = donor
        return self.cache[donor]

    def retrieve(
        self, chunks: np.ndarray, k: int, exclude_doc_ids: np.ndarray | None = None
    ) -> Neighbours:
        """The donors' neighbours of query chunks [q, m] -> Neighbours [q, k, r]."""
        if int(k) > self.k:
            raise ValueError(f"retrieval=shuffled: k={k} but {self.k} neighbours were retrieved")
        rows = [self.lookup(tuple(int(t) for t in c)) for c in np.asarray(chunks)]
        return Neighbours(
            np.stack([t[:k] for t, _, _ in rows]),
            np.stack([ln[:k] for _, ln, _ in rows]),
            np.stack([i[:k] for _, _, i in rows]),
            None,
            self.pad_id,
        )


def _int_or_none(value: Any, name: str) -> int | None:
    if value is None or value == "" or str(value).lower() in {"none", "auto"}:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: expected an integer") from None


@register_model("retro")
class RetroLM(LM):
    """A retro_core RETRO model (or decoder-only baseline) with an optional retro_db database.

    Args:
        checkpoint: a training run directory (its latest checkpoint, logged), a checkpoint directory
            or a retro-fitted checkpoint (``retro_core.loading.load_model``), or None when
            ``model`` is given.
        database: database directory (``retro_db.Database.open``), or None when ``retriever`` is
            given or for RETRO[OFF].
        k: neighbours per chunk (default the model's ``num_neighbours``).
        retrieval: on/off/shuffled (False = "off" = RETRO[OFF], the model sees no neighbours;
            "shuffled" = each chunk gets the neighbours of another chunk, see the module docstring).
        shuffle_seed: seeds the shuffled pairing.
        knn_lambda, knn_k, knn_max_tokens: ``retrieval=knnlm``'s interpolation weight, neighbours
            and datastore cap (see the module docstring).
        batch_size: windows per forward pass.
        max_length: window n (default the model's max_seq_len); stride: s (default n/2).
        tokenizer: tokenizer directory / object (default the database's tokenizer, else GPT-2).
        model, retriever: objects instead of paths (Python use and tests).
        device: torch device for the model.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        database: str | None = None,
        k: int | str | None = None,
        retrieval: bool | str = True,
        batch_size: int | str | None = 1,
        max_length: int | str | None = None,
        stride: int | str | None = None,
        tokenizer: Any = None,
        device: str | None = None,
        shuffle_seed: int | str = 0,
        knn_lambda: float | str = 0.25,
        knn_k: int | str = 1024,
        knn_max_tokens: int | str | None = None,
        *,
        model: RetrievalLM | None = None,
        retriever: Any = None,
        progress: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        for key in kwargs:
            if key not in {"max_batch_size", "trust_remote_code", "dtype"}:
                logger.warning("RetroLM: ignoring unknown model arg %s=%r", key, kwargs[key])
        if model is None:
            if not checkpoint:
                raise ValueError(
                    "RetroLM: model arg 'checkpoint' (a checkpoint directory) is required"
                )
            from .checkpoints import load_eval_model

            model = load_eval_model(str(checkpoint))
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            logger.warning("RetroLM: device=%s but CUDA is not available: using the CPU", device)
            device = "cpu"
        if device:
            model = model.to(device)
        self.model = model.eval()
        self.retrieval_mode = parse_retrieval(retrieval)
        self.retrieval = self.retrieval_mode != "off"
        self.shuffle_seed = _int_or_none(shuffle_seed, "shuffle_seed") or 0
        if self.retrieval and retriever is None and database:
            from retro_db.database import Database

            retriever = Database.open(str(database))
        if self.retrieval_mode in METHOD_MODES and retriever is None:
            raise ValueError(f"RetroLM: retrieval={self.retrieval_mode} needs a database")
        if self.retrieval and retriever is not None:
            if self.retrieval_mode not in METHOD_MODES and not has_retrieval(self.model):
                raise ValueError("RetroLM: the checkpoint has no CCA layers: use retrieval=off")
            check_retriever_for(self.model, retriever)
        self.retriever = retriever if self.retrieval else None
        if self.retrieval and self.retriever is None and has_retrieval(self.model):
            if self.retrieval_mode == "shuffled":
                raise ValueError("RetroLM: retrieval=shuffled needs a database")
            logger.warning("RetroLM: no database given: evaluating RETRO[OFF]")
        self.tokenizer = self._resolve_tokenizer(tokenizer, retriever)
        want, have = self.model.config.tokenizer_id, getattr(self.tokenizer, "id", None)
        if want and have and want != have:
            raise ValueError(
                f"RetroLM: tokenizer {have!r} but the checkpoint was trained with {want!r}: "
                "pass model arg tokenizer=<its directory>"
            )
        n, m, r, pad = model_geometry(self.model)
        self.n, self.m, self.r, self.pad_id = n, m, r, pad
        self.k = _int_or_none(k, "k") or int(self.model.config.num_neighbours)
        self.max_length = _int_or_none(max_length, "max_length") or n
        self.stride = _int_or_none(stride, "stride")
        self.batch_size = _int_or_none(batch_size, "batch_size") or 1
        self.progress = progress
        try:
            self.knn_lambda = float(knn_lambda)
        except (TypeError, ValueError):
            raise ValueError(f"knn_lambda={knn_lambda!r}: expected a number in [0, 1]") from None
        if not 0.0 <= self.knn_lambda <= 1.0:
            raise ValueError(f"knn_lambda={knn_lambda!r}: expected a number in [0, 1]")
        self.knn_k = _int_or_none(knn_k, "knn_k") or 1024
        self.knn_max_tokens = _int_or_none(knn_max_tokens, "knn_max_tokens")
        self._datastore: Any = None
        self._nb_cache: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}
        # Generation queries a left-padded prompt chunk with its real tokens (qa.PromptQueries).
        self._queries = None
        if self.retriever is not None:
            from .qa import PromptQueries

            self._queries = PromptQueries(self.retriever, m, pad)
        self._shuffled = (
            _ShuffledNeighbours(self._queries, self.k, self.shuffle_seed)
            if self.retrieval_mode == "shuffled" and self.retriever is not None
            else None
        )

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
    ) -> RetroLM:
        """As lm-eval's, but ``--model_args`` win over the CLI's ``--batch_size``/``--device``
        (lm-eval would pass both and fail with "multiple values")."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict[str, Any] | None = None
    ) -> RetroLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @staticmethod
    def _resolve_tokenizer(tokenizer: Any, retriever: Any) -> Any:
        if tokenizer is not None and not isinstance(tokenizer, str):
            return tokenizer
        if tokenizer is None and retriever is not None and hasattr(retriever, "tokenizer"):
            return retriever.tokenizer
        from retro_db.tokenizer import load_tokenizer

        return load_tokenizer(tokenizer)

    # -- lm-eval properties -------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        eos = getattr(self.tokenizer, "eos_id", None)
        return int(eos if eos is not None else self.pad_id)

    @property
    def prefix_token_id(self) -> int:
        return self.eot_token_id

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    def tok_encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    # -- retrieval ------------------------------------------------------------------------------

    def _neighbours_for(self, seq: Sequence[int]) -> tuple[np.ndarray, np.ndarray] | None:
        """Neighbours [l, k, r] and lengths [l, k] of the complete chunks of ``seq`` (cached)."""
        if self.retriever is None:
            return None
        m = self.m
        n_complete = len(seq) // m
        toks = np.full((n_complete, self.k, self.r), self.pad_id, dtype=np.int64)
        lens = np.zeros((n_complete, self.k), dtype=np.int64)
        if self._shuffled is not None:
            for u in range(n_complete):
                t, ln, _ = self._shuffled.lookup(tuple(seq[u * m : (u + 1) * m]))
                toks[u], lens[u] = t, ln
            return toks, lens
        missing = []
        for u in range(n_complete):
            key = tuple(seq[u * m : (u + 1) * m])
            if key not in self._nb_cache:
                missing.append((u, key))
        if missing:
            nb = self.retriever.retrieve(
                np.array([key for _, key in missing], dtype=np.int64), self.k
            )
            for j, (_, key) in enumerate(missing):
                self._nb_cache[key] = (
                    np.asarray(nb.tokens[j], dtype=np.int64),
                    np.asarray(nb.lengths[j], dtype=np.int64),
                )
        for u in range(n_complete):
            t, ln = self._nb_cache[tuple(seq[u * m : (u + 1) * m])]
            toks[u], lens[u] = t, ln
        return toks, lens

    # -- lm-eval API ------------------------------------------------------------------------------

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood (natural log) of whole documents with strided windows (see perplexity.py)."""
        texts = [req.args[0] for req in requests]
        docs = [self.tok_encode(t) for t in texts]
        nonempty = [i for i, d in enumerate(docs) if d]
        out = [0.0] * len(texts)
        if not nonempty:
            return out
        token_docs = [docs[i] for i in nonempty]
        if self.retrieval_mode in METHOD_MODES:
            res = self._score_method(token_docs, self.progress and not disable_tqdm)
            ll = res.doc_loglikelihood()
            for j, i in enumerate(nonempty):
                out[i] = float(ll[j])
                self.cache_hook.add_partial("loglikelihood_rolling", (texts[i],), out[i])
            return out
        neighbours = None
        if self.retriever is not None:
            neighbours = retrieve_document_neighbours(
                self.retriever,
                token_docs,
                chunk_size=self.m,
                k=self.k,
                pad_id=self.pad_id,
                progress=self.progress and not disable_tqdm,
            )
            if self.retrieval_mode == "shuffled":
                neighbours = shuffle_document_neighbours(neighbours, seed=self.shuffle_seed)
        res = score_token_documents(
            self.model,
            token_docs,
            decode=self.tok_decode,
            prefix_id=self.prefix_token_id,
            neighbours=neighbours,
            window=self.max_length,
            stride=self.stride,
            batch_size=self.batch_size,
            progress=self.progress and not disable_tqdm,
            keep_neighbours=False,
        )
        ll = res.doc_loglikelihood()
        for j, i in enumerate(nonempty):
            out[i] = float(ll[j])
            self.cache_hook.add_partial("loglikelihood_rolling", (texts[i],), out[i])
        return out

    def _score_method(self, token_docs: list[list[int]], progress: bool) -> Any:
        """``retrieval=incontext`` / ``knnlm`` over documents (retro-eval run's comparison rows)."""
        common = dict(
            decode=self.tok_decode, prefix_id=self.prefix_token_id, window=self.max_length,
            stride=self.stride, batch_size=self.batch_size, progress=progress,
        )  # fmt: skip
        if self.retrieval_mode == "incontext":
            from .incontext import score_incontext

            nbs = retrieve_document_neighbours(
                self.retriever, token_docs, chunk_size=self.m, k=1, pad_id=self.pad_id,
                progress=progress,
            )  # fmt: skip
            return score_incontext(self.model, token_docs, nbs, **common)
        from .knnlm import (
            build_datastore,
            database_documents,
            matching_database_documents,
            score_knnlm,
        )

        db_docs, db_index = database_documents(self.retriever)
        if self._datastore is None:
            self._datastore = build_datastore(
                self.model, db_docs, db_index, prefix_id=self.prefix_token_id,
                window=self.max_length, stride=self.stride, batch_size=self.batch_size,
                max_tokens=self.knn_max_tokens, progress=progress,
            )  # fmt: skip
        excl = matching_database_documents(token_docs, db_docs, db_index)
        scores = score_knnlm(
            self.model, token_docs, self._datastore, ks=(self.knn_k,), exclude_doc_ids=excl,
            **common,
        )  # fmt: skip
        return scores.result(self.knn_lambda, self.knn_k)

    def _only_rolling(self, what: str) -> None:
        if self.retrieval_mode in METHOD_MODES:
            raise ValueError(
                f"RetroLM: retrieval={self.retrieval_mode} scores loglikelihood_rolling only "
                f"(the perplexity tasks), not {what}"
            )

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # As lm-eval's HF model: trailing context spaces belong to the continuation.
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        if not context:
            return [self.prefix_token_id], self.tok_encode(continuation)
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx) :]

    def loglikelihood(
        self, requests: list[Any], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """log p(continuation | context) and whether greedy decoding gives the continuation.

        The input is the last n tokens of context + continuation (minus the final token); its chunks
        from its first token retrieve neighbours.
        """
        self._only_rolling("loglikelihood")
        items = []
        for idx, req in enumerate(requests):
            ctx, cont = self._encode_pair(*req.args)
            if not cont:
                items.append((idx, [], 0))
                continue
            seq = (ctx + cont)[-(self.max_length + 1) :]
            items.append((idx, seq, min(len(cont), len(seq) - 1)))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        # Batch requests of the same input length (no padding needed).
        todo = sorted((it for it in items if it[1]), key=lambda it: -len(it[1]))
        groups: list[list[tuple[int, list[int], int]]] = []
        for it in todo:
            if groups and len(groups[-1]) < self.batch_size and len(groups[-1][0][1]) == len(it[1]):
                groups[-1].append(it)
            else:
                groups.append([it])
        if self._shuffled is not None:
            m = self.m
            self._shuffled.prepare(
                [
                    [tuple(seq[u * m : (u + 1) * m]) for u in range((len(seq) - 1) // m)]
                    for _, seq, _ in todo
                ]
            )
        device = self.device
        with torch.inference_mode():
            for group in tqdm(
                groups, desc="loglikelihood", disable=disable_tqdm or not self.progress
            ):
                inp = torch.tensor(
                    [seq[:-1] for _, seq, _ in group], dtype=torch.long, device=device
                )
                kwargs = {}
                if self.retriever is not None:
                    nbs = [self._neighbours_for(seq[:-1]) for _, seq, _ in group]
                    kwargs["neighbours"] = torch.from_numpy(np.stack([t for t, _ in nbs])).to(
                        device
                    )
                    kwargs["neighbour_lengths"] = torch.from_numpy(
                        np.stack([ln for _, ln in nbs])
                    ).to(device)
                logits = self.model(inp, **kwargs)
                for b, (idx, seq, c) in enumerate(group):
                    tgt = torch.tensor(seq[-c:], dtype=torch.long, device=device)
                    # positions predicting the continuation
                    lp = torch.log_softmax(logits[b, -c:].float(), dim=-1)
                    ll = float(lp.gather(-1, tgt[:, None]).sum())
                    greedy = bool((lp.argmax(-1) == tgt).all())
                    results[idx] = (ll, greedy)
                    self.cache_hook.add_partial("loglikelihood", requests[idx].args, results[idx])
        return results

    def _gen_request(self, req: Any) -> tuple[list[int], list[str], int, float]:
        """(aligned prompt, until, max_new, temperature) of a generate_until request."""
        from .qa import align_prompt

        context, gen_kwargs = req.args
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
        temperature = float(gen_kwargs.pop("temperature", 0.0) or 0.0)
        if not parse_bool(gen_kwargs.pop("do_sample", False), "do_sample"):
            temperature = 0.0
        max_new = max(1, min(max_new, self.n - self.m))
        budget = (self.n - max_new) // self.m * self.m
        ids = self.tok_encode(context)
        prompt = align_prompt(ids, self.m, self.pad_id, budget)
        if self._queries is not None:
            self._queries.register(prompt, len(prompt) - min(len(ids), len(prompt)))
        return prompt, list(until), max_new, temperature

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy generation (``retro_core.generate``) with retrieval at chunk boundaries.

        The prompt is left-padded so that it ends a chunk (as the paper does for QA); generation stops
        at any of ``until`` (default the end-of-text token) or after ``max_gen_toks`` tokens.
        """
        from retro_core.generate import generate

        self._only_rolling("generate_until")
        parsed = [self._gen_request(req) for req in requests]
        retriever = self._queries  # None for RETRO[OFF]
        if self._shuffled is not None:
            m = self.m
            self._shuffled.prepare(
                [[tuple(p[u * m : (u + 1) * m]) for u in range(len(p) // m)] for p, *_ in parsed]
            )
            retriever = self._shuffled
        out = []
        for req, (prompt, until, max_new, temperature) in tqdm(
            list(zip(requests, parsed, strict=True)),
            desc="generate",
            disable=disable_tqdm or not self.progress,
        ):
            new = generate(
                self.model,
                prompt,
                retriever,
                max_new,
                k=self.k,
                temperature=temperature,
                eos_id=self.eot_token_id,
            )
            text = self.tok_decode([t for t in new if t != self.eot_token_id])
            cut = min([text.find(s) for s in until if s and s in text], default=len(text))
            text = text[:cut]
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out
