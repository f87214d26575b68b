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
A large tensor is updated a chunk of whole blocks at a time (`CHUNK_VALUES`, see `_chunked`), so the float32
moments alive at once are one chunk's, not the model's; the update overwrites the gradient in place.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

STATE_DTYPES = ("float32", "bfloat16", "int8")
BLOCK = 256
# Values of a tensor updated at once (a chunk of layers, rows or block columns, at least one): bounds the
# float32 temporaries of the bfloat16 / int8 update.
CHUNK_VALUES = 1 << 24


class QuantizedMoment(NamedTuple):
    codes: jax.Array  # the parameter's shape; int8 (m) or uint8 (v)
    absmax: jax.Array  # float32 [number of blocks]


def _blocks(x: jax.Array) -> jax.Array:
    """Float32 blocks of `BLOCK` consecutive values of the flattened `x` (zero-padded at the end). Where the
    last axis is whole blocks, the same blocks in the same order keep the leading axes ([..., n, BLOCK]), so a
    tensor sharded along any axis is cut into blocks where it lies, without gathering it."""
    if x.ndim and x.shape[-1] % BLOCK == 0:
        return x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK).astype(jnp.float32)
    flat = x.reshape(-1).astype(jnp.float32)
    return jnp.pad(flat, (0, -flat.size % BLOCK)).reshape(-1, BLOCK)


def _unblocks(blocks: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    if blocks.ndim > 2 or (shape and shape[-1] % BLOCK == 0):
        return blocks.reshape(shape)
    return blocks.reshape(-1)[: int(np.prod(shape, dtype=np.int64))].reshape(shape)


def encode(x: jax.Array, signed: bool) -> QuantizedMoment:
    """8-bit codes of a moment: signed linear (m), or unsigned on the fourth-root scale (v >= 0)."""
    blocks = _blocks(x if signed else jnp.sqrt(jnp.sqrt(x)))
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    scale = jnp.where(absmax > 0, absmax, 1.0)[..., None]
    if signed:
        codes = jnp.round(blocks / scale * 127).astype(jnp.int8)
    else:
        codes = jnp.round(blocks / scale * 255).astype(jnp.uint8)
    return QuantizedMoment(_unblocks(codes, x.shape), absmax.reshape(-1))


def decode(q: QuantizedMoment, signed: bool) -> jax.Array:
    codes = _blocks(q.codes)
    absmax = q.absmax.reshape(codes.shape[:-1])[..., None]
    if signed:
        blocks = codes / 127.0 * absmax
    else:
        blocks = jnp.maximum(codes, 0.5) / 255.0 * absmax
        blocks = jnp.square(jnp.square(blocks))
    return _unblocks(blocks, q.codes.shape)


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

    def step(g, m, v, count):
        """One tensor's (or one chunk's) update and moments."""
        mu = b1 * load(m, True) + (1 - b1) * g.astype(jnp.float32)
        nu = b2 * load(v, False) + (1 - b2) * jnp.square(g.astype(jnp.float32))
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)
        return (mu_hat / (jnp.sqrt(nu_hat) + eps)).astype(g.dtype), store(mu, True), store(nu, False)

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        new = jax.tree.map(lambda g, m, v: _chunked(step, g, m, v, count), updates, state.mu, state.nu,
                           is_leaf=is_leaf)
        out, mu, nu = (jax.tree.map(lambda t, i=i: t[i], new, is_leaf=lambda t: isinstance(t, tuple)
                                    and not is_leaf(t)) for i in range(3))
        return out, ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def _viewed(moment, shape: tuple[int, ...]):
    """A stored moment with its absmaxes (if 8-bit) laid out as `shape`: one per block of the parameter's rows."""
    if isinstance(moment, QuantizedMoment):
        return QuantizedMoment(moment.codes, moment.absmax.reshape(shape))
    return moment


def _chunking(shape: tuple[int, ...]) -> tuple[int, int, tuple[int, ...]] | None:
    """How a tensor is updated in chunks: (axis, chunk length along it, the absmaxes' shape that slices with
    it), or None for one piece. Chunks are whole blocks: a stack of layers (3 or more axes) is cut along its
    layers; a matrix along its longer axis (an embedding table's or LM head's vocabulary), by rows or by
    columns of whole blocks."""
    size = int(np.prod(shape, dtype=np.int64))
    if size <= CHUNK_VALUES or len(shape) < 2 or shape[-1] % BLOCK:
        return None
    axis = 0 if len(shape) > 2 or shape[0] >= shape[1] else 1
    unit = BLOCK if axis == len(shape) - 1 else 1  # a chunk of the last axis is whole blocks
    units, per_unit = shape[axis] // unit, size // shape[axis] * unit
    count = max(d for d in range(1, units + 1) if units % d == 0 and (d == 1 or d * per_unit <= CHUNK_VALUES))
    if count == units:
        return None
    view = (shape[0], -1) if axis == 0 else (shape[0], shape[1] // BLOCK)
    return axis, count * unit, view


def _chunked(step, g, m, v, count):
    """`step` on a tensor, one chunk of whole blocks at a time where it is large (`_chunking`): the float32
    moments and update of one chunk are all that is alive at once, rather than the whole model's. The update is
    written over the gradient and the new moments over the old ones, in place. Blocks never straddle chunks, so
    the moments are those of one step on the whole tensor. Chunks follow an axis that FSDP does not shard (a
    stack's layers, the vocabulary), so each device updates its own shard of every chunk."""
    plan = _chunking(g.shape)
    if plan is None:
        return step(g, m, v, count)
    axis, length, view = plan
    blocks_per = length // BLOCK if axis == g.ndim - 1 else length

    def body(i, carry):
        g_all, m_all, v_all = carry

        def cut(x, n):
            return jax.lax.dynamic_slice_in_dim(x, i * n, n, axis)

        part_g = cut(g_all, length)
        part_m, part_v = (jax.tree.map(cut, x, type(x)(length, blocks_per) if isinstance(x, QuantizedMoment)
                                       else length) for x in (m_all, v_all))
        out, m_new, v_new = step(part_g, _viewed(part_m, (-1,)), _viewed(part_v, (-1,)), count)
        part_view = (part_g.shape[0], -1)

        def put(x, y, n):
            return jax.lax.dynamic_update_slice_in_dim(x, y, i * n, axis)

        m_all, v_all = (jax.tree.map(put, old, _viewed(new, part_view), type(old)(length, blocks_per)
                                     if isinstance(old, QuantizedMoment) else length)
                        for old, new in ((m_all, m_new), (v_all, v_new)))
        return put(g_all, out, length), m_all, v_all

    steps = g.shape[axis] // length
    out, m, v = jax.lax.fori_loop(0, steps, body, (g, _viewed(m, view), _viewed(v, view)))
    return out, _viewed(m, (-1,)), _viewed(v, (-1,))
