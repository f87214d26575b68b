"""Training batches of data larger than memory (`config.data.streaming`): records read and tokenized as each batch
needs them, in an order that is a pure function of (seed, step), each process reading only its rows.

Why Grain: its `MapDataset.shuffle` permutes indices with a keyed bijection (`index_shuffle`), so the order of
an epoch of any size costs no memory and any position of it is computed directly: a resumed run reads exactly the
records of the steps it has not taken, with nothing to replay, and a process can read its rows of a batch alone.
It is maintained by Google for JAX input pipelines, its sources are any object with `__len__` and `__getitem__`
(`random_access`), and it grows to ArrayRecord files and worker processes without a change here.

The order: an epoch is `len(records) // batch_size` batches (the remainder dropped, as in memory), shuffled with
a key drawn from (seed, epoch); step s reads positions [i * batch_size, (i + 1) * batch_size) of epoch
s // steps_per_epoch, where i = s % steps_per_epoch. In memory, windows of batches are sorted by length before
batching (`batching.TrainBatches`); a stream cannot see ahead, so each batch takes the smallest bucket its
longest row fits, or, across processes (whose shapes must agree), the largest bucket.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from sft_jax.data.errors import DataError

# encode(items) -> a dataset of exactly those rows, in order, that `collate` reads (EncodedDataset, LmDataset)
Encode = Callable[[list[tuple[str, dict]]], object]


class StreamingBatches:
    """`TrainBatches` (`tasks.base`) over a random-access source of raw records."""

    def __init__(self, records, encode: Encode, collate, batch_size: int, buckets: Sequence[int], seed: int,
                 pad_id: int, rows: slice | None = None):
        """`rows`: the rows of each global batch this process holds (`sharding.process_rows`); None for all."""
        if len(records) < batch_size:
            raise DataError(f"{getattr(records, 'path', 'training data')}: {len(records)} training examples, fewer "
                            f"than batch_size={batch_size}")
        self.records, self.encode, self.collate = records, encode, collate
        self.batch_size, self.seed, self.pad_id = batch_size, seed, pad_id
        self.rows = rows if rows is not None else slice(0, batch_size)
        whole = (self.rows.start, self.rows.stop) == (0, batch_size)
        self.buckets = tuple(buckets) if whole else (max(buckets),)
        self.steps_per_epoch = len(records) // batch_size
        self._epoch, self._order = -1, None

    def _epoch_order(self, epoch: int):
        if epoch != self._epoch:
            import grain

            key = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
            self._epoch, self._order = epoch, grain.MapDataset.source(self.records).shuffle(seed=key)
        return self._order

    def positions(self, step: int) -> tuple[int, list[int]]:
        """(epoch, positions in that epoch's order) of this process's rows of batch `step`."""
        epoch, i = divmod(step, self.steps_per_epoch)
        first = i * self.batch_size
        return epoch, list(range(first + self.rows.start, first + self.rows.stop))

    def batch(self, step: int) -> dict[str, np.ndarray]:
        epoch, positions = self.positions(step)
        order = self._epoch_order(epoch)
        ds = self.encode([order[p] for p in positions])
        local = self.collate(ds, np.arange(len(positions)), len(positions), self.buckets, self.pad_id)
        if len(positions) == self.batch_size:
            return local
        # Rows of other processes stay zero (weight 0): `sharding.put_batch` sends only this process's rows.
        # The target index's width follows the rows it indexes (`lm.add_target_index`): widened to the sequence
        # length here, as the shapes of every process must agree.
        out = {}
        for name, value in local.items():
            shape = [self.batch_size, *value.shape[1:]]
            if name in ("target_index", "target_weight"):
                shape[1] = local["input_ids"].shape[1]
            out[name] = np.zeros(shape, value.dtype)
            out[name][(self.rows, *(slice(0, n) for n in value.shape[1:]))] = value
        return out


def streamed_batches(config, records, encode: Encode, pad_id: int, collate=None) -> StreamingBatches:
    """The run's `StreamingBatches` of `records`: this process's rows of the batch sharding of `config.mesh`."""
    import jax

    from sft_jax import sharding
    from sft_jax.data.batching import make_batch

    if config.data.max_train_examples:
        raise ValueError("config.data.max_train_examples: not with data.streaming (a stream has no subset to draw "
                         "from; write the subset to its own file)")
    rows = None
    if jax.process_count() > 1:
        mesh = sharding.make_mesh(config.mesh.to_dict())
        rows = sharding.process_rows(sharding.batch_sharding(mesh), config.batch_size)
    return StreamingBatches(records, encode, collate or make_batch, config.batch_size, config.buckets, config.seed,
                            pad_id, rows)
