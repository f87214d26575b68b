"""Weighted mixtures of training sources (`config.data.mixture`): the task's data plus replay of earlier tasks'
data, or plain text mixed into SFT, each row of each batch drawn from one source.

The order is a pure function of (seed, step), so a resumed run needs nothing beyond its step:
- Which source fills row k of batch `step`: a uniform number hashed from (seed, step, k) by a counter-based
  generator (two rounds of splitmix64's finaliser), against the cumulative weights. Rows are drawn
  independently (as `tf.data` / seqio / `datasets.interleave_datasets` sample mixtures), so a source's share of
  a batch is binomial around its weight, and a weight below 1 / batch_size still gets rows on average.
- Which example: the n-th row drawn from source s is position n of s's own stream, epochs of s shuffled with a
  key drawn from (seed, s, epoch). A source is seen whole before any of its examples repeats, whatever its size
  and weight. n counts the draws of s before (step, k): a run that starts at step S (a resume, or any
  `batch(S)` out of order) recomputes those counts from the hash for steps 0..S-1 at once, vectorised (about
  a tenth of a second per million rows), then carries them forward a step at a time.
Batches are padded to the smallest bucket that holds their longest row (no length sorting across batches: a
mixture's rows are drawn one at a time).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from sft_jax.data.batching import make_batch

KEYS = ("train", "weight", "eval", "name", "format")
FORMATS = ("", "text")  # "": the task's own records; "text": plain documents, every token a target (decoders)
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_STEPS_PER_CHUNK_ROWS = 1 << 20  # rows hashed at once when counting the draws before a step


@dataclasses.dataclass(frozen=True)
class Source:
    """One training source of a mixture: its data spec (read like data.train), its weight (normalised over the
    mixture), evaluation data scored as eval/<name>/... ("" for none) and its format."""

    name: str
    train: str
    weight: float
    eval: str = ""
    format: str = ""


def sources(config) -> list[Source]:
    """The sources of `config.data.mixture`, checked; ValueError with one line naming the key otherwise."""
    mixture = config.data.mixture
    if isinstance(mixture, (str, dict)) or not isinstance(mixture, Sequence):
        raise ValueError(f"config.data.mixture: a list of sources ({{'train': PATH, 'weight': W, ...}}), got "
                         f"{type(mixture).__name__}")
    out = []
    for i, spec in enumerate(mixture):
        key = f"config.data.mixture[{i}]"
        if not isinstance(spec, dict):
            raise ValueError(f"{key}: a dict with keys {KEYS}, got {spec!r}")
        unknown = sorted(set(spec) - set(KEYS))
        if unknown:
            raise ValueError(f"{key}: unknown key(s) {unknown}; a source takes {KEYS}")
        train = spec.get("train")
        if not isinstance(train, str) or not train:
            raise ValueError(f"{key}.train: the source's training data (a path like data.train) is missing")
        weight = spec.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
            raise ValueError(f"{key}.weight: must be a positive number, got {weight!r}")
        evaluation, fmt = spec.get("eval", ""), spec.get("format", "")
        if not isinstance(evaluation, str):
            raise ValueError(f"{key}.eval: a path like data.eval (or ''), got {evaluation!r}")
        if fmt not in FORMATS:
            raise ValueError(f"{key}.format: {fmt!r} is not one of {FORMATS} ('': the task's own records; 'text': "
                             "plain documents)")
        name = spec.get("name") or _default_name(train)
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"{key}.name: {name!r} must be letters, digits, '_', '.' or '-' (it names the "
                             "source's metrics eval/<name>/...)")
        if name in [s.name for s in out]:
            raise ValueError(f"{key}.name: {name!r} names another source too; give each source its own name")
        out.append(Source(name, train, float(weight), evaluation, fmt))
    if not out:
        raise ValueError("config.data.mixture: no sources")
    return out


def _default_name(train: str) -> str:
    """A source's name from its data spec: the file's stem ("wiki" of "data/wiki.txt[:90%]")."""
    stem = os.path.basename(train.rstrip("/")).split("[")[0].split(".")[0]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem) or "source"


def metric_names(config, names: Sequence[str]) -> tuple[str, ...]:
    """eval/<source>/<metric> of every mixture source with evaluation data, for the task's eval/<metric> names."""
    if not config.data.mixture:
        return ()
    evaluated = [s.name for s in sources(config) if s.eval]
    return tuple(f"eval/{s}/{n[len('eval/'):]}" for s in evaluated for n in names if n.startswith("eval/"))


def concat(parts: Sequence[Any]) -> Any:
    """One dataset of the rows of `parts` (datasets of one dataclass, e.g. `EncodedDataset`, `LmDataset`), in
    order: list and array fields joined, counts (truncated examples) summed."""
    fields = {}
    for field in dataclasses.fields(parts[0]):
        values = [getattr(p, field.name) for p in parts]
        if isinstance(values[0], np.ndarray):
            fields[field.name] = np.concatenate(values)
        elif isinstance(values[0], list):
            fields[field.name] = [x for v in values for x in v]
        else:
            fields[field.name] = sum(values)
    return type(parts[0])(**fields)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 whose outputs for consecutive inputs look independent."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(key: int, steps: np.ndarray, rows: int) -> np.ndarray:
    """[len(steps), rows] uniforms in [0, 1), each a pure function of (key, step, row)."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        per_step = _mix64(np.uint64(key) + np.asarray(steps, np.uint64)[:, None] * _GOLDEN)
        bits = _mix64(per_step + (np.arange(rows, dtype=np.uint64)[None, :] + np.uint64(1)) * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


class MixtureBatches:
    """`TrainBatches` (`tasks.base`) of a weighted mixture of in-memory datasets (one per source)."""

    def __init__(self, parts: Sequence[Any], weights: Sequence[float], batch_size: int, buckets: Sequence[int],
                 seed: int, pad_id: int, collate=None, names: Sequence[str] = ()):
        """`collate(ds, indices, batch_size, buckets, pad_id)` pads rows of the concatenated `ds` (`make_batch`);
        `names` name the sources in `summary`."""
        self.names = tuple(names) or tuple(str(i) for i in range(len(parts)))
        self.sizes = np.array([len(p) for p in parts], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self.ds = concat(parts)
        weights = np.asarray(weights, np.float64)
        self.cumulative = np.cumsum(weights) / weights.sum()
        self.cumulative[-1] = 1.0  # a uniform in [0, 1) always lands on a source
        self.batch_size, self.buckets, self.seed, self.pad_id = batch_size, tuple(buckets), seed, pad_id
        self.collate = collate or make_batch
        state = np.random.SeedSequence([seed, 0x6D6978]).generate_state(2, np.uint32)  # "mix"
        self._key = int(state[0]) << 32 | int(state[1])
        self._next_step, self._drawn = 0, np.zeros(len(parts), np.int64)  # draws per source before _next_step
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def summary(self) -> dict[str, int]:
        """data/<source>/train_examples of each source, for results.json."""
        return {f"data/{name}/train_examples": int(n) for name, n in zip(self.names, self.sizes)}

    def sources_of(self, steps: np.ndarray) -> np.ndarray:
        """[len(steps), batch_size]: the source each row of those batches is drawn from."""
        return np.searchsorted(self.cumulative, uniforms(self._key, steps, self.batch_size), side="right")

    def _drawn_before(self, step: int) -> np.ndarray:
        if step != self._next_step:  # a resume (or a jump): count every draw of the steps before, in chunks
            drawn = np.zeros(len(self.sizes), np.int64)
            chunk = max(1, _STEPS_PER_CHUNK_ROWS // self.batch_size)
            for start in range(0, step, chunk):
                picked = self.sources_of(np.arange(start, min(start + chunk, step)))
                drawn += np.bincount(picked.ravel(), minlength=len(self.sizes))
            self._next_step, self._drawn = step, drawn
        return self._drawn

    def _order(self, source: int, epoch: int) -> np.ndarray:
        if (source, epoch) not in self._orders:
            for old in [k for k in self._orders if k[0] == source and k[1] < epoch]:  # never needed again
                del self._orders[old]
            rng = np.random.default_rng([self.seed, source, epoch, 0x6D6978])
            self._orders[source, epoch] = rng.permutation(int(self.sizes[source]))
        return self._orders[source, epoch]

    def draws(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, index within that source) of each row of batch `step`."""
        picked = self.sources_of(np.array([step]))[0]
        drawn = self._drawn_before(step)
        index = np.empty(self.batch_size, np.int64)
        for s in np.unique(picked):
            rows = np.flatnonzero(picked == s)
            epochs, positions = np.divmod(drawn[s] + np.arange(len(rows)), self.sizes[s])
            index[rows] = [self._order(s, e)[p] for e, p in zip(epochs.tolist(), positions.tolist())]
        self._next_step = step + 1
        self._drawn = drawn + np.bincount(picked, minlength=len(self.sizes))
        return picked, index

    def batch(self, step: int) -> dict[str, np.ndarray]:
        picked, index = self.draws(step)
        return self.collate(self.ds, self.offsets[picked] + index, self.batch_size, self.buckets, self.pad_id)


def mixture_batches(config, parts: Sequence[Any], pad_id: int, collate=None) -> MixtureBatches:
    """The run's `MixtureBatches` of `parts`, one dataset per source of `config.data.mixture`, in its order."""
    mix = sources(config)
    return MixtureBatches(parts, [s.weight for s in mix], config.batch_size, config.buckets, config.seed, pad_id,
                          collate, names=[s.name for s in mix])
