"""Dropout masks from a counter-based hash: cheap on CPU, and the same under any sharding.

`jax.random.bernoulli` draws threefry bits: 20 rounds of 64-bit mixing per pair of words, a visible share of a
small encoder's train step on CPU (experiments/benchmarks/notes.md). Dropout needs far less: bits that look independent
across positions and keys. Here each element's 32 bits are a hash of its global index and the key's two words:
two rounds of murmur3's 32-bit finaliser (a bijection with full avalanche), a dozen integer ops per element.
The index comes from iotas over the array's own dimensions, so every element's bit is a function of its position
only: a sharded array gets exactly the mask of the unsharded one (`jax.random`'s `rbg` generator, the other cheap
option, promises no such thing). Keys still come from `jax.random` (`fold_in` / `split` on scalars), so the
per-step, per-layer key schedule is unchanged.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

_U32 = jnp.uint32


def _fmix32(x: jax.Array) -> jax.Array:
    """murmur3's finaliser: a bijection on uint32 where every input bit flips each output bit with p ~ 1/2."""
    x = x ^ (x >> 16)
    x = x * _U32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * _U32(0xC2B2AE35)
    return x ^ (x >> 16)


def hash_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 bits of `shape`, a pure function of (key, each element's row-major index)."""
    size = math.prod(shape)
    if size >= 2**32:
        raise ValueError(f"hash_bits: {shape} has {size} elements; at most 2**32 - 1 are indexed")
    words = jax.random.key_data(key).reshape(-1).astype(_U32)
    k0, k1 = words[0], words[-1] ^ _U32(0x9E3779B9)
    index = jnp.zeros(shape, _U32)
    stride = 1
    for dim in reversed(range(len(shape))):
        index = index + lax.broadcasted_iota(_U32, shape, dim) * _U32(stride)
        stride *= shape[dim]
    x = _fmix32(index * _U32(0x9E3779B1) + k0)  # odd multiplier: distinct indices stay distinct
    return _fmix32(x ^ k1)


def keep_mask(key: jax.Array, keep_prob: float, shape: tuple[int, ...]) -> jax.Array:
    """Boolean mask, True with probability `keep_prob` (to within 2**-32) for each element."""
    threshold = min(int(round((1.0 - keep_prob) * 2.0**32)), 2**32 - 1)
    return hash_bits(key, shape) >= _U32(threshold)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when there is no key or nothing to drop."""
    if key is None or rate == 0.0:
        return x
    keep = keep_mask(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)
