"""A linear layer's two backward dots: old: independent (XLA:CPU may run dx and dW at the same time, each
with the whole thread pool); seq: dW waits for dx (an optimization barrier ties its operands to dx);
seq_w: dx waits for dW."""
from jax import lax

import sft_jax.models.mixed as mixed

_ORIG = mixed._input_and_weight_grads


def _seq(x, w, g):
    g = g.astype(x.dtype)
    dx = lax.dot_general(g, w.astype(x.dtype), (((g.ndim - 1,), (1,)), ((), ())), preferred_element_type=mixed._F32)
    dx, x, g = lax.optimization_barrier((dx, x, g))
    return dx.astype(x.dtype), mixed._weight_grad(x, g)


def _seq_w(x, w, g):
    g = g.astype(x.dtype)
    dw = mixed._weight_grad(x, g)
    dw, g, w = lax.optimization_barrier((dw, g, w))
    dx = lax.dot_general(g, w.astype(x.dtype), (((g.ndim - 1,), (1,)), ((), ())), preferred_element_type=mixed._F32)
    return dx.astype(x.dtype), dw


def apply(variant: str) -> None:
    mixed._input_and_weight_grads = {"old": _ORIG, "new": _ORIG, "seq": _seq, "seq_w": _seq_w}[variant]
