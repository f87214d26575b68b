"""Language-model data: documents -> token sequences with a per-token loss mask -> shifted batches.

A sequence holds n+1 tokens; the model reads tokens[:-1] and is scored on predicting tokens[1:] where
the loss mask of that target token is 1. Plain text trains on every token; later formats (prompt/answer)
only change the mask. Long documents are cut into consecutive blocks, never silently truncated.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Sequence

import numpy as np

from sft_jax import storage
from sft_jax.data import columnar
from sft_jax.data.batching import bucket_length
from sft_jax.data.sources import DataError, iter_jsonl

TEXT_SUFFIXES = (".txt", ".raw")  # plain text; .raw: the WikiText raw files


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


@storage.reads_data  # gs:// and s3:// specs: read from a local mirror
def read_documents(spec: str, text_field: str = "text") -> list[Document]:
    """A .txt file (one document), or a .jsonl / .parquet / .arrow file or `datasets` folder (`DIR[:SPLIT]`)
    of `{text_field: ...}` records (one document each).

    A percent slice selects part of it, like TFDS splits: `input.txt[:90%]` (cut at a line boundary) or
    `data.jsonl[90%:]` (by record), so one file can give disjoint train and eval sets.
    """
    spec, lo, hi = _slice(spec)
    docs = _read_documents(spec, text_field)
    if (lo, hi) == (0.0, 1.0):
        return docs
    if len(docs) == 1 and spec.endswith(TEXT_SUFFIXES):
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
    if columnar.is_columnar(spec):
        return _documents(columnar.iter_records(spec), spec, text_field)
    if os.path.isdir(spec):
        raise DataError(f"{spec}: is a directory; language-model data must be a .txt, .jsonl, .parquet or .arrow "
                        "file or a `datasets` folder")
    if not os.path.isfile(spec):
        raise DataError(f"{spec}: no such file")
    if spec.endswith(TEXT_SUFFIXES):
        try:
            with open(spec, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise DataError(f"{spec}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if not text.strip():
            raise DataError(f"{spec}: the file is empty")
        return [Document(text, f"{spec}:1")]
    if not spec.endswith(".jsonl"):
        raise DataError(f"{spec}: language-model data must be .txt, .jsonl, .parquet, .arrow or a `datasets` "
                        "folder (or a WikiText .raw file)")
    return _documents(iter_jsonl(spec), spec, text_field)


def _documents(records, spec: str, text_field: str) -> list[Document]:
    docs = []
    for where, record in records:
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
    truncated: int = 0  # sft records cut to max_length (config.data.too_long="truncate")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> np.ndarray:
        """Model input lengths (one less than the stored sequence)."""
        return np.array([len(t) - 1 for t in self.tokens])

    @property
    def num_targets(self) -> int:
        return int(sum(m[1:].sum() for m in self.loss_mask))

    @functools.cached_property
    def most_targets(self) -> int:
        """The most target tokens of any row: the width of every batch's target index (`make_lm_batch`)."""
        return max((int(m[1:].sum()) for m in self.loss_mask), default=1)


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
                  pad_id: int, target_width: str = "dataset") -> dict[str, np.ndarray]:
    """Shifted, padded batch: input_ids, targets, loss_mask (float32), segment_ids (0 = pad), positions, and the
    target index (`add_target_index`) of width `target_width`: "dataset" when `ds` is the whole data set, "batch"
    when it holds only this batch's rows (a stream's).

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
    _check_targets(batch, [ds.where[i] for i in indices])
    return add_target_index(batch, _width(ds, target_width))


def _width(ds, target_width: str) -> int | None:
    if target_width not in ("dataset", "batch"):
        raise ValueError(f"target_width={target_width!r}: 'dataset' or 'batch'")
    return ds.most_targets if target_width == "dataset" else None


def add_target_index(batch: dict[str, np.ndarray], most_targets: int | None = None) -> dict[str, np.ndarray]:
    """Adds `target_index` / `target_weight` [B, K]: the positions whose loss mask is 1, padded to K.

    The loss then computes vocabulary logits only there. In SFT most positions are prompt (an XSum article of
    ~450 tokens for a ~30-token summary), so this skips most of the LM head, the largest matmul of a small
    model with a big vocabulary. K is a shape of the compiled step, so it must not follow each batch: given
    the data set's `most_targets` (the most any row has), K is that rounded up to a multiple of 8, at most the
    sequence length, for every batch of a bucket: one compile per bucket. Without it (a stream, which cannot
    see its rows ahead), K is the smallest of T/8, T/4, T/2, T that fits the batch: at most four compiles a
    bucket."""
    mask = batch["loss_mask"] > 0
    t = mask.shape[1]
    need = max(int(mask.sum(axis=1).max()), 1)
    if most_targets is not None:
        if need > most_targets:
            raise ValueError(f"a batch row has {need} targets, more than the data set's most_targets={most_targets}")
        k = min(t, -(-max(most_targets, 1) // 8) * 8)
    else:
        k = next(c for c in (max(t // 8, 1), max(t // 4, 1), max(t // 2, 1), t) if c >= need)
    index = np.zeros((mask.shape[0], k), np.int32)
    weight = np.zeros((mask.shape[0], k), np.float32)
    for row in range(mask.shape[0]):
        where = np.flatnonzero(mask[row])
        index[row, : len(where)] = where
        weight[row, : len(where)] = batch["loss_mask"][row, where]
    batch["target_index"], batch["target_weight"] = index, weight
    return batch


def _check_targets(batch: dict, where: list[str]) -> None:
    # The loss would be 0/0; a batch that teaches nothing means the data or the masks are wrong.
    if len(where) and not batch["loss_mask"].any():
        raise DataError(f"a batch has no target tokens (examples from {', '.join(sorted(set(where)))})")


@dataclasses.dataclass
class PackedDataset:
    """Rows of several sequences of `base` each (indices into it), to fill fixed-length rows with fewer pads."""

    base: LmDataset
    rows: list[list[int]]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> np.ndarray:
        base = self.base.lengths
        return np.array([int(base[r].sum()) for r in self.rows])

    @property
    def where(self) -> list[str]:
        return [self.base.where[r[0]] for r in self.rows]

    @functools.cached_property
    def most_targets(self) -> int:
        """The most target tokens of any packed row (its sequences' together)."""
        per_sequence = [int(m[1:].sum()) for m in self.base.loss_mask]
        return max((sum(per_sequence[j] for j in r) for r in self.rows), default=1)


def pack(ds: LmDataset, max_length: int) -> PackedDataset:
    """First-fit decreasing: sequences, longest first, go into the first row with room (deterministic)."""
    lengths = ds.lengths
    if lengths.max() > max_length:
        raise ValueError(f"a sequence of {lengths.max()} tokens does not fit a packed row of {max_length}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in np.argsort(-lengths, kind="stable"):
        n = int(lengths[i])
        for r, free in enumerate(room):
            if free >= n:
                rows[r].append(int(i))
                room[r] -= n
                break
        else:
            rows.append([int(i)])
            room.append(max_length - n)
    return PackedDataset(ds, [sorted(r) for r in rows])


def make_packed_batch(ds: PackedDataset, indices: np.ndarray, batch_size: int, buckets: Sequence[int],
                      pad_id: int, target_width: str = "dataset") -> dict[str, np.ndarray]:
    """Like `make_lm_batch`, each row holding several sequences: segment ids 1, 2, ... (attention stays
    within a segment) and positions restarting at 0 for each sequence."""
    seq_len = bucket_length(max(int(ds.lengths[i]) for i in indices), buckets)
    batch = make_lm_batch(ds.base, np.array([ds.rows[indices[0]][0]]), batch_size, (seq_len,), pad_id)
    del batch["target_index"], batch["target_weight"]
    for key in batch:
        batch[key][:] = pad_id if key in ("input_ids", "targets") else 0
    for row, i in enumerate(indices):
        col = 0
        for segment, j in enumerate(ds.rows[i], start=1):
            seq, mask = ds.base.tokens[j], ds.base.loss_mask[j]
            n = len(seq) - 1
            batch["input_ids"][row, col: col + n] = seq[:-1]
            batch["targets"][row, col: col + n] = seq[1:]
            batch["loss_mask"][row, col: col + n] = mask[1:]
            batch["segment_ids"][row, col: col + n] = segment
            batch["positions"][row, col: col + n] = np.arange(n)
            col += n
    _check_targets(batch, [ds.base.where[j] for i in indices for j in ds.rows[i]])
    return add_target_index(batch, _width(ds, target_width))
