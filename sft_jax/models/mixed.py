"""Linear-layer matmuls with a hand-written backward pass: float32 accumulation for bfloat16, and weight
gradients laid out so that XLA:CPU runs them on its fast paths.

A plain bfloat16 x bfloat16 -> bfloat16 dot (what `nnx.Linear(dtype=bfloat16)` and its autodiff transposes
emit) runs no faster than float32 on CPU, while the same dot with a float32 result (`preferred_element_type`)
takes the native bfloat16 path (AMX / AVX512-BF16 on x86, tensor cores on GPU): faster, and more accurate.
`dot_general` below is that dot for `nnx.Linear`, with a custom VJP so that the two backward matmuls take the
same path instead of the plain bfloat16 transposes.

float32 layers use the same custom VJP. Under autodiff, XLA fuses the elementwise producer of a layer's
output gradient (SwiGLU's backward, say) with the transpose its weight-gradient dot wants, and that fused
loop writes with a stride of one row, far below memory bandwidth for a [1536, 1024] result. Written as its
own dot in the backward pass, the gradient stays in row order and the transpose is a plain copy
(measurements: experiments/benchmarks/notes.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.ad_checkpoint import checkpoint_name

# The name of every projection's output, for remat policies that keep them (models/remat.py).
PROJECTION = "projection"

_F32 = jnp.float32


def _linear_dims(ndim: int):
    return (((ndim - 1,), (0,)), ((), ()))


def _weight_grad(x: jax.Array, g: jax.Array) -> jax.Array:
    """x [..., K], g [..., N] -> x^T g [K, N] in float32.

    bfloat16: every leading axis contracted as it stands, not one [rows, K]^T @ [rows, N] product: XLA:CPU
    runs that transposed-operand bfloat16 dot by converting both operands to float32 (~150 GFLOP/s on 2
    cores), while contracting the batch and length axes in place keeps the native bfloat16 path (300-700
    GFLOP/s; `experiments/benchmarks/notes.md`). float32: the flattened product, the faster one there."""
    if x.dtype != jnp.bfloat16:
        x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        return lax.dot_general(x2, g2, (((0,), (0,)), ((), ())), preferred_element_type=_F32)
    if x.ndim == 2:  # one leading axis: give the dot the same two-axis contraction
        x, g = x[None], g[None]
    lead = tuple(range(x.ndim - 1))
    return lax.dot_general(x, g, ((lead, lead), ((), ())), preferred_element_type=_F32)


def _input_and_weight_grads(x: jax.Array, w: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """dx (in x's dtype) and dW (float32) of x @ w for the output gradient g, both dots accumulating in float32."""
    g = g.astype(x.dtype)  # the incoming gradient in the compute dtype, as for any bfloat16 activation
    dx = lax.dot_general(g, w.astype(x.dtype), (((g.ndim - 1,), (1,)), ((), ())), preferred_element_type=_F32)
    return dx.astype(x.dtype), _weight_grad(x, g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def linear_dot(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """x [..., K] @ w [K, N], accumulated in float32, returned in `out_dtype` (default: x's dtype)."""
    out = lax.dot_general(x, w, _linear_dims(x.ndim), preferred_element_type=_F32)
    return out.astype(out_dtype or x.dtype)


def _fwd(x, w, out_dtype):
    return linear_dot(x, w, out_dtype), (x, w)


def _bwd(out_dtype, res, g):
    x, w = res
    dx, dw = _input_and_weight_grads(x, w, g)
    return dx, dw.astype(w.dtype)


linear_dot.defvjp(_fwd, _bwd)


def _bias_grad(g: jax.Array) -> jax.Array:
    """The bias gradient, summed in float32: a bfloat16 sum over batch x length rows is both less accurate
    and, on XLA:CPU, several times slower (it becomes a pairwise reduce-window)."""
    return jnp.sum(g.astype(_F32), axis=tuple(range(g.ndim - 1)))


@jax.custom_vjp
def linear_bias_dot(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """x [..., K] @ w [K, N] + b [N] (b float32), accumulated and biased in float32, returned in x's dtype."""
    out = lax.dot_general(x, w.astype(x.dtype), _linear_dims(x.ndim), preferred_element_type=_F32)
    return (out + b.astype(_F32)).astype(x.dtype)


def _bias_fwd(x, w, b):
    return linear_bias_dot(x, w, b), (x, w, b)  # w, b: the parameters themselves (no copy kept)


def _bias_bwd(res, g):
    x, w, b = res
    dx, dw = _input_and_weight_grads(x, w, g)
    return dx, dw.astype(w.dtype), _bias_grad(g).astype(b.dtype)


linear_bias_dot.defvjp(_bias_fwd, _bias_bwd)


class Linear(nnx.Linear):
    """`nnx.Linear` whose bfloat16 layers add their bias in float32 inside the float32-accumulating dot.

    The same parameters and the same float32 computation as `nnx.Linear`; in bfloat16 the output is
    rounded once, after the bias, and the bias gradient is summed in float32 (see `_bias_grad`)."""

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        if (self.bias is None or out_sharding is not None or self.preferred_element_type is not None
                or self.dtype is None or jnp.dtype(self.dtype) != jnp.bfloat16):
            return super().__call__(inputs, out_sharding)
        return checkpoint_name(linear_bias_dot(inputs.astype(self.dtype), self.kernel[...], self.bias[...]), PROJECTION)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """Drop-in `dot_general` for `nnx.Linear`: `linear_dot` for a bfloat16 or float32 layer's x @ kernel
    (default precision, no output sharding), `lax.dot_general` for anything else. The output is named
    `PROJECTION` for the remat policies that keep projections (`sft_jax.models.remat`)."""
    if (lhs.dtype == rhs.dtype and lhs.dtype in (jnp.bfloat16, jnp.float32) and rhs.ndim == 2
            and preferred_element_type is None and precision is None and kwargs.get("out_sharding") is None
            and tuple(map(tuple, dimension_numbers[0])) == ((lhs.ndim - 1,), (0,)) and not dimension_numbers[1][0]):
        return checkpoint_name(linear_dot(lhs, rhs), PROJECTION)
    return checkpoint_name(lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                           preferred_element_type=preferred_element_type, **kwargs), PROJECTION)


def linear_kwargs(dtype) -> dict:
    """Extra `nnx.Linear` arguments for a compute dtype: `dot_general` above for bfloat16 and float32."""
    return {"dot_general": dot_general} if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float32) else {}
