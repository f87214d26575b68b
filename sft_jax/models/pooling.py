"""Pooling an encoder's hidden states [B, T, H] into one vector per example, the input of a classification head."""

from __future__ import annotations

import jax
import jax.numpy as jnp

POOLINGS = ("cls", "mean")  # the first token ([CLS]), or the mean of the tokens


def check_pooling(pooling: str) -> None:
    """Raises ValueError unless `pooling` is one of POOLINGS."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Mean of `hidden` [B, T, H] over positions where `attention_mask` [B, T] is 1, in float32."""
    mask = attention_mask.astype(jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * mask, axis=1)
    # Clamped like sentence-transformers, so an all-pad row gives zeros rather than NaN.
    return total / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)
