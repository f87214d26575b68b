"""AdamW moments stored in bfloat16 or 8 bits (`config.optimizer_state_dtype`, `sft_jax.optim_states`): the
same steps as float32 moments up to their rounding, the bytes they claim, and runs that train and resume."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sft_jax import optim, optim_states


def _problem(seed=0):
    """A least-squares problem with parameters of several shapes (one not a multiple of the block)."""
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(size=(64, 48)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(300,)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(32, 64)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(32, 48)), jnp.float32)

    def loss(p):
        return jnp.mean((x @ p["w"] - target) ** 2) + jnp.mean((p["b"] - 1.0) ** 2)

    return params, loss


def _run(state_dtype, steps=50):
    params, loss = _problem()
    tx = optim.adamw(optax.constant_schedule(1e-2), weight_decay=0.01, clip_norm=1.0, state_dtype=state_dtype)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    losses = []
    for _ in range(steps):
        params, state = step(params, state)
        losses.append(float(loss(params)))
    return params, state, losses


@pytest.mark.parametrize("state_dtype,loss_tolerance,path_tolerance", [("bfloat16", 0.01, 0.01),
                                                                        ("int8", 0.05, 0.15)])
def test_training_follows_float32_moments(state_dtype, loss_tolerance, path_tolerance):
    """50 steps: the losses within `loss_tolerance` of float32 moments' at every step; where the parameters end,
    relative to how far they travelled, within `path_tolerance` (measured: bfloat16 0.003, int8 0.07-0.11)."""
    start, _ = _problem()
    want_params, _, want = _run("float32")
    got_params, state, got = _run(state_dtype)
    assert got[-1] < 0.5 * got[0]  # it learns
    np.testing.assert_allclose(got, want, rtol=loss_tolerance)
    for name in want_params:
        travelled = float(jnp.linalg.norm(want_params[name] - start[name]))
        assert float(jnp.linalg.norm(got_params[name] - want_params[name])) < path_tolerance * travelled, name
    adam = state[1]  # chain: clipping, then the moments
    assert isinstance(adam, optim_states.ScaleByAdamState)
    if state_dtype == "bfloat16":
        assert adam.mu["w"].dtype == jnp.bfloat16 and adam.nu["b"].dtype == jnp.bfloat16
    else:
        assert adam.mu["w"].codes.dtype == jnp.int8 and adam.nu["w"].codes.dtype == jnp.uint8
        assert adam.mu["w"].codes.shape == (64, 48) and adam.mu["b"].absmax.shape == (2,)


def test_float32_is_optax_adamw():
    """float32 moments are optax.adamw itself (the reference runs unjitted: equal up to float32 rounding)."""
    params, _, losses = _run("float32", steps=5)
    p0, loss = _problem()
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(1e-2, weight_decay=0.01, mask=optim.decay_mask))
    state = tx.init(p0)
    for _ in range(5):
        updates, state = tx.update(jax.grad(loss)(p0), state, p0)
        p0 = optax.apply_updates(p0, updates)
    for name in params:
        np.testing.assert_allclose(params[name], p0[name], atol=1e-6)


def test_eight_bit_codes_round_trip():
    rng = np.random.default_rng(3)
    m = jnp.asarray(rng.normal(0, 1e-3, 1000), jnp.float32)
    v = jnp.asarray(rng.gamma(0.5, 1e-6, 1000), jnp.float32)
    m_back = optim_states.decode(optim_states.encode(m, True), True)
    v_back = optim_states.decode(optim_states.encode(v, False), False)
    assert float(jnp.abs(m_back - m).max()) <= float(jnp.abs(m).max()) / 127
    root = jnp.sqrt(jnp.sqrt(v))
    assert float(jnp.abs(jnp.sqrt(jnp.sqrt(v_back)) - root).max()) <= float(root.max()) / 255 * 1.01
    assert bool(jnp.all(v_back > 0))  # never 0 under a nonzero block: no m / eps updates


def test_bytes_per_parameter_in_the_plan(tmp_path):
    """The planner counts the optimizer state: 8 bytes per trained parameter, 4 in bfloat16, ~2 in int8."""
    from conftest import planned_config

    from sft_jax.plan import plan

    c = planned_config(tmp_path, "full")
    per_param = {}
    for dtype in ("float32", "bfloat16", "int8"):
        c.optimizer_state_dtype = dtype
        p = plan(c)
        per_param[dtype] = p.optimizer / p.trainable_params
    assert per_param["float32"] == pytest.approx(8, abs=0.01)
    assert per_param["bfloat16"] == pytest.approx(4, abs=0.01)
    assert per_param["int8"] == pytest.approx(2 + 8 / optim_states.BLOCK, abs=0.03)


def test_an_eight_bit_run_trains_and_resumes_bit_identically(tiny_config, tmp_path, monkeypatch):
    from conftest import resumed_after_crash

    from sft_jax.train import train_and_evaluate

    tiny_config.strategy, tiny_config.optimizer_state_dtype = "full", "int8"
    tiny_config.mesh = {"data": 1, "fsdp": 2, "tensor": 1}
    whole = train_and_evaluate(tiny_config, str(tmp_path / "whole"))
    assert np.isfinite(whole["eval/loss"])
    resumed = resumed_after_crash(tiny_config, tmp_path / "resumed", monkeypatch, 2)
    assert resumed["params_fingerprint"] == whole["params_fingerprint"]
