"""Quantised frozen base weights for QLoRA (Dettmers et al., 2023): int8 and 4-bit NormalFloat (NF4).

A frozen [in, out] kernel is cut into blocks of `block` consecutive input rows (64, or the largest divisor of
`in` below it) per output column, and each block is stored relative to its absolute maximum:

- `int8`: round(127 w / absmax), the block absmaxes kept in float32: 8.5 bits per weight.
- `nf4`: the index (4 bits, two per byte) of the nearest of the 16 NormalFloat levels (quantiles of a
  normal distribution, exact 0 and +-1) to w / absmax; the absmaxes themselves quantised to 8 bits ("double
  quantisation": per output column, a float32 step, rounded up so that no weight leaves [-1, 1]):
  4 + 8/64 + 32/in bits per weight (4.13 for a 4096-row kernel, 4.18 for a 576-row one). The paper
  quantises the absmaxes to 8-bit floats in blocks of 256; one step per column keeps every array sharded like
  the kernel.

`QuantizedKernel` holds one such kernel as parameters (`codes`, `absmax`, and for NF4 `absmax_step`), each
with the kernel's logical axes, so it is laid out over the mesh as the kernel would be. `matmul` dequantises
inside a custom VJP whose backward pass dequantises again: the residuals are the quantised arrays, so no
full-precision copy of a layer's weight outlives its use.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sft_jax.sharding import logical

KINDS = ("int8", "nf4")
QUANTIZED = ("/codes", "/absmax", "/absmax_step")  # the endings of a QuantizedKernel's parameter paths
BLOCK = 64
# The 16 NF4 levels (QLoRA, appendix E; as bitsandbytes).
NF4_LEVELS = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


def block_size(rows: int) -> int:
    return math.gcd(rows, BLOCK)


def quantize(w: jax.Array, kind: str) -> dict[str, jax.Array]:
    """The quantised arrays of a [in, out] kernel (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"config.quantize_base: {kind!r} is not one of {KINDS}")
    rows, cols = w.shape
    block = block_size(rows)
    blocks = w.astype(jnp.float32).reshape(rows // block, block, cols)
    absmax = jnp.maximum(jnp.max(jnp.abs(blocks), axis=1), jnp.finfo(jnp.float32).tiny)  # [in / block, out]
    if kind == "int8":
        codes = jnp.round(blocks / absmax[:, None] * 127).astype(jnp.int8).reshape(rows, cols)
        return {"codes": codes, "absmax": absmax}
    if cols % 2:
        raise ValueError(f"nf4 packs two weights per byte along the output: {cols} columns is odd")
    step = jnp.max(absmax, axis=0) / 255.0  # [out]
    absmax_q = jnp.clip(jnp.ceil(absmax / step), 1, 255).astype(jnp.uint8)
    scaled = blocks / (absmax_q.astype(jnp.float32) * step)[:, None]
    levels = jnp.asarray(NF4_LEVELS)
    index = jnp.searchsorted((levels[1:] + levels[:-1]) / 2, scaled).astype(jnp.uint8).reshape(rows, cols)
    codes = index[:, 0::2] | (index[:, 1::2] << 4)
    return {"codes": codes, "absmax": absmax_q, "absmax_step": step}


def count_weights(params: dict[str, jax.Array]) -> int:
    """How many of the model's weights `params` hold: a quantised kernel counts as the kernel it stands for
    (NF4 packs two codes per byte), its scales not at all."""
    total = 0
    for name, value in params.items():
        if name.endswith("/codes"):
            total += int(np.prod(value.shape)) * (2 if value.dtype == jnp.uint8 else 1)
        elif not name.endswith(QUANTIZED):
            total += int(np.prod(value.shape))
    return total


def dequantize(q: dict[str, jax.Array], kind: str, dtype=jnp.float32) -> jax.Array:
    """The [in, out] kernel the quantised arrays stand for, in `dtype`."""
    codes = q["codes"]
    if kind == "int8":
        rows, cols = codes.shape
        absmax = q["absmax"]
        values = codes.astype(jnp.float32) / 127
    else:
        rows, half = codes.shape
        cols = 2 * half
        index = jnp.stack([codes & 15, codes >> 4], axis=-1).reshape(rows, cols)
        values = jnp.asarray(NF4_LEVELS)[index]
        absmax = q["absmax"].astype(jnp.float32) * q["absmax_step"]
    block = block_size(rows)
    return (values.reshape(rows // block, block, cols) * absmax[:, None]).reshape(rows, cols).astype(dtype)


_quantize = jax.jit(quantize, static_argnums=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def matmul(x: jax.Array, q: dict[str, jax.Array], kind: str, dtype) -> jax.Array:
    """x [..., in] @ dequantize(q) in `dtype`, float32 accumulation, output in `dtype`."""
    return _matmul(x, dequantize(q, kind, dtype))


def _matmul(x, w):
    return jnp.einsum("...i,io->...o", x.astype(w.dtype), w, preferred_element_type=jnp.float32).astype(w.dtype)


def _fwd(x, q, kind, dtype):
    return matmul(x, q, kind, dtype), (q, jnp.zeros((0,), x.dtype))  # (an empty array carries x's dtype)


def _bwd(kind, dtype, res, g):
    q, like_x = res
    x_dtype = like_x.dtype
    w = dequantize(q, kind, dtype)  # again: the forward's copy is not kept
    dx = jnp.einsum("...o,io->...i", g.astype(dtype), w, preferred_element_type=jnp.float32).astype(x_dtype)
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0) if not jnp.issubdtype(a.dtype, jnp.floating)
                         else jnp.zeros_like(a), q)
    return dx, zeros


matmul.defvjp(_fwd, _bwd)


class QuantizedKernel(nnx.Module):
    """A frozen [in, out] kernel stored quantised (`quantize`), under the kernel's own path."""

    def __init__(self, kernel: nnx.Param, kind: str):
        value = kernel.value
        self.kind, self.shape = kind, tuple(value.shape)
        axes = kernel.get_metadata().get("out_sharding") or (None, None)
        self.axes = tuple(axes)
        for name, array in _quantize(value, kind).items():
            # codes and absmax are [rows or blocks, columns]: the kernel's axes; the NF4 step is per column.
            setattr(self, name, nnx.Param(array, **logical(*(axes if array.ndim == 2 else axes[1:]))))

    def arrays(self) -> dict[str, jax.Array]:
        names = ("codes", "absmax") + (("absmax_step",) if self.kind == "nf4" else ())
        return {n: getattr(self, n).value for n in names}

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequantize(self.arrays(), self.kind, dtype)

    def matmul(self, x: jax.Array, dtype) -> jax.Array:
        return matmul(x, self.arrays(), self.kind, jnp.dtype(dtype))

    def bytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in self.arrays().values())
