"""old: float32 layers on plain autodiff (`mixed.linear_kwargs` only for bfloat16); new: through linear_dot."""
import jax.numpy as jnp

import sft_jax.models.bert as bert
import sft_jax.models.decoder as dec
import sft_jax.models.mixed as mixed

_NEW = mixed.linear_kwargs


def _old(dtype):
    return {"dot_general": mixed.dot_general} if jnp.dtype(dtype) == jnp.bfloat16 else {}


def apply(variant: str) -> None:
    dec.linear_kwargs = bert.linear_kwargs = {"old": _old, "new": _NEW}[variant]
