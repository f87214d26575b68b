"""`config.master_dtype=float32` with `param_dtype=bfloat16`: the optimizer steps float32 masters of the trained
parameters (`TrainState.master`), and the bfloat16 parameters the model reads are cast from them each step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from sft_jax import optim
from sft_jax.state import ModelDef
from sft_jax.train_step import make_train_step
from sft_jax.trainer.setup import init_state, master_names


def _loss(model, batch, rng):
    err = batch["x"] @ model.kernel.value.astype(jnp.float32) - batch["y"]
    return jnp.mean(err**2), {"loss_sum": jnp.sum(err**2), "count": jnp.float32(err.size)}


@pytest.mark.parametrize("master_dtype,accum_steps", [("none", 1), ("float32", 1), ("float32", 2)])
def test_updates_below_bfloat16_resolution_accumulate_in_the_master(master_dtype, accum_steps):
    """Weights in [1, 2) (bfloat16 step 2^-7), a target 1 above them, Adam at lr 1e-3: each update is a
    quarter of the half-step that would change a bfloat16 weight. Without a master nothing ever moves; with
    one, 30 steps move the master by ~0.03 (several bfloat16 steps) and the parameters follow as its casts."""
    rng = np.random.default_rng(0)
    model = nnx.Linear(8, 4, use_bias=False, rngs=nnx.Rngs(0))
    w0 = rng.uniform(1, 2, (8, 4)) * rng.choice([-1, 1], (8, 4))
    model.kernel.value = jnp.asarray(w0, jnp.bfloat16)
    model_def, params = ModelDef.split(model)
    x = rng.normal(size=(16, 8)).astype(np.float32)
    before = np.asarray(params["kernel"].astype(jnp.float32))  # (the state's buffers are donated)
    batch = {"x": x, "y": x @ (before + 1)}
    tx = optim.adamw(optax.constant_schedule(1e-3), weight_decay=0.0, clip_norm=None)
    master = master_names(params, ("kernel",), master_dtype)
    assert master == (() if master_dtype == "none" else ("kernel",))
    state, shard = init_state(params, tx, master=master)
    step = make_train_step(model_def, tx, _loss, ("kernel",), state_sharding=shard, accum_steps=accum_steps)
    for _ in range(30):
        state, _ = step(state, batch)
    after = np.asarray(state.params["kernel"].astype(jnp.float32))
    assert state.params["kernel"].dtype == jnp.bfloat16
    if master_dtype == "none":
        np.testing.assert_array_equal(after, before)  # every update rounded away
        return
    moved = np.asarray(state.master["kernel"]) - before
    assert state.master["kernel"].dtype == jnp.float32
    assert 0.02 < moved.min() and moved.max() < 0.031  # ~30 x 1e-3 towards the target, on every weight
    np.testing.assert_array_equal(np.asarray(state.params["kernel"]),
                                  np.asarray(state.master["kernel"].astype(jnp.bfloat16)))
    assert (after != before).all()


def test_master_run_resumes_bit_identically(tiny_config, tmp_path, monkeypatch):
    """Full fine-tuning of the tiny BERT in bfloat16 with float32 masters: the masters are checkpointed, the
    parameters are their casts, and a run killed after its step-2 checkpoint ends bit-identical."""
    from conftest import resumed_after_crash

    from sft_jax.train import train_and_evaluate

    tiny_config.strategy, tiny_config.param_dtype, tiny_config.master_dtype = "full", "bfloat16", "float32"
    whole = train_and_evaluate(tiny_config, str(tmp_path / "whole"))
    assert np.isfinite(whole["eval/loss"])
    resumed = resumed_after_crash(tiny_config, tmp_path / "resumed", monkeypatch, 2)
    assert resumed["params_fingerprint"] == whole["params_fingerprint"]

    def saved(workdir):
        step = tmp_path / workdir / "checkpoints" / "latest" / str(tiny_config.max_steps)
        reader = ocp.StandardCheckpointer()
        return reader.restore(step / "params"), reader.restore(step / "train")["master"]

    params, master = saved("whole")
    _, master_resumed = saved("resumed")
    trained = [n for n in params if n.startswith("encoder/") and params[n].dtype == jnp.bfloat16]
    assert trained and set(trained) <= set(master)
    for name, value in master.items():
        assert value.dtype == np.float32, name
        np.testing.assert_array_equal(np.asarray(master_resumed[name]), np.asarray(value), err_msg=name)
        np.testing.assert_array_equal(np.asarray(params[name]), np.asarray(jnp.asarray(value).astype(jnp.bfloat16)),
                                      err_msg=name)


def test_planner_counts_the_master_copy(tmp_path):
    """Full fine-tuning in bfloat16: AdamW moments in the parameters' bfloat16 (4 bytes per trained
    parameter); with float32 masters, 4 bytes of master and 8 of float32 moments (12)."""
    from conftest import planned_config

    from sft_jax.plan import plan

    c = planned_config(tmp_path, "full")
    c.param_dtype = "bfloat16"
    plain = plan(c)
    c.master_dtype = "float32"
    mixed = plan(c)
    assert plain.optimizer / plain.trainable_params == pytest.approx(4, abs=0.01)
    assert mixed.optimizer / mixed.trainable_params == pytest.approx(12, abs=0.01)
    assert mixed.params == plain.params  # the parameters themselves stay bfloat16


def test_master_dtype_is_validated(tiny_config):
    from sft_jax.config_defaults import validate

    tiny_config.master_dtype = "bfloat16"
    with pytest.raises(ValueError, match="config.master_dtype"):
        validate(tiny_config)


def test_jit_of_masters_is_sharded_like_their_parameters():
    """The masters take their parameters' shardings (an fsdp-split kernel keeps its split)."""
    from sft_jax import sharding

    if jax.device_count() < 2:
        pytest.skip("needs 2 devices")
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 1})
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    params = {"w": jnp.ones((4, 2), jnp.bfloat16)}
    tx = optim.adamw(optax.constant_schedule(1e-3))
    state, shard = init_state(params, tx, {"w": spec}, mesh, master=("w",))
    assert state.master["w"].sharding == spec and shard.master["w"] == spec
