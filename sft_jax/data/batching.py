"""Label vocabulary, tokenization and deterministic, length-bucketed batches.

Batches are addressed by step: `TrainBatches.batch(step)` is a pure function of (seed, step), so the
data position of a run is its step and resume needs nothing else. Each batch is padded to the smallest
bucket length that holds its longest example, so the train step compiles once per bucket.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import zlib
from collections.abc import Iterable, Sequence

import numpy as np

from sft_jax.data.sources import DataError, Example


class LabelVocab:
    """Class names in a fixed order; the index is the class id the head predicts."""

    def __init__(self, labels: Sequence[str]):
        if len(set(labels)) != len(labels):
            raise ValueError(f"duplicate labels in {list(labels)}")
        self.labels = list(labels)
        self._index = {label: i for i, label in enumerate(self.labels)}

    @classmethod
    def from_examples(cls, examples: Iterable[Example]) -> LabelVocab:
        """The labels of `examples` (a list, or an iterator read once: a stream's scan)."""
        found, where = set(), "training data"
        for e in examples:
            if not found:
                where = e.where.rsplit(":", 1)[0]
            found.add(e.label)
        if len(found) < 2:
            raise DataError(f"{where}: found {len(found)} label(s) {sorted(found)}; "
                            "classification needs at least 2")
        return cls(cls.ordered(found))

    @staticmethod
    def ordered(labels: Iterable[str]) -> list[str]:
        """Sorted, integer labels in their numeric order (so "2" follows "1", not "10")."""
        labels = set(labels)
        if all(label.lstrip("-").isdigit() for label in labels):
            return sorted(labels, key=int)
        return sorted(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def encode(self, label: str, where: str) -> int:
        try:
            return self._index[label]
        except KeyError:
            raise DataError(f"{where}: label {label!r} is not one of the training labels {self.labels}") from None

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump({"labels": self.labels}, f, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LabelVocab:
        with open(path) as f:
            return cls(json.load(f)["labels"])


@dataclasses.dataclass
class EncodedDataset:
    """Tokenized examples of variable length (unpadded) and their class ids."""

    input_ids: list[np.ndarray]
    labels: np.ndarray
    where: list[str]
    truncated: int = 0  # examples cut to max_length (config.data.too_long="truncate")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.input_ids])


TOO_LONG_POLICIES = ("truncate", "error")


def tokenize(tokenizer, texts: Sequence[str], max_length: int, where: Sequence[str] | None = None,
             too_long: str = "truncate") -> tuple[list[np.ndarray], int]:
    """Token ids (with special tokens) truncated to max_length; returns the ids and how many were cut.

    too_long="error" raises a DataError naming `where[i]` of the first text over max_length instead."""
    ids = tokenizer(list(texts), add_special_tokens=True, truncation=False, return_attention_mask=False)["input_ids"]
    cut = 0
    out = []
    for i, seq in enumerate(ids):
        if len(seq) > max_length:
            if too_long == "error":
                at = where[i] if where is not None else f"text {i}"
                raise DataError(f"{at}: {len(seq)} tokens, longer than max_length={max_length} "
                                "(config.data.too_long='error'; 'truncate' cuts such texts)")
            cut += 1
            # Keep the final special token ([SEP]) so the encoder sees a well-formed sequence.
            seq = seq[: max_length - 1] + seq[-1:]
        out.append(np.asarray(seq, dtype=np.int32))
    return out, cut


def encode_classification(
    examples: Sequence[Example], tokenizer, vocab: LabelVocab, max_length: int, too_long: str = "truncate"
) -> EncodedDataset:
    labels = np.array([vocab.encode(e.label, e.where) for e in examples], dtype=np.int32)
    where = [e.where for e in examples]
    ids, cut = tokenize(tokenizer, [e.text for e in examples], max_length, where, too_long)
    if cut:
        logging.warning("%d of %d texts longer than max_length=%d tokens were truncated (first: %s)",
                        cut, len(examples), max_length, examples[0].where.rsplit(":", 1)[0])
    return EncodedDataset(input_ids=ids, labels=labels, where=where, truncated=cut)


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    for b in sorted(buckets):
        if length <= b:
            return b
    raise ValueError(f"sequence of length {length} exceeds the largest bucket {max(buckets)}")


def make_batch(ds: EncodedDataset, indices: np.ndarray, batch_size: int, buckets: Sequence[int],
               pad_id: int) -> dict[str, np.ndarray]:
    """Pads the examples at `indices` to one bucket length; rows past len(indices) get weight 0."""
    seq_len = bucket_length(max(len(ds.input_ids[i]) for i in indices), buckets)
    input_ids = np.full((batch_size, seq_len), pad_id, dtype=np.int32)
    mask = np.zeros((batch_size, seq_len), dtype=np.int32)
    labels = np.zeros((batch_size,), dtype=np.int32)
    weights = np.zeros((batch_size,), dtype=np.float32)
    for row, i in enumerate(indices):
        seq = ds.input_ids[i]
        input_ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
        labels[row] = ds.labels[i]
        weights[row] = 1.0
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "weights": weights}


class TrainBatches:
    """Shuffled training batches, deterministic per (seed, epoch), addressed by global step.

    Within an epoch, windows of `group_window` batches are sorted by length before being cut into
    batches (then the batch order is shuffled), so most batches land in a short bucket.
    """

    def __init__(self, ds, batch_size: int, buckets: Sequence[int], seed: int, pad_id: int,
                 group_window: int = 50, collate=None):
        if len(ds) < batch_size:
            raise DataError(f"{ds.where[0].rsplit(':', 1)[0]}: {len(ds)} training examples, fewer than "
                            f"batch_size={batch_size}")
        self.ds, self.batch_size, self.buckets = ds, batch_size, tuple(buckets)
        self.seed, self.pad_id, self.group_window = seed, pad_id, group_window
        self.collate = collate or make_batch  # (ds, indices, batch_size, buckets, pad_id) -> batch dict
        self.steps_per_epoch = len(ds) // batch_size
        self._epoch, self._order = -1, None

    def _epoch_order(self, epoch: int) -> list[np.ndarray]:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(len(self.ds))[: self.steps_per_epoch * self.batch_size]
            lengths = self.ds.lengths
            window = self.group_window * self.batch_size
            chunks = []
            for start in range(0, len(perm), window):
                part = perm[start: start + window]
                part = part[np.argsort(lengths[part], kind="stable")]
                chunks.extend(np.split(part, len(part) // self.batch_size))
            order = rng.permutation(len(chunks))
            self._epoch, self._order = epoch, [chunks[i] for i in order]
        return self._order

    def batch(self, step: int) -> dict[str, np.ndarray]:
        epoch, i = divmod(step, self.steps_per_epoch)
        return self.collate(self.ds, self._epoch_order(epoch)[i], self.batch_size, self.buckets, self.pad_id)


def eval_batches(ds, batch_size: int, buckets: Sequence[int], pad_id: int, collate=None):
    """Every example once, in order of length (fewer padded tokens), last batch padded with weight 0."""
    collate = collate or make_batch
    order = np.argsort(ds.lengths, kind="stable")
    for start in range(0, len(ds), batch_size):
        idx = order[start: start + batch_size]
        yield idx, collate(ds, idx, batch_size, buckets, pad_id)


def carve_validation(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): `fraction` of `records` (at least one, drawn with `seed` in a stream of its own)
    held out to select on, and the rest; each part in the original order."""
    if not fraction:
        return records, []
    count = max(1, round(len(records) * fraction))
    if count >= len(records):
        raise DataError(f"config.data.validation_fraction={fraction}: {count} of {len(records)} training "
                        "examples held out would leave none to train on")
    held = set(np.random.default_rng([seed, 1]).permutation(len(records))[:count].tolist())
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def replay_memory(records: list, per_class: int, seed: int) -> list:
    """`per_class` records of each label (all of a label's records where it has fewer), in their original order.
    A label's draw depends on the seed and the label alone, so a class keeps the same memory whichever other
    classes are replayed with it."""
    by_label: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_label.setdefault(r.label, []).append(i)
    keep = []
    for label, indices in by_label.items():
        rng = np.random.default_rng([seed, 2, zlib.crc32(label.encode())])
        keep += [indices[k] for k in rng.permutation(len(indices))[:per_class]]
    return [records[i] for i in sorted(keep)]


def subsample(records: list, count: int, seed: int) -> list:
    """The first `count` records of a `seed`ed shuffle (all of them when `count` is 0), in their original order."""
    if not count:
        return records
    keep = np.random.default_rng(seed).permutation(len(records))[:count]
    return [records[i] for i in sorted(keep)]
