"""Language-model data: documents -> token sequences with a per-token loss mask -> shifted batches.

A sequence holds n+1 tokens; the model reads tokens[:-1] and is scored on predicting tokens[1:] where
the loss mask of that target token is 1. Plain text trains on every token; later formats (prompt/answer)
only change the mask. Long documents are cut into consecutive blocks, never silently truncated.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence

import numpy as np

from sft_jax.data.batching import bucket_length
from sft_jax.data.sources import DataError, iter_jsonl


@dataclasses.dataclass(frozen=True)
class Document:
    text: str
    where: str


def _slice(spec: str) -> tuple[str, float, float]:
    """"file.txt[:90%]" -> ("file.txt", 0.0, 0.9); a spec without a slice is the whole file."""
    match = re.fullmatch(r"(.+)\[(\d*)%?:(\d*)%?\]", spec)
    if not match:
        return spec, 0.0, 1.0
    path, lo, hi = match.groups()
    lo, hi = (int(lo) if lo else 0) / 100, (int(hi) if hi else 100) / 100
    if not 0 <= lo < hi <= 1:
        raise DataError(f"{spec}: the slice must be [A%:B%] with 0 <= A < B <= 100")
    return path, lo, hi


def read_documents(spec: str, text_field: str = "text") -> list[Document]:
    """A .txt file (one document) or a .jsonl file of `{text_field: ...}` records (one document each).

    A percent slice selects part of it, like TFDS splits: `input.txt[:90%]` (cut at a line boundary) or
    `data.jsonl[90%:]` (by record), so one file can give disjoint train and eval sets.
    """
    spec, lo, hi = _slice(spec)
    docs = _read_documents(spec, text_field)
    if (lo, hi) == (0.0, 1.0):
        return docs
    if len(docs) == 1 and spec.endswith(".txt"):
        lines = docs[0].text.splitlines(keepends=True)
        a, b = round(lo * len(lines)), round(hi * len(lines))
        text = "".join(lines[a:b])
        if not text.strip():
            raise DataError(f"{spec}[{lo:.0%}:{hi:.0%}]: the slice is empty")
        return [Document(text, f"{spec}:{a + 1}")]
    a, b = round(lo * len(docs)), round(hi * len(docs))
    if a == b:
        raise DataError(f"{spec}[{lo:.0%}:{hi:.0%}]: the slice is empty")
    return docs[a:b]


def _read_documents(spec: str, text_field: str) -> list[Document]:
    if not os.path.isfile(spec):
        raise DataError(f"{spec}: no such file")
    if spec.endswith(".txt"):
        try:
            with open(spec, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise DataError(f"{spec}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if not text.strip():
            raise DataError(f"{spec}: the file is empty")
        return [Document(text, f"{spec}:1")]
    if not spec.endswith(".jsonl"):
        raise DataError(f"{spec}: language-model data must be .txt or .jsonl")
    docs = []
    for where, record in iter_jsonl(spec):
        text = record.get(text_field)
        if text is None:
            raise DataError(f"{where}: missing field {text_field!r} (record has {sorted(record)})")
        if not isinstance(text, str):
            raise DataError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
        if not text.strip():
            raise DataError(f"{where}: field {text_field!r} is empty")
        docs.append(Document(text, where))
    if not docs:
        raise DataError(f"{spec}: no records")
    return docs


@dataclasses.dataclass
class LmDataset:
    """Token sequences (n+1 tokens each, model input + final target) and their 0/1 target masks."""

    tokens: list[np.ndarray]
    loss_mask: list[np.ndarray]
    where: list[str]

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> np.ndarray:
        """Model input lengths (one less than the stored sequence)."""
        return np.array([len(t) - 1 for t in self.tokens])

    @property
    def num_targets(self) -> int:
        return int(sum(m[1:].sum() for m in self.loss_mask))


def doc_token_ids(tokenizer, text: str) -> list[int]:
    """BOS (when the tokenizer adds one by default) + text tokens + EOS: a document the model learns to end."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    return list(ids) + ([eos] if eos is not None and (not ids or ids[-1] != eos) else [])


def encode_documents(docs: Sequence[Document], tokenizer, max_length: int) -> LmDataset:
    """Every token of every document is a target; documents over max_length + 1 tokens become consecutive
    blocks of max_length + 1 tokens that overlap by one (each token is a target exactly once)."""
    tokens, masks, where = [], [], []
    for doc in docs:
        ids = np.asarray(doc_token_ids(tokenizer, doc.text), np.int32)
        if len(ids) < 2:
            raise DataError(f"{doc.where}: the text has fewer than 2 tokens; nothing to predict")
        for start in range(0, len(ids) - 1, max_length):
            block = ids[start: start + max_length + 1]
            if len(block) < 2:
                break
            tokens.append(block)
            masks.append(np.ones(len(block), np.int32))
            where.append(doc.where)
    return LmDataset(tokens, masks, where)


def make_lm_batch(ds: LmDataset, indices: np.ndarray, batch_size: int, buckets: Sequence[int],
                  pad_id: int) -> dict[str, np.ndarray]:
    """Shifted, padded batch: input_ids, targets, loss_mask (float32), segment_ids (0 = pad), positions.

    Rows past len(indices) are all padding (loss_mask 0)."""
    seq_len = bucket_length(max(len(ds.tokens[i]) - 1 for i in indices), buckets)
    batch = {"input_ids": np.full((batch_size, seq_len), pad_id, np.int32),
             "targets": np.full((batch_size, seq_len), pad_id, np.int32),
             "loss_mask": np.zeros((batch_size, seq_len), np.float32),
             "segment_ids": np.zeros((batch_size, seq_len), np.int32),
             "positions": np.zeros((batch_size, seq_len), np.int32)}
    for row, i in enumerate(indices):
        seq, mask = ds.tokens[i], ds.loss_mask[i]
        n = len(seq) - 1
        batch["input_ids"][row, :n] = seq[:-1]
        batch["targets"][row, :n] = seq[1:]
        batch["loss_mask"][row, :n] = mask[1:]
        batch["segment_ids"][row, :n] = 1
        batch["positions"][row, :n] = np.arange(n)
    return batch
