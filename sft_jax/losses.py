"""Pure loss functions `(model, batch, rng) -> (loss, aux)`; aux holds sums for metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def classification_loss(model, batch: dict, rng: jax.Array | None) -> tuple[jax.Array, dict]:
    """Mean cross-entropy over real examples (batch["weights"] is 0 on padding rows)."""
    logits = model(batch["input_ids"], batch["attention_mask"], dropout_rng=rng).astype(jnp.float32)
    labels, weights = batch["labels"], batch["weights"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    count = jnp.sum(weights)
    loss = jnp.sum(ce * weights) / jnp.maximum(count, 1.0)
    predictions = jnp.argmax(logits, axis=-1)
    aux = {
        "loss_sum": jnp.sum(ce * weights),
        "correct": jnp.sum((predictions == labels) * weights),
        "count": count,
        "predictions": predictions,
        "probs": jax.nn.softmax(logits, axis=-1),
    }
    return loss, aux
