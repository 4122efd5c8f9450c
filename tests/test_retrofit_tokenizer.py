"""Cross-package: retro_core.retrofit's tokenizer id is the one retro_db's database records.

retro-core computes it without importing retro_db (``hf_tokenizer_id``); a RETRO-fitted model then
accepts a database only when the two agree, so both rules must give the same id for the same
Hugging Face tokenizer directory (a word-level ``tokenizer.json``, and GPT-2's ``vocab.json`` +
``merges.txt``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from retro_core.retrofit import hf_tokenizer_id
from retro_db.tokenizer import _gpt2_files, load_tokenizer


def _word_level(directory: Path, vocab_size: int = 64) -> Path:
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="w0", unk_token="w1"
    )
    fast.save_pretrained(str(directory))
    return directory


def _gpt2(directory: Path) -> Path:
    directory.mkdir(parents=True)
    vocab, merges = _gpt2_files()
    shutil.copy(vocab, directory / "vocab.json")
    shutil.copy(merges, directory / "merges.txt")
    return directory


@pytest.mark.parametrize("make", [_word_level, _gpt2], ids=["tokenizer.json", "vocab+merges"])
def test_retrofit_tokenizer_id_is_retro_db_s(make, tmp_path: Path) -> None:
    d = make(tmp_path / "tiny-tok")
    tok_id = hf_tokenizer_id(d)
    assert tok_id is not None and tok_id.startswith("tiny-tok-")
    assert load_tokenizer(d).id == tok_id
    # the id names the directory and hashes its files: a copy elsewhere under another name
    # keeps the hash and changes the name, for both rules alike
    copy = tmp_path / "copy" / "renamed"
    shutil.copytree(d, copy)
    assert hf_tokenizer_id(copy) == load_tokenizer(copy).id == "renamed-" + tok_id.split("-")[-1]
