"""Data parallelism on 8 simulated CPU devices (conftest sets them) and one compilation per bucket."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest

from sft_jax import sharding

SHORT = ["good", "bad", "fun", "dull", "great", "boring", "nice", "awful"]
LONG = [f"a good movie, fun and great, with a story that holds up, number {i} of many" for i in range(8)]
LABELS = [1, 0, 1, 0, 1, 0, 1, 0]

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices; see conftest.py")


def _train_losses(workdir: pathlib.Path) -> list[float]:
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [row["train/loss"] for row in lines if "train/loss" in row]


def test_data_parallel_matches_single_device(tiny_config, tmp_path):
    """The same run (dropout on, same seed) on a {"data": 8} mesh and on one device: same losses."""
    from sft_jax.train import train_and_evaluate

    tiny_config.batch_size = 16
    tiny_config.max_steps = 3
    tiny_config.eval_every = 100
    tiny_config.checkpoint_every = 100
    assert tiny_config.head_dropout > 0
    losses = {}
    for data in (1, 8):
        tiny_config.mesh = {"data": data, "fsdp": 1, "tensor": 1}
        train_and_evaluate(tiny_config, str(tmp_path / f"data{data}"))
        losses[data] = _train_losses(tmp_path / f"data{data}")
    assert len(losses[1]) == 3
    np.testing.assert_allclose(losses[8], losses[1], atol=1e-5, rtol=0)
    assert len(set(losses[1])) == 3  # the steps did train (the losses are not one repeated value)


def test_batch_is_split_over_devices(tiny_trainer):
    t = tiny_trainer("full", mesh={"data": 8})
    assert t.mesh.devices.size == 8
    host = t.batch(LONG, LABELS)
    batch = sharding.put_batch(host, t.batch_sharding)
    for name, x in batch.items():
        assert len(x.sharding.device_set) == 8, name
        shapes = {s.data.shape for s in x.addressable_shards}
        assert shapes == {(1, *host[name].shape[1:])}, name  # 8 rows / 8 devices, not replicated
    # The compiled step itself takes the batch split over the data axis.
    compiled = t.train_fn.lower(t.state, batch).compile()
    batch_in = compiled.input_shardings[0][1]
    assert all(s.spec == t.batch_sharding.spec for s in jax.tree.leaves(batch_in))
    state, metrics = t.train_fn(t.state, batch)
    assert np.isfinite(float(metrics["loss"]))
    assert len(state.params["head/kernel"].sharding.device_set) == 8


def test_step_compiles_once_per_bucket(tiny_trainer):
    t = tiny_trainer("head", mesh={"data": 8})  # the strategy does not matter here; head compiles fastest
    batches = [t.batch(SHORT, LABELS), t.batch(LONG, LABELS)]
    assert [b["input_ids"].shape[1] for b in batches] == [16, 32]
    state = t.state
    for step in range(6):
        state, _ = t.train_fn(state, sharding.put_batch(batches[step % 2], t.batch_sharding))
    jax.block_until_ready(state)
    assert int(state.step) == 6
    assert t.train_fn._cache_size() == 2
