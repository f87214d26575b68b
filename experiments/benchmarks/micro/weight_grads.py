"""float32 weight-gradient forms (x^T g, contracting the 4096 rows of a MiniLM batch) against the forward-shaped
dot, one shape at a time, in XLA's matmuls and oneDNN's (stop 19's table in ../notes.md).

    python -m experiments.benchmarks.micro.weight_grads            # both cores
    taskset -c 0 python -m experiments.benchmarks.micro.weight_grads   # one core

Forms: orig x^T g as sft_jax computes it (mixed._weight_grad); gt (g^T x)^T; xt x transposed first (a barrier
keeps XLA from folding the copy back); gtt g transposed first; chunk the rows contracted as (8, 512); batched
8 row blocks as a batched dot, then summed; fwd the forward-shaped x @ w of the same FLOPs, for reference.
"""
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

from sft_jax import platform
from sft_jax.train_step import CPU_MATMULS

F = jnp.float32
_T = (((0,), (0,)), ((), ()))  # contract the rows of both operands
_N = (((1,), (0,)), ((), ()))  # a plain [M, K] x [K, N] product


def orig(x, g, w):
    return lax.dot_general(x, g, _T, preferred_element_type=F)


def gt(x, g, w):
    return lax.dot_general(g, x, _T, preferred_element_type=F).T


def xt(x, g, w):
    return lax.dot_general(lax.optimization_barrier(x.T), g, _N, preferred_element_type=F)


def gtt(x, g, w):
    return lax.dot_general(lax.optimization_barrier(g.T), x, _N, preferred_element_type=F).T


def chunk(x, g, w, c=8):
    r = x.shape[0] // c
    return lax.dot_general(x.reshape(c, r, -1), g.reshape(c, r, -1), (((0, 1), (0, 1)), ((), ())),
                           preferred_element_type=F)


def batched(x, g, w, c=8):
    r = x.shape[0] // c
    return lax.dot_general(x.reshape(c, r, -1), g.reshape(c, r, -1), (((1,), (1,)), ((0,), (0,))),
                           preferred_element_type=F).sum(0)


def fwd(x, g, w):
    return lax.dot_general(x, w, _N, preferred_element_type=F)


FORMS = {f.__name__: f for f in (orig, gt, xt, gtt, chunk, batched, fwd)}

if __name__ == "__main__":
    platform.configure_cpu()  # malloc and XNNPACK settings, before JAX starts
    key = jax.random.PRNGKey(0)
    for lib in ("onednn", "xla"):
        for rows, k, n in ((4096, 1536, 384), (4096, 384, 1536), (4096, 384, 384)):
            x, g = jax.random.normal(key, (rows, k)), jax.random.normal(key, (rows, n))
            w = jax.random.normal(key, (k, n))
            fns = {name: jax.jit(f, compiler_options=CPU_MATMULS[lib] or None) for name, f in FORMS.items()}
            ref = fns["orig"](x, g, w)
            for name, f in fns.items():
                if name != "fwd":
                    assert jnp.allclose(f(x, g, w), ref, rtol=1e-3, atol=1e-2), name
            times = {name: [] for name in fns}
            for _ in range(7):
                for name, f in fns.items():
                    jax.block_until_ready(f(x, g, w))
                    t = time.perf_counter()
                    for _ in range(5):
                        out = f(x, g, w)
                    jax.block_until_ready(out)
                    times[name].append((time.perf_counter() - t) / 5)
            flops = 2 * rows * k * n
            print(f"{lib:6s} x [{rows},{k}] g [{rows},{n}] GFLOP/s: " + "  ".join(
                f"{name} {flops / statistics.median(v) / 1e9:.0f}" for name, v in times.items()), flush=True)
