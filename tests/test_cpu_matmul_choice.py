"""config.cpu_matmuls="measure": the train step's matmuls are found in its jaxpr with how often they run, timed
under each library, and the faster library is used and cached per CPU and set of matmuls; a run measuring
trains exactly as a run naming the library it chose."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

from sft_jax import cpu_matmul_choice
from sft_jax.train import train_and_evaluate


def test_dots_are_counted_as_often_as_they_run():
    def f(x, ws, v):
        def body(h, w):
            return jnp.tanh(h @ w), None

        h, _ = jax.lax.scan(body, x, ws)  # 5 times the same (4, 8) x (8, 8) dot
        return jax.jit(lambda h: (h @ v).sum())(h)  # a nested program: once

    x, ws, v = jnp.ones((4, 8)), jnp.ones((5, 8, 8)), jnp.ones((8, 3))
    counts = cpu_matmul_choice.dots_of(jax.make_jaxpr(f)(x, ws, v).jaxpr)
    assert sorted(counts.values()) == [1, 5]
    scanned = next(d for d, n in counts.items() if n == 5)
    assert scanned[0] == (4, 8) and scanned[2] == (8, 8) and scanned[1] == "float32"
    grads = cpu_matmul_choice.dots_of(jax.make_jaxpr(jax.grad(f, argnums=1))(x, ws, v).jaxpr)
    assert sum(grads.values()) > sum(counts.values())  # the backward pass's dots too


def test_time_dot_runs_the_dot():
    (dot,) = cpu_matmul_choice.dots_of(jax.make_jaxpr(jnp.matmul)(jnp.ones((16, 32)), jnp.ones((32, 8))).jaxpr)
    assert 0 < cpu_matmul_choice.time_dot(dot, {}, repeats=1) < 10


def test_the_faster_library_is_chosen_once_per_cpu_and_set_of_dots(tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_JAX_CACHE", str(tmp_path))
    dots = {((4, 8), "float32", (8, 8), "float32", (((1,), (0,)), ((), ())), ""): 10}
    libraries = {"xla": {}, "onednn": {"xla_cpu_use_onednn": True}}
    seconds = {"xla": 2e-3, "onednn": 1e-3}
    calls = []

    def timer(dot, options):
        calls.append(options)
        return seconds["onednn" if options else "xla"]

    assert cpu_matmul_choice.choose(dots, libraries, timer, log=lambda _: None) == "onednn"
    assert len(calls) == 2
    seconds.update(xla=1e-4)  # the cache answers now, whatever a new measurement would say
    assert cpu_matmul_choice.choose(dots, libraries, timer, log=lambda _: None) == "onednn"
    assert len(calls) == 2
    (entry,) = json.loads((tmp_path / "cpu_matmuls.json").read_text()).values()
    assert entry == {"choice": "onednn", "seconds": {"xla": pytest.approx(0.02), "onednn": pytest.approx(0.01)}}
    other = {**dots, ((2, 8), "float32", (8, 8), "float32", (((1,), (0,)), ((), ())), ""): 1}
    assert cpu_matmul_choice.choose(other, libraries, timer, log=lambda _: None) == "xla"  # other dots: measured
    (tmp_path / "cpu_matmuls.json").write_text("[damaged")
    assert cpu_matmul_choice.choose(dots, libraries, timer, log=lambda _: None) == "xla"  # measured again


def test_a_measuring_run_trains_as_a_run_naming_its_choice(make_tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_JAX_CACHE", str(tmp_path / "cache"))
    config = make_tiny_config(tmp_path)
    config.max_steps, config.eval_every, config.checkpoint_every = 2, 2, 2
    config.cpu_matmuls = "measure"
    measured = train_and_evaluate(config, str(tmp_path / "measure"))
    (entry,) = json.loads((tmp_path / "cache" / "cpu_matmuls.json").read_text()).values()
    assert entry["choice"] in ("xla", "onednn") and set(entry["seconds"]) == {"xla", "onednn"}
    config.cpu_matmuls = entry["choice"]
    named = train_and_evaluate(config, str(tmp_path / "named"))
    assert measured["params_fingerprint"] == named["params_fingerprint"]
