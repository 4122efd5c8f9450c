"""``retro-eval explain``: what RETRO read, chunk by chunk, as an HTML page and a markdown file.

For one text, a RETRO model (``Retro`` or a ``RetrofittedLM``) and a retriever (a retro_db
database), :func:`explain_text` computes, for every chunk of m tokens:

- the chunk's tokens and, per token, the bits saved by retrieval: ``bits(RETRO[OFF]) -
  bits(RETRO[ON])`` of that token, where ``bits = -log2 p(token)`` under exactly the strided
  windows of :func:`retro_eval.perplexity.score_token_documents` (same windows, same prefix token
  for the first token, same padding), so a chunk's per-token values sum to its ON - OFF bits as
  the scorer reports them (up to float rounding);
- its k retrieved neighbours (the neighbour chunk followed by its continuation) with their
  squared-L2 key distances, retrieved with the chunk as the query as the scorer does;
- which neighbour tokens chunked cross-attention attended to, from the model's own attention
  probabilities (:func:`retro_core.model.capture_cca_attention`): by the paper's causal shift the
  neighbours of chunk u are read by the m tokens at positions (u+1)m-1 .. (u+2)m-2 (the last
  token of chunk u and the first m-1 of chunk u+1). For each CCA layer, the mass on each
  neighbour token is the attention probability averaged over those tokens and over the heads
  (weighted by :attr:`~retro_core.model.CCAAttention.head_weights`, uniform for RETRO's own CCA),
  so over all k x r neighbour tokens it sums to 1 per layer (less the mass on an attention sink,
  for a retro-fit whose CCA has one). The page shows the mean over the CCA layers (also summing
  to 1) and the per-layer mass of each neighbour.

:func:`explain_generation` first continues a prompt with retrieval
(:func:`retro_core.generate.generate`, KV-cached), recording every retrieval, then explains the
prompt and its continuation as one sequence of tokens (:func:`explain_tokens`, no re-encoding):
each chunk generation retrieved for shows exactly the neighbours the model generated with, and
the page marks where the generated continuation starts and underlines the generated tokens.

:func:`render_html` writes a self-contained page (inline CSS, no script, no external asset; every
text HTML-escaped): each token's background is green when retrieval saved bits on it and red when
it cost bits (intensity relative to the page's largest absolute value), with the value in the
token's ``title`` tooltip; neighbour tokens are shaded blue by attention mass (full blue at 4 x
an even spread over the chunk's neighbour tokens). :func:`render_markdown` writes the same content
as markdown (tables and per-token values instead of colours).
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from retro_core.model import capture_cca_attention
from retro_core.retrieval import Neighbours

from .perplexity import (
    check_retriever_for,
    default_window_stride,
    has_retrieval,
    model_device,
    model_geometry,
    plan_windows,
)

logger = logging.getLogger(__name__)

__all__ = [
    "GREEN",
    "RED",
    "ChunkExplanation",
    "Explanation",
    "NeighbourExplanation",
    "explain_generation",
    "explain_text",
    "explain_tokens",
    "render_html",
    "render_markdown",
    "saved_colour",
]

LN2 = math.log(2.0)
GREEN = (22, 163, 74)  # a token whose bits retrieval saved the most on this page
RED = (220, 38, 38)  # a token retrieval cost the most bits on this page
BLUE = (37, 99, 235)  # neighbour tokens, by attention mass


@dataclass
class NeighbourExplanation:
    """One retrieved neighbour of a chunk and the attention CCA paid to it.

    Attributes:
        rank: 0 = nearest.
        chunk_id: database chunk id (-1: none found).
        distance: squared L2 distance of its key to the chunk's key (NaN when unknown).
        tokens: its real tokens (the neighbour chunk then its continuation).
        token_texts: each token decoded.
        split: how many of ``tokens`` are the neighbour chunk (the rest is its continuation).
        mass: attention mass on this neighbour, mean over CCA layers (None: nothing read it).
        mass_per_layer: the mass in each CCA layer (same order as ``Explanation.layers``).
        token_mass: float [len(tokens)] mass of each token, mean over CCA layers.
    """

    rank: int
    chunk_id: int
    distance: float
    tokens: list[int]
    token_texts: list[str]
    split: int
    mass: float | None = None
    mass_per_layer: list[float] = field(default_factory=list)
    token_mass: np.ndarray | None = None

    @property
    def text(self) -> str:
        return "".join(self.token_texts)

    def top_tokens(self, n: int) -> list[tuple[int, str, float]]:
        """The n tokens with the most mass: (position in the neighbour, text, mass), most first."""
        if self.token_mass is None or not len(self.token_mass):
            return []
        order = np.argsort(-self.token_mass, kind="stable")[:n]
        return [(int(i), self.token_texts[i], float(self.token_mass[i])) for i in order]


@dataclass
class ChunkExplanation:
    """One chunk of m tokens of the explained text.

    Attributes:
        index: u, the chunk's position in the text.
        start: its first token's position in the text.
        tokens: its tokens; token_texts: each decoded.
        bits_on / bits_off: float64 [len(tokens)] -log2 p of each token with / without retrieval.
        neighbours: its k neighbours (retrieved for this chunk).
        readers: how many tokens read these neighbours through CCA (m, fewer at the text's end,
            0 for a chunk whose neighbours no token reads: the text's last, incomplete chunk).
        sink_mass: per CCA layer, the attention mass the readers put on no neighbour token
            (0 for RETRO's own CCA; a retro-fit's attention sink).
        retrieved_in_generation: for an explained generation (:func:`explain_generation`),
            whether these neighbours are the ones retrieved while generating (True: the model
            generated with exactly them) or were retrieved for the page (False: generation
            stopped before this chunk was complete or before it needed them); None for a text.
    """

    index: int
    start: int
    tokens: list[int]
    token_texts: list[str]
    bits_on: np.ndarray
    bits_off: np.ndarray
    neighbours: list[NeighbourExplanation]
    readers: int = 0
    sink_mass: list[float] = field(default_factory=list)
    retrieved_in_generation: bool | None = None

    @property
    def saved(self) -> np.ndarray:
        """float64 [len(tokens)] bits saved by retrieval on each token (OFF - ON)."""
        return self.bits_off - self.bits_on

    @property
    def text(self) -> str:
        return "".join(self.token_texts)


@dataclass
class Explanation:
    """What :func:`explain_text` found; rendered by :func:`render_html` / :func:`render_markdown`.

    Attributes:
        chunks: one :class:`ChunkExplanation` per chunk of the text.
        layers: names of the CCA modules (``blocks.4.cca``, ``cca_layers.9``, ...).
        chunk_size: m; k: neighbours per chunk; window / stride: n and s used.
        meta: free-form strings shown in the header (model, database, ...).
        prompt_tokens: for an explained generation, n0: the first n0 tokens are the prompt and
            the rest were generated; None for a given text.
    """

    chunks: list[ChunkExplanation]
    layers: list[str]
    chunk_size: int
    k: int
    window: int
    stride: int
    meta: dict[str, str] = field(default_factory=dict)
    prompt_tokens: int | None = None

    @property
    def tokens(self) -> list[int]:
        """All explained token ids, in order."""
        return [t for c in self.chunks for t in c.tokens]

    @property
    def generated_tokens(self) -> int:
        """How many of the tokens were generated (0 for a given text)."""
        return 0 if self.prompt_tokens is None else self.num_tokens - self.prompt_tokens

    @property
    def bits_on(self) -> float:
        return float(sum(c.bits_on.sum() for c in self.chunks))

    @property
    def bits_off(self) -> float:
        return float(sum(c.bits_off.sum() for c in self.chunks))

    @property
    def num_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.chunks)


def _token_texts(decode: Callable[[list[int]], str], tokens: Sequence[int]) -> list[str]:
    """Each token's text, such that they concatenate to ``decode(tokens)`` where possible.

    Tokens decoded one by one can split a multi-byte character (a byte-level BPE gives U+FFFD);
    then each token's text is the growth of the decoded prefix instead.
    """
    toks = [int(t) for t in tokens]
    alone = [decode([t]) for t in toks]
    whole = decode(toks)
    if "".join(alone) == whole:
        return alone
    out, prev = [], ""
    for i in range(len(toks)):
        cur = decode(toks[: i + 1])
        out.append(cur[len(prev) :] if cur.startswith(prev) else cur)
        prev = cur
    return out


def _retrieve(
    retriever: Any, tokens: list[int], m: int, k: int, pad_id: int, progress: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Neighbours of every chunk (a partial last chunk padded), as the scorer retrieves them."""
    pad = int(getattr(retriever, "pad_id", pad_id))
    c = max(1, math.ceil(len(tokens) / m))
    queries = np.full((c, m), pad, dtype=np.int64)
    queries.reshape(-1)[: len(tokens)] = tokens
    toks, lens, ids, dists = [], [], [], []
    for s in tqdm(range(0, c, 256), desc="retrieve", disable=not progress, unit="batch"):
        nb = retriever.retrieve(queries[s : s + 256], k)
        if np.asarray(nb.tokens).shape[1] < k:
            raise ValueError(
                f"the retriever returned {np.asarray(nb.tokens).shape[1]} neighbours per chunk, "
                f"expected k={k}"
            )
        toks.append(np.asarray(nb.tokens, dtype=np.int64)[:, :k])
        lens.append(np.asarray(nb.lengths, dtype=np.int64)[:, :k])
        ids.append(np.asarray(nb.chunk_ids, dtype=np.int64)[:, :k])
        d = nb.distances
        dists.append(
            np.full(ids[-1].shape, np.nan) if d is None else np.asarray(d, np.float64)[:, :k]
        )
    return np.concatenate(toks), np.concatenate(lens), np.concatenate(ids), np.concatenate(dists)


def explain_text(
    model: Any,
    tokenizer: Any,
    text: str,
    retriever: Any,
    *,
    k: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    progress: bool = True,
    meta: dict[str, str] | None = None,
) -> Explanation:
    """Neighbours, CCA attention and per-token bits saved of every chunk of ``text``.

    Args:
        model: a retro_core ``Retro`` with CCA layers or a ``RetrofittedLM``.
        tokenizer: ``encode``, ``decode`` and ``eos_id`` (retro_db's LMTokenizer).
        text: the text to explain (non-empty after tokenisation).
        retriever: a ``retro_core.retrieval.Retriever`` (a retro_db ``Database``) built with the
            model's chunk size and tokenizer.
        k: neighbours per chunk (default the model's ``num_neighbours``).
        window, stride: n and s of the strided windows (default max_seq_len and n/2).
        meta: strings for the page's header.

    Returns:
        An :class:`Explanation` (see the module docstring for what each number is).

    Raises:
        ValueError: an empty text, a model without CCA layers, or a retriever that does not fit
            the model (its chunk size or tokenizer; ``RetrieverMismatchError``).
    """
    tokens = [int(t) for t in tokenizer.encode(text)]
    if not tokens:
        raise ValueError("the text is empty after tokenisation")
    return explain_tokens(
        model,
        tokenizer,
        tokens,
        retriever,
        k=k,
        window=window,
        stride=stride,
        progress=progress,
        meta=meta,
    )


def explain_tokens(
    model: Any,
    tokenizer: Any,
    tokens: Sequence[int],
    retriever: Any,
    *,
    k: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    progress: bool = True,
    meta: dict[str, str] | None = None,
) -> Explanation:
    """:func:`explain_text` for token ids (T >= 1 of them) rather than a text.

    The tokens are explained as they are, without a decode-encode round trip (a byte-level or
    BPE tokenizer need not give the same ids back for a generated sequence); ``tokenizer`` only
    decodes them for the page and gives the end-of-text id that conditions the first token.
    Arguments, result and errors as :func:`explain_text`.
    """
    if not has_retrieval(model):
        raise ValueError(
            "the model has no CCA layers (a decoder-only baseline): nothing to explain"
        )
    check_retriever_for(model, retriever)
    tokens = [int(t) for t in tokens]
    if not tokens:
        raise ValueError("tokens: nothing to explain (an empty sequence)")
    n, s = default_window_stride(model, window, stride)
    _, m, r, pad_id = model_geometry(model)
    kk = int(k) if k else int(model.config.num_neighbours)
    if kk < 1:
        raise ValueError(f"k: expected an integer >= 1, got {kk}")
    device = model_device(model)
    T = len(tokens)
    nb_tok, nb_len, nb_ids, nb_dist = _retrieve(retriever, tokens, m, kk, pad_id, progress)
    if nb_tok.shape[-1] != r:
        raise ValueError(f"neighbours have r={nb_tok.shape[-1]} tokens but the model expects r={r}")
    n_chunks = nb_tok.shape[0]
    eos = getattr(tokenizer, "eos_id", None)
    prefix = int(eos if eos is not None else pad_id)

    bits = {"on": np.zeros(T), "off": np.zeros(T)}
    att_sum: dict[str, np.ndarray] = {}  # layer -> (chunks, k, r) summed over reader tokens
    readers = np.zeros(n_chunks, dtype=np.int64)
    layers: list[str] = []
    windows = plan_windows(T, n, s)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        first = model(torch.tensor([[prefix]], dtype=torch.long, device=device))
        lp0 = torch.log_softmax(first[0, 0].float(), dim=-1)[tokens[0]].item()
        bits["on"][0] = bits["off"][0] = -lp0 / LN2
        for w in tqdm(windows, desc="explain", disable=not progress, unit="window"):
            lw = math.ceil((w.end - w.begin) / m)
            tok = np.full((1, lw * m), pad_id, dtype=np.int64)
            tok[0, : w.end - w.begin] = tokens[w.begin : w.end]
            c0 = w.begin // m
            c1 = min(c0 + lw, n_chunks)
            nt = np.full((1, lw, kk, r), pad_id, dtype=np.int64)
            nl = np.zeros((1, lw, kk), dtype=np.int64)
            nt[0, : c1 - c0] = nb_tok[c0:c1]
            nl[0, : c1 - c0] = nb_len[c0:c1]
            x = torch.from_numpy(tok).to(device)
            lo, hi = w.score_from - 1 - w.begin, w.end - 1 - w.begin  # logits positions used
            tgt = torch.from_numpy(tok[0, lo + 1 : hi + 1]).to(device)
            with capture_cca_attention(model) as records:
                on = model(
                    x,
                    neighbours=torch.from_numpy(nt).to(device),
                    neighbour_lengths=torch.from_numpy(nl).to(device),
                )
            off = model(x)
            for key, logits in (("on", on), ("off", off)):
                logp = torch.log_softmax(logits[0, lo:hi].float(), dim=-1)
                lp = logp.gather(-1, tgt[:, None])[:, 0].double().cpu().numpy()
                bits[key][w.score_from : w.end] = -lp / LN2
            # Reader positions of this window: those whose logits scored a token, and the text's
            # last token (it reads the last complete chunk's neighbours and predicts nothing).
            last = hi + 1 if w.end == T else hi
            for rec in records:
                if rec.name not in att_sum:
                    att_sum[rec.name] = np.zeros((n_chunks, kk, r))
                    layers.append(rec.name)
                hw = rec.head_weights.double().numpy()
                probs = rec.probs[0, lo:last].double().numpy()  # (t, h, k, r)
                per_tok = np.einsum("thkr,h->tkr", probs, hw)
                u = rec.chunks[lo:last].numpy() + c0  # chunk read, in the text's numbering
                ok = (rec.chunks[lo:last].numpy() >= 0) & (u < n_chunks)
                np.add.at(att_sum[rec.name], u[ok], per_tok[ok])
            if records:
                u = records[0].chunks[lo:last].numpy() + c0
                ok = (records[0].chunks[lo:last].numpy() >= 0) & (u < n_chunks)
                np.add.at(readers, u[ok], 1)
    if was_training:
        model.train()

    decode = tokenizer.decode
    chunks: list[ChunkExplanation] = []
    for u in range(n_chunks):
        a, b = u * m, min((u + 1) * m, T)
        att = (
            {name: att_sum[name][u] / readers[u] for name in layers} if readers[u] else {}
        )  # layer -> (k, r)
        nbs = []
        for j in range(kk):
            ln = int(nb_len[u, j])
            ntoks = [int(t) for t in nb_tok[u, j, :ln]]
            ne = NeighbourExplanation(
                rank=j,
                chunk_id=int(nb_ids[u, j]),
                distance=float(nb_dist[u, j]),
                tokens=ntoks,
                token_texts=_token_texts(decode, ntoks) if ntoks else [],
                split=min(m, ln),
            )
            if att:
                ne.mass_per_layer = [float(att[name][j, :ln].sum()) for name in layers]
                ne.token_mass = np.mean([att[name][j, :ln] for name in layers], axis=0)
                ne.mass = float(ne.token_mass.sum())
            nbs.append(ne)
        chunks.append(
            ChunkExplanation(
                index=u,
                start=a,
                tokens=tokens[a:b],
                token_texts=_token_texts(decode, tokens[a:b]),
                bits_on=bits["on"][a:b].copy(),
                bits_off=bits["off"][a:b].copy(),
                neighbours=nbs,
                readers=int(readers[u]),
                sink_mass=[float(1.0 - att[name].sum()) for name in layers] if att else [],
            )
        )
    logger.info(
        "explained %d tokens in %d chunks: %.1f bits with retrieval, %.1f without",
        T,
        n_chunks,
        float(bits["on"].sum()),
        float(bits["off"].sum()),
    )
    return Explanation(
        chunks=chunks,
        layers=layers,
        chunk_size=m,
        k=kk,
        window=n,
        stride=s,
        meta=dict(meta or {}),
    )


class _RecordedRetriever:
    """A retriever that remembers the neighbours it returned for each query chunk.

    A query chunk seen before gets its recorded neighbours again (never re-retrieved), so the
    page shows, for every chunk generation retrieved for, exactly the neighbours the model
    generated with, whatever the wrapped retriever would return on a second call.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.pad_id = int(getattr(inner, "pad_id", 0))
        # query chunk -> its neighbours' tokens (k, r), lengths (k,), chunk ids (k,), distances (k,)
        self.record: dict[tuple[int, ...], tuple[np.ndarray, ...]] = {}
        self.queries: list[tuple[int, ...]] = []  # every query chunk, in the order asked

    @property
    def chunk_size(self) -> int:
        return int(self.inner.chunk_size)

    @property
    def tokenizer_id(self) -> str:
        return str(self.inner.tokenizer_id)

    def retrieve(
        self, chunks: np.ndarray, k: int, exclude_doc_ids: np.ndarray | None = None
    ) -> Neighbours:
        chunks = np.asarray(chunks, dtype=np.int64)
        if exclude_doc_ids is not None:  # not a call generation or the page makes
            return self.inner.retrieve(chunks, k, exclude_doc_ids)
        keys = [tuple(int(t) for t in row) for row in chunks]
        self.queries.extend(keys)
        missing = [i for i, key in enumerate(keys) if key not in self.record]
        missing_keys = list(dict.fromkeys(keys[i] for i in missing))
        if missing_keys:
            nb = self.inner.retrieve(np.asarray(missing_keys, dtype=np.int64), k)
            toks, lens = np.asarray(nb.tokens), np.asarray(nb.lengths)
            ids = np.asarray(nb.chunk_ids)
            dists = (
                np.full(ids.shape, np.nan, np.float32)
                if nb.distances is None
                else np.asarray(nb.distances, np.float32)
            )
            self.pad_id = int(nb.pad_id)
            for j, key in enumerate(missing_keys):
                self.record[key] = (toks[j].copy(), lens[j].copy(), ids[j].copy(), dists[j].copy())
        rows = [self.record[key] for key in keys]
        if any(row[0].shape[0] < k for row in rows):
            raise ValueError(f"the recorded neighbours have fewer than k={k} per chunk")
        return Neighbours(
            tokens=np.stack([row[0][:k] for row in rows]),
            lengths=np.stack([row[1][:k] for row in rows]),
            chunk_ids=np.stack([row[2][:k] for row in rows]),
            distances=np.stack([row[3][:k] for row in rows]),
            pad_id=self.pad_id,
        )


def explain_generation(
    model: Any,
    tokenizer: Any,
    prompt: str | Sequence[int],
    retriever: Any,
    max_new_tokens: int = 64,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    k: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    progress: bool = True,
    meta: dict[str, str] | None = None,
) -> Explanation:
    """Continue ``prompt`` with retrieval, then explain the prompt and its continuation.

    Generation is :func:`retro_core.generate.generate` (KV-cached; the neighbours of each chunk
    C_u of m tokens are retrieved once, when the sequence completes it, and read through CCA by
    the m tokens from the last token of C_u on: the paper's section 2.4). Every retrieval is
    recorded, and the explanation of the final sequence (:func:`explain_tokens`) uses exactly the
    recorded neighbours of each chunk generation retrieved for (the k neighbours of r tokens and
    their distances, not a second retrieval); only a chunk generation never retrieved for (the
    last one, completed by the final token or incomplete) is retrieved for the page
    (:attr:`ChunkExplanation.retrieved_in_generation` says which).

    Shapes (the paper's symbols): the prompt has n0 >= 1 tokens and at most
    ``max_new_tokens`` are generated, n0 + max_new_tokens <= n (the model's ``max_seq_len``);
    the T = n0 + G tokens (G generated, fewer than asked when the end-of-text token is generated)
    form ceil(T / m) chunks of m tokens, each with k neighbours of r = 2m tokens (neighbour chunk
    and continuation) and per token its bits with and without retrieval.

    Args:
        model: a retro_core ``Retro`` with CCA layers or a ``RetrofittedLM``.
        tokenizer: ``encode``, ``decode`` and ``eos_id`` (retro_db's LMTokenizer); generation
            stops after generating ``eos_id``.
        prompt: the text to continue, or its n0 token ids.
        retriever: a ``retro_core.retrieval.Retriever`` (a retro_db ``Database``) built with the
            model's chunk size and tokenizer.
        max_new_tokens: the most tokens to generate (>= 1).
        temperature: 0 = greedy (deterministic); otherwise sample from softmax(logits / T).
        top_k, top_p: restrict sampling to the top_k most likely tokens / the nucleus of mass
            top_p.
        seed: seeds the torch.Generator used for sampling (same seed, same continuation).
        k: neighbours per chunk, in generation and on the page (default ``num_neighbours``).
        window, stride: n and s of the strided windows of the page's bits (default max_seq_len
            and n/2; with the default the whole sequence is one window).
        meta: strings for the page's header (the prompt and generated token counts and the
            sampling settings are added).

    Returns:
        An :class:`Explanation` with ``prompt_tokens = n0``.

    Raises:
        ValueError: an empty prompt, max_new_tokens < 1, n0 + max_new_tokens > n, a bad sampling
            argument, a model without CCA layers, or a retriever that does not fit the model.
    """
    from retro_core.generate import generate

    if not has_retrieval(model):
        raise ValueError(
            "the model has no CCA layers (a decoder-only baseline): nothing to explain"
        )
    check_retriever_for(model, retriever)
    prompt_ids = (
        [int(t) for t in tokenizer.encode(prompt)]
        if isinstance(prompt, str)
        else [int(t) for t in prompt]
    )
    if not prompt_ids:
        raise ValueError("prompt: empty after tokenisation")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an integer >= 1, got {max_new_tokens}")
    kk = int(k) if k else int(model.config.num_neighbours)
    if kk < 1:
        raise ValueError(f"k: expected an integer >= 1, got {kk}")
    recorded = _RecordedRetriever(retriever)
    was_training = model.training
    new = generate(
        model,
        prompt_ids,
        recorded,
        max_new_tokens=max_new_tokens,
        k=kk,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=getattr(tokenizer, "eos_id", None),
        generator=torch.Generator().manual_seed(int(seed)),
    )
    tokens = prompt_ids + [int(t) for t in new]
    m = int(model.config.chunk_size)
    # generate() retrieves for chunks 0, 1, ... in order, each once, as each is completed
    n_gen = len(recorded.queries)
    if recorded.queries != [tuple(tokens[u * m : (u + 1) * m]) for u in range(n_gen)]:
        raise RuntimeError("generation retrieved for chunks other than 0, 1, ... in order")
    logger.info(
        "generated %d tokens after a prompt of %d (retrieved for %d chunk(s) while generating)",
        len(new),
        len(prompt_ids),
        n_gen,
    )
    sampling = (
        "greedy"
        if temperature == 0
        else f"temperature {temperature:g}"
        + (f", top_k {top_k}" if top_k is not None else "")
        + (f", top_p {top_p:g}" if top_p is not None else "")
        + f", seed {seed}"
    )
    info = {
        **(meta or {}),
        "prompt": f"{len(prompt_ids)} tokens",
        "generated": f"{len(new)} tokens ({sampling})",
    }
    ex = explain_tokens(
        model,
        tokenizer,
        tokens,
        recorded,
        k=kk,
        window=window,
        stride=stride,
        progress=progress,
        meta=info,
    )
    if was_training:
        model.train()
    for c in ex.chunks:
        c.retrieved_in_generation = c.index < n_gen
    ex.prompt_tokens = len(prompt_ids)
    return ex


# ----------------------------------------------------------------------------------------------
# Rendering


def saved_colour(saved: float, scale: float) -> tuple[int, int, int]:
    """The background of a token that retrieval saved ``saved`` bits on (negative: lost).

    White blended toward :data:`GREEN` (saved) or :data:`RED` (lost) by ``|saved| / scale``
    (clipped to 1): the page's largest absolute value gets the full colour.
    """
    if not scale > 0 or not math.isfinite(saved) or saved == 0:
        return (255, 255, 255)
    f = min(1.0, abs(saved) / scale)
    base = GREEN if saved > 0 else RED
    return tuple(round(255 + (c - 255) * f) for c in base)  # type: ignore[return-value]


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _ink(rgb: tuple[int, int, int]) -> str:
    """Black or white text, whichever reads better on rgb."""
    lum = 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]
    return "#000" if lum > 140 else "#fff"


def _esc(s: str) -> str:
    return html.escape(s, quote=True)


def _shown(tok: str) -> str:
    """A token's text as shown in a span: newlines visible, never empty."""
    return tok.replace("\n", "\u21b5\n") if tok else "\u2205"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:16px 24px;color:#111;
background:#fff;max-width:1150px}
h1{font-size:20px;margin:0 0 4px}h2{font-size:15px;margin:18px 0 6px}
.meta{color:#444;font-size:12px;margin-bottom:8px}.meta code{font-size:12px}
.chunk{border:1px solid #d0d7de;border-radius:6px;padding:8px 12px;margin:10px 0}
.text{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;line-height:1.9;
white-space:pre-wrap;word-break:break-word}
.t{padding:2px 0;border-radius:2px}
.stats{font-size:12px;color:#333;margin:4px 0}
table{border-collapse:collapse;font-size:12px;margin:6px 0}
td,th{border:1px solid #d0d7de;padding:3px 6px;vertical-align:top;text-align:left}
th{background:#f6f8fa}
.nb{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;line-height:1.7;
white-space:pre-wrap;word-break:break-word;max-width:640px}
.cont{border-left:2px solid #999;margin-left:2px;padding-left:2px}
.top{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:11px}
.legend{font-size:12px;color:#333}
.g{box-shadow:inset 0 -3px 0 #7c3aed}
.gen-start::before{content:"\\25B6 generated";font-family:system-ui,sans-serif;font-size:11px;
background:#7c3aed;color:#fff;border-radius:3px;padding:1px 5px;margin:0 4px}
.role{font-size:12px;font-weight:normal;color:#7c3aed}
"""


def _token_spans(
    texts: Sequence[str],
    saved: np.ndarray,
    on: np.ndarray,
    scale: float,
    generated_from: int | None = None,
    marker: bool = False,
) -> str:
    """The chunk's token spans; tokens from index ``generated_from`` on were generated (class
    ``g``); with ``marker`` (the chunk where generation starts) the first of them is preceded by
    the boundary marker (an empty span whose label is CSS content, so the chunk's text stays the
    text)."""
    out = []
    for i, (t, s, b) in enumerate(zip(texts, saved, on, strict=True)):
        rgb = saved_colour(float(s), scale)
        gen = generated_from is not None and i >= generated_from
        title = f"{float(s):+.3f} bits saved by retrieval ({float(b):.3f} bits with it)"
        if generated_from is not None:
            title += "; generated" if gen else "; prompt"
        if marker and i == generated_from:
            out.append('<span class="gen-start" title="the generated continuation starts here">')
            out.append("</span>")
        out.append(
            f'<span class="{"t g" if gen else "t"}" style="background:{_hex(rgb)};'
            f'color:{_ink(rgb)}" title="{_esc(title)}">{_esc(_shown(t))}</span>'
        )
    return "".join(out)


def _generated_from(ex: Explanation, c: ChunkExplanation) -> int | None:
    """Index in chunk c of its first generated token: 0 for a generated chunk, len(c.tokens)
    for a prompt chunk, None for a given text (nothing generated, nothing to mark)."""
    if ex.prompt_tokens is None:
        return None
    return min(len(c.tokens), max(0, ex.prompt_tokens - c.start))


def _chunk_role(ex: Explanation, c: ChunkExplanation) -> str:
    """'prompt', 'generated' or 'prompt, then generated from token i' ('' for a given text)."""
    g = _generated_from(ex, c)
    if g is None:
        return ""
    if g == len(c.tokens):
        return "prompt"
    return "generated" if g == 0 else f"prompt, then generated from token {c.start + g}"


def _neighbour_source(c: ChunkExplanation) -> str:
    """Where the chunk's neighbours come from, for an explained generation ('' for a text)."""
    if c.retrieved_in_generation is None:
        return ""
    if c.retrieved_in_generation:
        return "neighbours as retrieved during generation (the ones the model generated with)"
    return (
        "neighbours retrieved for this page (generation never needed them: the chunk is "
        "incomplete or was completed by the last generated token)"
    )


def _neighbour_spans(ne: NeighbourExplanation, scale: float) -> str:
    parts = []
    for i, t in enumerate(ne.token_texts):
        mass = float(ne.token_mass[i]) if ne.token_mass is not None else 0.0
        f = min(1.0, mass / scale) if scale > 0 else 0.0
        rgb = tuple(round(255 + (c - 255) * f) for c in BLUE)
        cls = "t cont" if i == ne.split else "t"
        parts.append(
            f'<span class="{cls}" style="background:{_hex(rgb)};color:{_ink(rgb)}" '  # type: ignore[arg-type]
            f'title="{_esc(f"attention mass {mass:.4f}")}">{_esc(_shown(t))}</span>'
        )
    return "".join(parts)


def _fmt_dist(d: float) -> str:
    return "n/a" if not math.isfinite(d) else f"{d:.4g}"


def render_html(ex: Explanation, *, top: int = 5, title: str = "What RETRO read") -> str:
    """A self-contained HTML page of ``ex`` (inline CSS, no script, no external asset).

    Every text of the explained document, the neighbours and ``ex.meta`` is HTML-escaped.
    """
    saved_all = np.concatenate([c.saved for c in ex.chunks]) if ex.chunks else np.zeros(0)
    scale = float(np.abs(saved_all).max()) if saved_all.size else 0.0
    head = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
    ]
    meta = " · ".join(f"{_esc(k)}: <code>{_esc(v)}</code>" for k, v in ex.meta.items())
    saved_total = ex.bits_off - ex.bits_on
    head.append(
        f'<div class="meta">{meta}{" · " if meta else ""}{ex.num_tokens} tokens, '
        f"{len(ex.chunks)} chunks of m = {ex.chunk_size}, k = {ex.k}, window {ex.window} / "
        f"stride {ex.stride} · bits with retrieval {ex.bits_on:.1f}, without {ex.bits_off:.1f}: "
        f"<strong>{saved_total:+.1f} bits saved</strong></div>"
    )
    head.append(
        '<div class="legend">Token background: green = bits saved by retrieval (RETRO[OFF] '
        "minus RETRO[ON] log-loss of the token), red = bits lost; the strongest colour is "
        f"{scale:.3f} bits; hover a token for its value. Neighbour tokens: blue = CCA attention "
        "mass, full at 4 x an even spread (mean over heads, the tokens reading the neighbours "
        "and the CCA layers "
        f"{_esc(', '.join(ex.layers))}); the continuation starts at the grey bar. A chunk's "
        "neighbours are read by the last token of the chunk and the first m - 1 of the next "
        "(the paper's causal shift).</div>"
    )
    if ex.prompt_tokens is not None:
        head.append(
            f'<div class="legend">A generation: the first {ex.prompt_tokens} tokens are the '
            f"prompt, the {ex.generated_tokens} after the purple <strong>generated</strong> label "
            "are the model's continuation (underlined purple), generated with retrieval; each "
            "chunk's neighbours are those retrieved while generating, except where the chunk "
            "says otherwise.</div>"
        )
    body = []
    for c in ex.chunks:
        s = c.saved
        body.append('<div class="chunk">')
        role = _chunk_role(ex, c)
        body.append(
            f"<h2>Chunk {c.index} · tokens {c.start}–{c.start + len(c.tokens) - 1}"
            + (f' <span class="role">· {_esc(role)}</span>' if role else "")
            + "</h2>"
            f'<div class="stats">with retrieval {c.bits_on.sum():.2f} bits, without '
            f"{c.bits_off.sum():.2f}: {s.sum():+.2f} bits saved</div>"
        )
        g = _generated_from(ex, c)
        starts = g is not None and g < len(c.tokens) and c.start + g == ex.prompt_tokens
        spans = _token_spans(c.token_texts, s, c.bits_on, scale, g, marker=starts)
        body.append(f'<div class="text">{spans}</div>')
        if _neighbour_source(c):
            body.append(f'<div class="stats">{_esc(_neighbour_source(c))}</div>')
        if c.readers:
            sink = (
                f" · mass on no neighbour (sink): {np.mean(c.sink_mass):.3f}"
                if c.sink_mass and np.mean(c.sink_mass) > 1e-6
                else ""
            )
            body.append(f'<div class="stats">read by {c.readers} token(s){sink}</div>')
        else:
            body.append(
                '<div class="stats">no token reads these neighbours (the text ends first)</div>'
            )
        rows = [
            "<table><tr><th>#</th><th>chunk id</th><th>distance</th><th>mass</th>"
            + "".join(f"<th>{_esc(n)}</th>" for n in ex.layers)
            + "<th>top tokens</th><th>neighbour · continuation</th></tr>"
        ]
        # full blue at 4 x the uniform share (1 / the chunk's real neighbour tokens): an even
        # spread stays pale, a concentrated read stands out
        n_real = sum(len(ne.tokens) for ne in c.neighbours)
        nscale = 4.0 / n_real if n_real else 0.0
        for ne in c.neighbours:
            per_layer = (
                "".join(f"<td>{v:.3f}</td>" for v in ne.mass_per_layer)
                if ne.mass_per_layer
                else "<td>–</td>" * len(ex.layers)
            )
            tops = ", ".join(f"{_esc(repr(t))} {v:.3f}" for _, t, v in ne.top_tokens(top))
            mass = "–" if ne.mass is None else f"{ne.mass:.3f}"
            rows.append(
                f"<tr><td>{ne.rank}</td><td>{ne.chunk_id}</td><td>{_fmt_dist(ne.distance)}</td>"
                f'<td>{mass}</td>{per_layer}<td class="top">{tops}</td>'
                f'<td><div class="nb">{_neighbour_spans(ne, nscale)}</div></td></tr>'
            )
        rows.append("</table>")
        body.extend(rows)
        body.append("</div>")
    return "\n".join([*head, *body, "</body></html>"]) + "\n"


def _md_cell(s: str) -> str:
    """Text for a markdown table cell: HTML-escaped, pipes and newlines neutralised."""
    return _esc(s).replace("|", "\\|").replace("\n", "⏎").replace("`", "&#96;")


def _fence(s: str) -> str:
    ticks = "```"
    while ticks in s:
        ticks += "`"
    return f"{ticks}text\n{s}\n{ticks}"


def render_markdown(ex: Explanation, *, top: int = 5, title: str = "What RETRO read") -> str:
    """The same content as :func:`render_html` in markdown: per chunk its text, bits, the
    per-token bits saved, and a table of its neighbours with distances and attention mass."""
    lines = [f"# {_md_cell(title)}", ""]
    for k, v in ex.meta.items():
        lines.append(f"- {_md_cell(k)}: `{v.replace('`', '')}`")
    lines += [
        f"- {ex.num_tokens} tokens, {len(ex.chunks)} chunks of m = {ex.chunk_size}, k = {ex.k}, "
        f"window {ex.window} / stride {ex.stride}",
        f"- bits with retrieval {ex.bits_on:.2f}, without {ex.bits_off:.2f}: "
        f"{ex.bits_off - ex.bits_on:+.2f} bits saved",
        f"- attention: mean over heads, reading tokens and the CCA layers "
        f"({', '.join(ex.layers)}); per-layer columns give each layer's mass",
    ]
    if ex.prompt_tokens is not None:
        lines.append(
            f"- a generation: tokens 0–{ex.prompt_tokens - 1} are the prompt, the "
            f"{ex.generated_tokens} after it (from token {ex.prompt_tokens}, after ▶ in the "
            "per-token lists) were generated with retrieval; each chunk's neighbours are those "
            "retrieved while generating unless the chunk says otherwise"
        )
    lines.append("")
    for c in ex.chunks:
        s = c.saved
        role = _chunk_role(ex, c)
        g = _generated_from(ex, c)
        per_token = [
            ("▶ generated: " if i == g and c.start + i == ex.prompt_tokens else "")
            + f"⟦{_md_cell(t)}⟧ {v:+.2f}"
            for i, (t, v) in enumerate(zip(c.token_texts, s, strict=True))
        ]
        lines += [
            f"## Chunk {c.index} (tokens {c.start}–{c.start + len(c.tokens) - 1})"
            + (f" · {role}" if role else ""),
            "",
            *([f"_{_neighbour_source(c)}_", ""] if _neighbour_source(c) else []),
            f"With retrieval {c.bits_on.sum():.2f} bits, without {c.bits_off.sum():.2f}: "
            f"**{s.sum():+.2f} bits saved**; neighbours read by {c.readers} token(s)"
            + (
                f", mass on no neighbour (sink) {np.mean(c.sink_mass):.3f}"
                if c.sink_mass and np.mean(c.sink_mass) > 1e-6
                else ""
            )
            + ".",
            "",
            _fence(c.text),
            "",
            "Bits saved per token (⟦token⟧ bits): " + " ".join(per_token),
            "",
            "| # | chunk id | distance | mass | "
            + " | ".join(_md_cell(n) for n in ex.layers)
            + " | top tokens | neighbour · continuation |",
            "|---|---|---|---|" + "---|" * len(ex.layers) + "---|---|",
        ]
        for ne in c.neighbours:
            per_layer = (
                " | ".join(f"{v:.3f}" for v in ne.mass_per_layer)
                if ne.mass_per_layer
                else " | ".join("–" for _ in ex.layers)
            )
            tops = ", ".join(f"{_md_cell(repr(t))} {v:.3f}" for _, t, v in ne.top_tokens(top))
            mass = "–" if ne.mass is None else f"{ne.mass:.3f}"
            nb_text = (
                _md_cell("".join(ne.token_texts[: ne.split]))
                + " · "
                + _md_cell("".join(ne.token_texts[ne.split :]))
            )
            lines.append(
                f"| {ne.rank} | {ne.chunk_id} | {_fmt_dist(ne.distance)} | {mass} | {per_layer} | "
                f"{tops} | {nb_text} |"
            )
        lines.append("")
    return "\n".join(lines)
