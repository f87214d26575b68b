"""A model's tokenizer, or the one the user names instead (`config.tokenizer`); an unusable one is an error.

transformers builds a tokenizer for a directory that has no tokenizer files all the same: its vocabulary is the
one to five special tokens, every word becomes the unknown token, and a run on it trains on nothing and exits 0.
Here that is one error line naming the directory and `config.tokenizer`.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from sft_jax.models.loading.files import DamagedFile, read_json_object
from sft_jax.models.registry import SHORT_NAMES, Checkpoint, resolve_checkpoint

HINT = ("set config.tokenizer to a directory with tokenizer files (tokenizer.json, vocab.txt, ...), a short model "
        "name, a .gguf file or a hub id")

# Fewer ordinary (non-special) tokens than this cannot spell a language: the byte-level alphabet alone is 256,
# and transformers' fallback has none.
MIN_ORDINARY_TOKENS = 32


def load(model: str | os.PathLike | Checkpoint, tokenizer: str = "") -> Any:
    """The tokenizer of `model` (a HF directory, a GGUF checkpoint or a name either resolves from), or of
    `tokenizer` when given (the same kinds, and a directory of tokenizer files alone).

    Raises:
      ValueError: one line naming the directory (or `config.tokenizer`) when the tokenizer cannot be built or
        its vocabulary is (almost) only special tokens.
    """
    source = tokenizer or model
    what = f"config.tokenizer={tokenizer!r}" if tokenizer else str(getattr(model, "path", model))
    loaded = _read(source, what)
    check_usable(loaded, what)
    return loaded


def _read(source: str | os.PathLike | Checkpoint, what: str) -> Any:
    from transformers import AutoTokenizer

    from sft_jax.models.loading.gguf import load_gguf_tokenizer

    name, checkpoint = str(source), source if isinstance(source, Checkpoint) else None
    if checkpoint is None:
        path = pathlib.Path(name).expanduser()
        if name in SHORT_NAMES or path.suffix == ".gguf":
            checkpoint = resolve_checkpoint(name)  # its own one-line errors (package missing, no such file)
        elif path.is_dir():
            checkpoint = Checkpoint(path, "hf")  # tokenizer files alone are enough; no config.json needed
        elif name.startswith(("/", "~", ".")) or name.count("/") > 1:
            raise ValueError(f"{what}: no such directory; {HINT}")
    try:
        if checkpoint is not None and checkpoint.kind == "gguf":
            return load_gguf_tokenizer(checkpoint.path)
        config_file = pathlib.Path(checkpoint.path if checkpoint is not None else name) / "config.json"
        if config_file.is_file():  # transformers reads it too: a damaged one is named, not blamed on the tokenizer
            read_json_object(config_file)
        return AutoTokenizer.from_pretrained(str(checkpoint.path) if checkpoint is not None else name)
    except DamagedFile:  # already one line naming the file; no tokenizer setting would help
        raise
    except Exception as e:  # missing files, a hub id not cached offline, a broken tokenizer.json: all one line
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{what}: no usable tokenizer ({reason}); {HINT}") from e


def check_usable(tokenizer: Any, what: str) -> None:
    """Refuses a tokenizer whose vocabulary is (almost) only special tokens: transformers' fallback."""
    size = len(tokenizer)
    ordinary = size - len({i for i in tokenizer.all_special_ids if i is not None and 0 <= i < size})
    if ordinary < MIN_ORDINARY_TOKENS:
        raise ValueError(f"{what}: no usable tokenizer: {size} token{'s' * (size != 1)}, {size - ordinary} of them "
                         "special (what transformers builds when the tokenizer files are missing: every word would "
                         f"be {tokenizer.unk_token or 'unknown'}); {HINT}")


def check_fits(tokenizer: Any, vocab_size: int, what: str) -> None:
    """Refuses a tokenizer with ids past the model's embedding table (a gather there reads a clamped row)."""
    if len(tokenizer) > vocab_size:
        raise ValueError(f"{what}: the tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size "
                         f"{vocab_size} (ids from {vocab_size} on have no embedding); {HINT}")
