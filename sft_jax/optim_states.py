"""Adam's moments stored in less memory: bfloat16, or 8 bits block-wise (as 8-bit Adam, Dettmers et al. 2022).

`scale_by_adam(state_dtype)` is optax's `scale_by_adam` (bias-corrected, the same update) with the first
moment m and second moment v kept between steps as:

- `float32`: optax's own transformation (what runs without this option);
- `bfloat16`: m and v rounded to bfloat16 after each update (4 bytes per parameter instead of 8);
- `int8`: each moment cut into blocks of `BLOCK` consecutive values, each block stored as 8-bit codes and a
  float32 absmax: m linearly in int8 (signed); v as uint8 codes of its fourth root, which spreads v's wide
  dynamic range (v ~ g^2) over the codes, with code 0 read as half a step rather than 0: a v rounded to zero
  under a nonzero m would make the update m / eps. 2 + 8 / BLOCK bytes per parameter instead of 8.

The arithmetic of each step is float32 in every case: moments are decoded, updated, and encoded again.
Codes keep the parameter's shape (so they are sharded like it); the absmaxes are one float32 per block.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

STATE_DTYPES = ("float32", "bfloat16", "int8")
BLOCK = 256


class QuantizedMoment(NamedTuple):
    codes: jax.Array  # the parameter's shape; int8 (m) or uint8 (v)
    absmax: jax.Array  # float32 [number of blocks]


def _blocks(x: jax.Array) -> jax.Array:
    flat = x.reshape(-1).astype(jnp.float32)
    return jnp.pad(flat, (0, -flat.size % BLOCK)).reshape(-1, BLOCK)


def encode(x: jax.Array, signed: bool) -> QuantizedMoment:
    """8-bit codes of a moment: signed linear (m), or unsigned on the fourth-root scale (v >= 0)."""
    blocks = _blocks(x if signed else jnp.sqrt(jnp.sqrt(x)))
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    scale = jnp.where(absmax > 0, absmax, 1.0)[:, None]
    if signed:
        codes = jnp.round(blocks / scale * 127).astype(jnp.int8)
    else:
        codes = jnp.round(blocks / scale * 255).astype(jnp.uint8)
    return QuantizedMoment(codes.reshape(-1)[: x.size].reshape(x.shape), absmax)


def decode(q: QuantizedMoment, signed: bool) -> jax.Array:
    codes = _blocks(q.codes)
    if signed:
        blocks = codes / 127.0 * q.absmax[:, None]
    else:
        blocks = jnp.maximum(codes, 0.5) / 255.0 * q.absmax[:, None]
        blocks = jnp.square(jnp.square(blocks))
    return blocks.reshape(-1)[: q.codes.size].reshape(q.codes.shape)


class ScaleByAdamState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adam(state_dtype: str = "float32", b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
                  ) -> optax.GradientTransformation:
    """Adam's scaling with moments stored as `state_dtype` (see the module docstring)."""
    if state_dtype == "float32":
        return optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"config.optimizer_state_dtype: {state_dtype!r} is not one of {STATE_DTYPES}")

    if state_dtype == "bfloat16":
        def store(x, signed):
            return x.astype(jnp.bfloat16)

        def load(x, signed):
            return x.astype(jnp.float32)
    else:
        store, load = encode, decode

    def is_leaf(x):
        return isinstance(x, QuantizedMoment)

    def init(params):
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        return ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=jax.tree.map(lambda z: store(z, True), zeros),
                                nu=jax.tree.map(lambda z: store(z, False), zeros))

    def update(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda g, m: b1 * load(m, True) + (1 - b1) * g.astype(jnp.float32), updates, state.mu,
                          is_leaf=is_leaf)
        nu = jax.tree.map(lambda g, v: b2 * load(v, False) + (1 - b2) * jnp.square(g.astype(jnp.float32)),
                          updates, state.nu, is_leaf=is_leaf)
        count = optax.safe_increment(state.count)
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)
        out = jax.tree.map(lambda g, m, v: (m / (jnp.sqrt(v) + eps)).astype(g.dtype), updates, mu_hat, nu_hat)
        return out, ScaleByAdamState(count=count, mu=jax.tree.map(lambda m: store(m, True), mu),
                                     nu=jax.tree.map(lambda v: store(v, False), nu))

    return optax.GradientTransformation(init, update)
