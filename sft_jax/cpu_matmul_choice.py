"""`config.cpu_matmuls="measure"`: XLA:CPU's matmul library chosen by timing the run's own matmuls.

Which library multiplies faster (XLA's own dots or oneDNN's, `train_step.CPU_MATMULS`) depends on the CPU and
on the shapes: oneDNN won for MiniLM's small batched attention matmuls on one EPYC and lost to XLA's on another
for SmolLM2's projections. So instead of a fixed rule, the train step's jaxpr is read for its dot_generals
(each with how often it runs: a scanned body's count times the scan length), each distinct one is compiled
alone under both libraries and timed (best of a few calls), and the library with the smaller count-weighted
total wins. The choice is cached per CPU model, thread count, JAX version and set of dots
(`storage.cache_root()`/cpu_matmuls.json) behind a file lock, so concurrent runs on one machine (a run and its
resume, several workers) measure once and agree.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax import storage

Dot = tuple  # (lhs shape, lhs dtype, rhs shape, rhs dtype, dimension numbers, preferred element type)


def _sub_jaxprs(params: dict) -> Iterator[tuple[object, int]]:
    """(jaxpr, times it runs per run of its equation) of an equation's nested programs."""
    times = int(params.get("length", 1))  # scan: the body runs `length` times; others once (or unknown)
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            inner = getattr(item, "jaxpr", item)
            if hasattr(inner, "eqns"):
                yield inner, times


def dots_of(jaxpr, times: int = 1, counts: collections.Counter | None = None) -> collections.Counter:
    """{dot signature: how many times it runs} of a jaxpr and the programs nested in it."""
    counts = collections.Counter() if counts is None else counts
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            lhs, rhs = (v.aval for v in eqn.invars)
            pref = eqn.params.get("preferred_element_type")
            counts[(tuple(lhs.shape), str(lhs.dtype), tuple(rhs.shape), str(rhs.dtype),
                    _ints(eqn.params["dimension_numbers"]), str(pref) if pref is not None else "")] += times
        for inner, n in _sub_jaxprs(eqn.params):
            dots_of(inner, times * n, counts)
    return counts


def _ints(dims) -> tuple:
    """Dimension numbers as plain nested tuples of ints (hashable, JSON-able)."""
    return tuple(_ints(d) for d in dims) if isinstance(dims, (tuple, list)) else int(dims)


@functools.cache
def _jitted_dot(dot: Dot, options: tuple):
    """`dot` compiled alone with XLA `options`, kept for the life of the process (see
    `sft_jax.trainer.throughput._matmul`: destroying a oneDNN executable just after a call can abort)."""
    _, _, _, _, dims, pref = dot
    pref_type = jnp.dtype(pref) if pref else None
    return jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims, preferred_element_type=pref_type),
                   compiler_options=dict(options) or None)


def time_dot(dot: Dot, options: dict, repeats: int = 3) -> float:
    """Best wall seconds of one call of `dot`, compiled alone with XLA `options`."""
    lhs_shape, lhs_dtype, rhs_shape, rhs_dtype, _, _ = dot
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal(lhs_shape, np.float32), lhs_dtype)
    b = jnp.asarray(rng.standard_normal(rhs_shape, np.float32), rhs_dtype)
    f = _jitted_dot(dot, tuple(sorted((options or {}).items())))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best


def measure(counts: collections.Counter, libraries: dict[str, dict],
            timer: Callable[[Dot, dict], float] = time_dot) -> dict[str, float]:
    """{library: count-weighted seconds of all the dots}."""
    return {name: sum(n * timer(dot, options) for dot, n in counts.items()) for name, options in libraries.items()}


@contextlib.contextmanager
def _locked(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def choose(counts: collections.Counter, libraries: dict[str, dict],
           timer: Callable[[Dot, dict], float] = time_dot, log: Callable[[str], None] = print) -> str:
    """The library of `libraries` with the fastest dots `counts`, measured once per CPU and set of dots."""
    from sft_jax.trainer.throughput import cpu_model

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    signature = hashlib.sha256(json.dumps(sorted((list(k), v) for k, v in counts.items())).encode()).hexdigest()
    key = json.dumps([cpu_model(), threads, jax.__version__, sorted(libraries), signature[:16]])
    path = os.path.join(storage.cache_root(), "cpu_matmuls.json")
    with _locked(path):
        try:
            with open(path) as f:
                cached = json.load(f)
        except (OSError, ValueError):
            cached = {}
        cached = cached if isinstance(cached, dict) else {}
        entry = cached.get(key)
        if not (isinstance(entry, dict) and entry.get("choice") in libraries):
            log(f"cpu_matmuls=measure: timing {len(counts)} matmul shapes under {', '.join(libraries)} "
                "(once for this CPU and model)")
            seconds = measure(counts, libraries, timer)
            entry = {"choice": min(seconds, key=seconds.get), "seconds": seconds}
            cached[key] = entry
            try:
                storage.write_text(path, json.dumps(cached, indent=1))
            except OSError:
                pass  # unwritable cache: measured again next time
            log("cpu_matmuls=measure: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in seconds.items())
                + f" per step: {entry['choice']}")
        return entry["choice"]
