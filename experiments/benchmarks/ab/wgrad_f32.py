"""float32 weight gradients x^T g: old: one flattened [rows, K]^T @ [rows, N] dot; t: x transposed to [K, rows]
first (an optimization barrier keeps XLA from folding the transpose back into the dot); lead: batch and length
contracted as two axes where they stand (the bfloat16 form)."""
import jax.numpy as jnp
from jax import lax

import sft_jax.models.mixed as mixed

_ORIG = mixed._weight_grad


def _t(x, g):
    if x.dtype == jnp.bfloat16:
        return _ORIG(x, g)
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    return lax.dot_general(lax.optimization_barrier(x2.T), g2, (((1,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)


def _lead(x, g):
    if x.ndim == 2:
        x, g = x[None], g[None]
    lead = tuple(range(x.ndim - 1))
    return lax.dot_general(x, g, ((lead, lead), ((), ())), preferred_element_type=jnp.float32)


def apply(variant: str) -> None:
    mixed._weight_grad = {"old": _ORIG, "new": _ORIG, "t": _t, "lead": _lead}[variant]
