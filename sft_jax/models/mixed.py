"""bfloat16 matmuls that accumulate in float32, forward and backward.

A plain bfloat16 x bfloat16 -> bfloat16 dot (what `nnx.Linear(dtype=bfloat16)` and its autodiff transposes
emit) runs no faster than float32 on CPU, while the same dot with a float32 result (`preferred_element_type`)
takes the native bfloat16 path (AMX / AVX512-BF16 on x86, tensor cores on GPU): several times faster in
experiments/benchmarks, and more accurate. `dot_general` below is that dot for `nnx.Linear`, with a custom
VJP so that the two backward matmuls take the same path instead of the plain bfloat16 transposes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32


def _linear_dims(ndim: int):
    return (((ndim - 1,), (0,)), ((), ()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def linear_dot(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """x [..., K] @ w [K, N], accumulated in float32, returned in `out_dtype` (default: x's dtype)."""
    out = lax.dot_general(x, w, _linear_dims(x.ndim), preferred_element_type=_F32)
    return out.astype(out_dtype or x.dtype)


def _fwd(x, w, out_dtype):
    return linear_dot(x, w, out_dtype), (x, w)


def _bwd(out_dtype, res, g):
    x, w = res
    g = g.astype(x.dtype)  # the incoming gradient in the compute dtype, as for any bfloat16 activation
    dx = lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())), preferred_element_type=_F32)
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dw = lax.dot_general(x2, g2, (((0,), (0,)), ((), ())), preferred_element_type=_F32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


linear_dot.defvjp(_fwd, _bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """Drop-in `dot_general` for `nnx.Linear`: the float32-accumulating path for bfloat16 linear layers,
    `lax.dot_general` for anything else."""
    if (lhs.dtype == jnp.bfloat16 and rhs.dtype == jnp.bfloat16 and rhs.ndim == 2 and preferred_element_type is None
            and tuple(map(tuple, dimension_numbers[0])) == ((lhs.ndim - 1,), (0,)) and not dimension_numbers[1][0]):
        return linear_dot(lhs, rhs)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type, **kwargs)


def linear_kwargs(dtype) -> dict:
    """Extra `nnx.Linear` arguments for a compute dtype: the float32-accumulating dot for bfloat16."""
    return {"dot_general": dot_general} if jnp.dtype(dtype) == jnp.bfloat16 else {}
