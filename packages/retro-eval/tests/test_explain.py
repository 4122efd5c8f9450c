"""``retro-eval explain``: bits saved per token, CCA attention mass, the page, a real browser.

Independent truths: the existing scorer (``score_documents``, RETRO[ON] and RETRO[OFF]) for the
per-token bits; the definition of a probability distribution for the attention mass (RETRO's own
CCA has no sink, so per layer the mass over all k x r neighbour tokens is 1); the paper's causal
shift for which tokens read a chunk's neighbours; a headless Chromium's screenshot for the page.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from retro_core.config import RetroConfig
from retro_core.generate import generate
from retro_core.model import Retro
from retro_core.retrieval import Neighbours
from retro_eval.cli import main
from retro_eval.explain import (
    GREEN,
    RED,
    explain_generation,
    explain_text,
    render_html,
    render_markdown,
    saved_colour,
)
from retro_eval.perplexity import (
    retrieve_document_neighbours,
    score_documents,
    score_token_documents,
)
from retro_eval.testing import ByteTokenizer, InMemoryRetriever

torch.set_num_threads(1)

M = 8
N = 32
TEXT = (
    'The cat sat on the mat. <script>alert("x")</script> & the dog slept on the mat '
    "across the room, near the old mill by the river."
)
DB_TEXTS = [
    "The dog slept on the mat in the room across the hall. <b>bold</b> words",
    "The cat sat on the old mat near the mill by the river bank.",
    "AAAAAAAA bbbbbbbb cccccccc dddddddd eeeeeeee",
]


def tiny_model(seed: int = 0, cca=(2, 3)) -> Retro:
    torch.manual_seed(seed)
    cfg = RetroConfig(
        vocab_size=258,
        d_model=32,
        n_heads=2,
        n_layers=3,
        chunk_size=M,
        enc_layers=1,
        cca_layers=cca,
        max_seq_len=N,
        num_neighbours=2,
        tokenizer_id=ByteTokenizer.id,
    )
    return Retro(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


@pytest.fixture(scope="module")
def retriever(tok):
    return InMemoryRetriever([tok.encode(t) for t in DB_TEXTS], chunk_size=M)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def explained(model, tok, retriever):
    return explain_text(model, tok, TEXT, retriever, k=2, progress=False)


@pytest.mark.parametrize(("window", "stride"), [(None, None), (16, 8)])
def test_bits_saved_per_token_sum_to_the_scorers_chunk_bits(model, tok, retriever, window, stride):
    ex = explain_text(
        model, tok, TEXT, retriever, k=2, window=window, stride=stride, progress=False
    )
    kw = dict(window=window, stride=stride, progress=False)
    on = score_documents(model, tok, [TEXT], retriever=retriever, k=2, **kw)
    off = score_documents(model, tok, [TEXT], **kw)
    assert len(ex.chunks) == on.num_chunks == math.ceil(len(tok.encode(TEXT)) / M)
    for c in ex.chunks:
        np.testing.assert_allclose(c.bits_on.sum(), on.bits[c.index], rtol=0, atol=1e-4)
        np.testing.assert_allclose(c.bits_off.sum(), off.bits[c.index], rtol=0, atol=1e-4)
        np.testing.assert_allclose(
            c.saved.sum(), off.bits[c.index] - on.bits[c.index], rtol=0, atol=1e-4
        )
    # retrieval changed something (the sums are not trivially zero) ...
    assert np.abs(np.concatenate([c.saved for c in ex.chunks])).max() > 1e-4
    # ... except on the first m-1 tokens, which read nothing (the causal shift)
    np.testing.assert_array_equal(ex.chunks[0].saved[: M - 1], 0.0)


def test_attention_mass_sums_to_one_per_layer(explained, tok):
    ex = explained
    T = len(tok.encode(TEXT))
    assert ex.layers == ["blocks.1.cca", "blocks.2.cca"]
    for c in ex.chunks:
        u = c.index
        # the readers of chunk u's neighbours: positions (u+1)m-1 .. (u+2)m-2 within the text,
        # and only for a complete chunk (a partial last chunk is never retrieved for)
        complete = (u + 1) * M <= T
        want = max(0, min((u + 2) * M - 2, T - 1) - ((u + 1) * M - 1) + 1) if complete else 0
        assert c.readers == want, u
        if not c.readers:
            assert all(ne.mass is None for ne in c.neighbours)
            continue
        per_layer = np.array([ne.mass_per_layer for ne in c.neighbours])  # (k, layers)
        np.testing.assert_allclose(per_layer.sum(axis=0), 1.0, rtol=0, atol=1e-6)
        np.testing.assert_allclose(sum(ne.mass for ne in c.neighbours), 1.0, atol=1e-6)
        np.testing.assert_allclose(c.sink_mass, 0.0, atol=1e-6)
        for ne in c.neighbours:
            assert len(ne.token_mass) == len(ne.tokens) and (ne.token_mass > 0).all()
            top = ne.top_tokens(3)
            assert [v for _, _, v in top] == sorted(ne.token_mass, reverse=True)[:3]


class _Replacing:
    """A retriever that returns another's neighbours with neighbour ``slot`` replaced."""

    def __init__(self, inner, slot: int, tokens: list[int]):
        self.inner, self.slot, self.tokens = inner, slot, tokens
        self.pad_id = inner.pad_id
        self.chunk_size, self.tokenizer_id = inner.chunk_size, inner.tokenizer_id

    def retrieve(self, chunks, k, exclude_doc_ids=None):
        nb = self.inner.retrieve(chunks, k)
        toks, lens = nb.tokens.copy(), nb.lengths.copy()
        toks[:, self.slot] = nb.pad_id
        toks[:, self.slot, : len(self.tokens)] = self.tokens
        lens[:, self.slot] = len(self.tokens)
        return Neighbours(toks, lens, nb.chunk_ids, nb.distances, nb.pad_id)


def test_attention_mass_changes_when_a_neighbour_is_replaced(tok, retriever):
    # A freshly initialised model attends almost uniformly; sharper queries make its attention
    # depend on the neighbours' content (still the model's own attention weights).
    model = tiny_model(seed=1)
    with torch.no_grad():
        for block in model.blocks:
            if block.cca is not None:
                block.cca.attn.q_proj.weight.mul_(30.0)
                block.cca.attn.k_proj.weight.mul_(30.0)
    first = explain_text(model, tok, TEXT, retriever, k=2, progress=False)
    again = explain_text(model, tok, TEXT, retriever, k=2, progress=False)
    other = tok.encode("Zebras zigzag quietly; xylophones hum.")[: 2 * M]
    replaced = explain_text(model, tok, TEXT, _Replacing(retriever, 1, other), k=2, progress=False)
    for a, b, c in zip(first.chunks, again.chunks, replaced.chunks, strict=True):
        if not a.readers:
            continue
        ma = [ne.mass for ne in a.neighbours]
        assert ma == [ne.mass for ne in b.neighbours]  # deterministic
        mc = [ne.mass for ne in c.neighbours]
        assert abs(ma[0] - mc[0]) > 1e-3, (a.index, ma, mc)
        assert c.neighbours[1].tokens == other
        np.testing.assert_allclose(sum(mc), 1.0, atol=1e-6)


class _Page(HTMLParser):
    """The tags of a page and the text inside its ``div class="text"`` blocks (the chunks)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.depth = 0  # > 0 inside a chunk's text div
        self.chunk_text: list[str] = []
        self.spans: list[str] = []  # the class of each span inside the chunks' text, in order

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if self.depth:
            self.depth += tag == "div"
            if tag == "span":
                self.spans.append(dict(attrs).get("class", ""))
        elif tag == "div" and ("class", "text") in attrs:
            self.depth = 1
            self.chunk_text.append("")

    def handle_endtag(self, tag):
        if self.depth and tag == "div":
            self.depth -= 1

    def handle_data(self, data):
        if self.depth:
            self.chunk_text[-1] += data


def test_page_escapes_every_text(explained):
    page = render_html(explained)
    parsed = _Page()
    parsed.feed(page)
    # a browser's parse: no script (or any tag from the texts), and the chunks read as the text
    assert "script" not in parsed.tags and "b" not in parsed.tags
    assert "".join(parsed.chunk_text) == TEXT
    assert "<script" not in page.lower() and "<b>" not in page
    assert "&lt;" in page and "&amp;" in page
    assert page.count('class="chunk"') == len(explained.chunks)
    assert 'title="+' in page or 'title="-' in page  # the per-token value as a tooltip
    assert "http" not in page and "<link" not in page and "src=" not in page  # self-contained
    assert set(parsed.spans) == {"t"}  # a given text: no generated token, no boundary marker
    md = render_markdown(explained)
    # markdown shows a chunk's text verbatim in a fenced code block; everywhere else it is escaped
    fenced = re.findall(r"^```text\n(.*?)\n```$", md, flags=re.S | re.M)
    assert "".join(fenced) == TEXT
    outside = re.sub(r"^```text\n.*?\n```$", "", md, flags=re.S | re.M)
    assert "<script" not in outside.lower() and "<b>" not in outside
    assert "⟦&lt;⟧" in outside  # the per-token list, escaped
    assert md.count("## Chunk ") == len(explained.chunks)


def test_saved_colour_scale():
    assert saved_colour(2.0, 2.0) == GREEN and saved_colour(-5.0, 2.0) == RED
    assert saved_colour(0.0, 2.0) == (255, 255, 255)
    half = saved_colour(1.0, 2.0)
    assert half[1] > half[0] and half[1] > half[2]  # a paler green


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_page_in_a_headless_browser(model, tok, retriever, tmp_path):
    """Render the page in a real headless Chromium and check its screenshot.

    Skipped when no Chromium is installed (``chromium``, ``chromium-browser``, ``google-chrome``
    on PATH): CI machines may lack one. Checks that the PNG exists, is not blank, and shows the
    token backgrounds the page computed for the most-saved (green) and most-lost (red) tokens.
    """
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium on PATH (chromium / chromium-browser / google-chrome)")
    pytest.importorskip("PIL.Image")
    text = "The cat sat on the mat. <script>x</script> the dog"  # a page that fits the window
    ex = explain_text(model, tok, text, retriever, k=2, progress=False)
    saved = np.concatenate([c.saved for c in ex.chunks])
    assert saved.max() > 0 > saved.min(), "the tiny model should both save and lose bits"
    scale = float(np.abs(saved).max())
    green, red = saved_colour(float(saved.max()), scale), saved_colour(float(saved.min()), scale)
    assert green[1] > max(green[0], green[2]) and red[0] > max(red[1], red[2])
    img = _screenshot(browser, render_html(ex), tmp_path)
    assert _pixels(img, green) >= 20, f"no token background {green} in the screenshot"
    assert _pixels(img, red) >= 20, f"no token background {red} in the screenshot"
    assert _pixels(img, PURPLE) == 0  # a given text: nothing marked as generated


PURPLE = (124, 58, 237)  # #7c3aed: the generated label and the generated tokens' underline


def _screenshot(browser: str, page_html: str, tmp_path: Path) -> np.ndarray:
    """The page as headless Chromium renders it at 1200 x 1600: uint RGB (1600, 1200, 3)."""
    Image = pytest.importorskip("PIL.Image")
    page = tmp_path / "explain.html"
    page.write_text(page_html, encoding="utf-8")
    png = tmp_path / "shot.png"
    subprocess.run(
        [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--screenshot={png}", "--window-size=1200,1600", page.resolve().as_uri(),
        ],
        check=True, capture_output=True, timeout=180,
    )  # fmt: skip
    assert png.is_file() and png.stat().st_size > 0
    img = np.asarray(Image.open(png).convert("RGB")).astype(np.int64)
    assert img.shape[:2] == (1600, 1200)
    not_white = (img < 245).any(axis=-1).mean()
    assert not_white > 0.005, f"blank screenshot ({not_white:.4f} of pixels not white)"
    return img


def _pixels(img: np.ndarray, rgb, tol: int = 3) -> int:
    """How many pixels of img are rgb (each channel within tol)."""
    return int((np.abs(img - np.array(rgb)).max(axis=-1) <= tol).sum())


def test_generation_page_in_a_headless_browser(model, tok, retriever, tmp_path):
    """A generation's page in headless Chromium: the purple boundary label and underline show
    (skipped without Chromium, as the test above)."""
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium on PATH (chromium / chromium-browser / google-chrome)")
    ex = explain_generation(model, tok, "The cat sat", retriever, 20, k=2, progress=False)
    img = _screenshot(browser, render_html(ex), tmp_path)
    # the label (a purple box about 75 x 15 px, white text in it) and a 3 px underline under
    # each generated token: >= 10 consecutive rows holding >= 15 purple pixels each is the label
    purple = (np.abs(img - np.array(PURPLE)).max(axis=-1) <= 3).sum(axis=1) >= 15
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, purple.astype(int), 0])))[::2]
    assert len(runs) and runs.max() >= 10, f"no generated label {PURPLE} in the screenshot"
    assert len(runs) >= 3  # and the underlines of the generated chunks' lines
    # the same explanation shown as a given text has no purple at all
    ex.prompt_tokens = None
    for c in ex.chunks:
        c.retrieved_in_generation = None
    plain = _screenshot(browser, render_html(ex), tmp_path)
    assert _pixels(plain, PURPLE) == 0


# ----------------------------------------------------------------------------------------------
# Explaining a generation

PROMPTS = {
    # 11 prompt + 20 generated = 31 tokens: the last chunk is incomplete
    "incomplete-last-chunk": ("The cat sat", 20),
    # 12 + 20 = 32 = 4m: the last chunk is completed by the last generated token, which predicts
    # nothing, so generation never retrieves for it
    "last-chunk-completed-by-the-last-token": ("The cat sat!", 20),
}


class _Drifting:
    """A retriever whose neighbour 1 changes at every call: retrieving a chunk a second time
    gives other neighbours, so a page that re-retrieved would show what generation never read."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.pad_id = inner.pad_id
        self.chunk_size, self.tokenizer_id = inner.chunk_size, inner.tokenizer_id

    def retrieve(self, chunks, k, exclude_doc_ids=None):
        self.calls += 1
        nb = self.inner.retrieve(chunks, k)
        toks, lens = nb.tokens.copy(), nb.lengths.copy()
        other = [2 + ((self.calls * 7 + i) % 250) for i in range(M + 3)]
        toks[:, 1] = nb.pad_id
        toks[:, 1, : len(other)] = other
        lens[:, 1] = len(other)
        return Neighbours(toks, lens, nb.chunk_ids, nb.distances, nb.pad_id)


def _neighbours_read_in_generation(model):
    """A forward pre-hook recording, for each chunk u, the neighbours (k, r) and lengths (k,) the
    model was given in the cached forward that completed chunk u (the model reads only those:
    ``Retro.forward``'s contract). Returns (the record, the hook handle)."""
    read: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def hook(module, args, kwargs):
        cache = kwargs.get("cache")
        nb = args[1] if len(args) > 1 else kwargs.get("neighbours")
        lens = args[2] if len(args) > 2 else kwargs.get("neighbour_lengths")
        if cache is None or nb is None:
            return
        start, end = cache.length, cache.length + args[0].shape[1]
        for u in range(start // M, end // M):  # chunks completed by this forward
            assert u not in read, f"chunk {u} completed twice"
            read[u] = (nb[0, u].cpu().numpy(), lens[0, u].cpu().numpy())

    return read, model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("drifting", [False, True], ids=["retriever", "drifting-retriever"])
@pytest.mark.parametrize("case", sorted(PROMPTS))
def test_generation_page_shows_the_neighbours_generation_read(
    model, tok, retriever, case, drifting
):
    prompt, new = PROMPTS[case]
    ret = _Drifting(retriever) if drifting else retriever
    read, handle = _neighbours_read_in_generation(model)
    try:
        ex = explain_generation(model, tok, prompt, ret, new, k=2, progress=False)
    finally:
        handle.remove()
    T = len(ex.tokens)
    assert ex.prompt_tokens == len(tok.encode(prompt)) and ex.generated_tokens == new
    assert T == ex.prompt_tokens + new
    # generation retrieved for every chunk completed before the last token: u < (T - 1) // m
    assert sorted(read) == list(range((T - 1) // M))
    assert [c.retrieved_in_generation for c in ex.chunks] == [c.index in read for c in ex.chunks]
    assert ex.chunks[-1].retrieved_in_generation is False
    for u, (nb, lens) in read.items():
        c = ex.chunks[u]
        assert [len(ne.tokens) for ne in c.neighbours] == lens.tolist()
        for j, ne in enumerate(c.neighbours):
            assert ne.tokens == nb[j, : lens[j]].tolist(), (u, j)
    if drifting:
        # the test can fail: retrieving chunk 0 again gives neighbour 1 other tokens
        again = ret.retrieve(np.asarray([ex.tokens[:M]]), 2)
        assert (
            again.tokens[0, 1, : again.lengths[0, 1]].tolist() != ex.chunks[0].neighbours[1].tokens
        )


@pytest.mark.parametrize("case", sorted(PROMPTS))
def test_generation_bits_equal_the_scorers_on_the_final_tokens(model, tok, retriever, case):
    prompt, new = PROMPTS[case]
    ex = explain_generation(model, tok, prompt, retriever, new, k=2, progress=False)
    toks = ex.tokens
    nbs = retrieve_document_neighbours(
        retriever, [toks], chunk_size=M, k=2, pad_id=0, progress=False
    )
    kw = dict(decode=tok.decode, prefix_id=tok.eos_id, progress=False)
    on = score_token_documents(model, [toks], neighbours=nbs, **kw)
    off = score_token_documents(model, [toks], **kw)
    assert len(ex.chunks) == on.num_chunks == math.ceil(len(toks) / M)
    for c in ex.chunks:
        np.testing.assert_allclose(c.bits_on.sum(), on.bits[c.index], rtol=0, atol=1e-4)
        np.testing.assert_allclose(c.bits_off.sum(), off.bits[c.index], rtol=0, atol=1e-4)
        np.testing.assert_allclose(
            c.saved.sum(), off.bits[c.index] - on.bits[c.index], rtol=0, atol=1e-4
        )
    generated = np.concatenate([c.saved for c in ex.chunks])[ex.prompt_tokens :]
    assert np.abs(generated).max() > 1e-4  # retrieval changed the generated tokens' bits


def test_generation_is_the_models_own_and_deterministic(model, tok, retriever):
    prompt, new = PROMPTS["incomplete-last-chunk"]
    ids = tok.encode(prompt)
    greedy = explain_generation(model, tok, prompt, retriever, new, k=2, progress=False)
    assert greedy.meta["generated"] == f"{new} tokens (greedy)"
    again = explain_generation(model, tok, ids, retriever, new, k=2, progress=False)
    assert greedy.tokens == again.tokens
    # the library's generation, cached and the no-cache reference
    for use_cache in (True, False):
        want = generate(model, ids, retriever, new, k=2, eos_id=tok.eos_id, use_cache=use_cache)
        assert greedy.tokens == ids + want, use_cache
    three, three_again, four = (
        explain_generation(
            model, tok, prompt, retriever, new, temperature=1.0, seed=seed, k=2, progress=False
        )
        for seed in (3, 3, 4)
    )
    assert three.meta["generated"] == f"{new} tokens (temperature 1, seed 3)"
    want = generate(
        model, ids, retriever, new, k=2, temperature=1.0, eos_id=tok.eos_id,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert three.tokens == three_again.tokens == ids + want
    assert three.tokens != four.tokens and three.tokens != greedy.tokens


def test_generation_page_marks_where_generation_starts(model, tok, retriever):
    prompt, new = PROMPTS["incomplete-last-chunk"]
    ex = explain_generation(model, tok, prompt, retriever, new, k=2, progress=False)
    n0 = ex.prompt_tokens
    page = render_html(ex)
    parsed = _Page()
    parsed.feed(page)
    assert "".join(parsed.chunk_text) == "".join(t for c in ex.chunks for t in c.token_texts)
    # the prompt's tokens, the one boundary marker, then the generated tokens (underlined)
    assert parsed.spans == ["t"] * n0 + ["gen-start"] + ["t g"] * new
    assert "prompt, then generated from token 11" in page
    assert page.count("as retrieved during generation") == 3  # chunks 0-2; 3 is incomplete
    assert page.count("retrieved for this page") == 1
    md = render_markdown(ex)
    assert md.count("▶ generated: ") == 1
    per_token = md.split("▶ generated: ")[1].split("\n")[0]
    assert per_token.count("⟦") == len(ex.chunks[1].tokens) - (n0 - M)  # rest of chunk 1
    assert "## Chunk 1 (tokens 8–15) · prompt, then generated from token 11" in md
    assert "## Chunk 2 (tokens 16–23) · generated" in md


def test_generation_of_a_retrofitted_model(tok, retriever):
    """The same two truths for a RETRO-fitted Hugging Face model (its own KV cache and CCA)."""
    transformers = pytest.importorskip("transformers")
    from retro_core.retrofit import retrofit

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=258,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=N,
            bos_token_id=1,
            eos_token_id=1,
        )  # fmt: skip
    ).eval()
    fitted = retrofit(hf, cca_layers=(1,), k=2, chunk_size=M, pad_id=0, tokenizer_id=tok.id)
    with torch.no_grad():  # a new CCA's output projection starts at 0: let it read something
        for name, p in fitted.named_parameters():
            if name.endswith("cca.attn.out_proj.weight"):
                p.normal_(0.0, 0.5)
    read, handle = _neighbours_read_in_generation(fitted)
    try:
        ex = explain_generation(fitted, tok, "The cat sat", retriever, 20, k=2, progress=False)
    finally:
        handle.remove()
    T = len(ex.tokens)
    assert ex.generated_tokens == 20 and sorted(read) == list(range((T - 1) // M))
    for u, (nb, lens) in read.items():
        assert [ne.tokens for ne in ex.chunks[u].neighbours] == [
            nb[j, : lens[j]].tolist() for j in range(2)
        ]
    toks = ex.tokens
    nbs = retrieve_document_neighbours(
        retriever, [toks], chunk_size=M, k=2, pad_id=0, progress=False
    )
    kw = dict(decode=tok.decode, prefix_id=tok.eos_id, progress=False)
    on = score_token_documents(fitted, [toks], neighbours=nbs, **kw)
    off = score_token_documents(fitted, [toks], **kw)
    for c in ex.chunks:
        np.testing.assert_allclose(
            c.saved.sum(), off.bits[c.index] - on.bits[c.index], rtol=0, atol=1e-4
        )
    assert np.abs(np.concatenate([c.saved for c in ex.chunks])[11:]).max() > 1e-3
    assert ex.tokens[11:] == generate(fitted, tok.encode("The cat sat"), retriever, 20, k=2,
                                      eos_id=tok.eos_id, use_cache=False)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The command line


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    from retro_core.checkpoint import save_checkpoint
    from retro_db.build import build_database
    from retro_db.ingest import Document
    from retro_db.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("explain")
    tok = load_tokenizer(None)
    common = dict(
        vocab_size=tok.vocab_size, d_model=16, n_heads=2, n_layers=3, chunk_size=M, enc_layers=1,
        max_seq_len=N, tokenizer_id=tok.id, pad_id=tok.pad_id, num_neighbours=2,
    )  # fmt: skip
    torch.manual_seed(0)
    save_checkpoint(Retro(RetroConfig(**common)), root / "retro")
    save_checkpoint(Retro(RetroConfig(**{**common, "cca_layers": ()})), root / "base")
    docs = [Document(doc_id=str(i), text=t, meta={}) for i, t in enumerate(DB_TEXTS)]
    build_database(
        docs, root / "db", tokenizer=tok, embedder="hash:32", chunk_size=M, progress=False
    )
    return root


def test_cli_writes_the_page_and_the_markdown(cli_setup, capsys):
    root = cli_setup
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    out = root / "out"
    args = ["explain", str(root / "retro"), str(root / "text.txt"), "--database", str(root / "db")]
    assert main([*args, "--out", str(out)]) == 0, capsys.readouterr().err
    assert "explain.html" in capsys.readouterr().out
    page = (out / "explain.html").read_text(encoding="utf-8")
    md = (out / "explain.md").read_text(encoding="utf-8")
    parsed = _Page()
    parsed.feed(page)
    assert "script" not in parsed.tags and "".join(parsed.chunk_text) == TEXT
    assert page.count('class="chunk"') == md.count("## Chunk ") > 1
    assert "database: <code>" in page and "distance" in page


def test_cli_explains_a_generation(cli_setup, capsys):
    root = cli_setup
    base = ["explain", str(root / "retro"), "--prompt", "The cat sat on the mat"]
    db = ["--database", str(root / "db")]
    pages = []
    for n, extra in enumerate([["--generate", "12"], ["--generate", "12"], ["--generate", "99"]]):
        out = root / f"gen{n}"
        assert main([*base, *extra, *db, "--out", str(out)]) == 0, capsys.readouterr().err
        stdout = capsys.readouterr().out
        pages.append((out / "explain.html").read_text(encoding="utf-8"))
        md = (out / "explain.md").read_text(encoding="utf-8")
        assert "explain.html" in stdout and md.count("▶ generated: ") == 1
        parsed = _Page()
        parsed.feed(pages[-1])
        assert parsed.spans.count("gen-start") == 1 and "script" not in parsed.tags
        n_gen = parsed.spans.count("t g")
        assert f"generated: <code>{n_gen} tokens (greedy)</code>" in pages[-1]
        if n == 2:  # 99 tokens do not fit: clipped to max_seq_len, and said so
            assert "--generate 99 clipped to" in stdout and n_gen + parsed.spans.count("t") == N
        else:
            assert "clipped" not in stdout and n_gen == 12
    assert pages[0] == pages[1]  # greedy: the same continuation, the same page


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["{retro}", "--database", "{db}"], "exactly one"),
        (["{retro}", "--prompt", "hi", "--text", "x", "--database", "{db}"], "exactly one"),
        (["{retro}", "{root}/text.txt", "--prompt", "hi", "--database", "{db}"], "exactly one"),
        (["{retro}", "--text", "hi", "--generate", "8", "--database", "{db}"], "--generate: only"),
        (["{retro}", "{root}/text.txt", "--seed", "1", "--database", "{db}"], "--seed: only"),
        (["{retro}", "--text", "hi", "--temperature", "1", "--database", "{db}"], "--temperature:"),
        (["{retro}", "--prompt", "hi", "--generate", "0", "--database", "{db}"], "--generate"),
        (["{retro}", "--prompt", "hi", "--temperature", "-1", "--database", "{db}"], ">= 0"),
        (["{retro}", "--prompt", " ", "--database", "{db}"], "--prompt: the text is empty"),
        (["{retro}", "--prompt", "cat " * 40, "--database", "{db}"], "leave no room"),
        (["{base}", "--prompt", "hello there", "--database", "{db}"], "no CCA layers"),
        (["{retro}", "{root}/text.txt", "--text", "x", "--database", "{db}"], "exactly one"),
        (["{retro}", "{root}/missing.txt", "--database", "{db}"], "missing.txt: no such"),
        (["{retro}", "{root}/latin1.txt", "--database", "{db}"], "not UTF-8"),
        (["{retro}", "--text", "  ", "--database", "{db}"], "empty"),
        (["{retro}", "--text", "hi", "--database", "{root}"], "not a retro_db database"),
        (["{root}/nope", "--text", "hi", "--database", "{db}"], "no such checkpoint"),
        (["{base}", "--text", "hello there", "--database", "{db}"], "no CCA layers"),
        (["{retro}", "--text", "hi", "--database", "{db}", "--k", "0"], "--k"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(cli_setup, capsys, args, match):
    root = cli_setup
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    (root / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    fill = dict(retro=root / "retro", base=root / "base", db=root / "db", root=root)
    argv = ["explain", *[a.format(**fill) for a in args], "--out", str(root / "bad")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("retro-eval: error: ")
    assert match in err, err
    assert not (Path(root) / "bad" / "explain.html").exists()
