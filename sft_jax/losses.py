"""Pure loss functions `(model, batch, rng) -> (loss, aux)`; aux holds sums for metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def classification_loss(model, batch: dict, rng: jax.Array | None) -> tuple[jax.Array, dict]:
    """Mean cross-entropy of a text classifier over real examples (batch["weights"] is 0 on padding rows)."""
    logits = model(batch["input_ids"], batch["attention_mask"], dropout_rng=rng)
    return _classification(logits.astype(jnp.float32), batch)


def image_classification_loss(model, batch: dict, rng: jax.Array | None) -> tuple[jax.Array, dict]:
    """`classification_loss` of an image classifier (batch["pixel_values"])."""
    return _classification(model(batch["pixel_values"], dropout_rng=rng).astype(jnp.float32), batch)


def _classification(logits: jax.Array, batch: dict) -> tuple[jax.Array, dict]:
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


def lm_loss(model, batch: dict, rng: jax.Array | None) -> tuple[jax.Array, dict]:
    """Next-token cross-entropy averaged over target tokens (batch["loss_mask"] == 1).

    The batch is already shifted (`targets[t]` is the token after `input_ids[t]`), so packed rows and
    prompt masks need nothing here. A batch without target tokens is an error upstream, not a NaN here:
    the count is clamped to 1 so such a batch contributes zero loss and zero gradient.
    """
    if "target_index" not in batch:  # a hand-made batch: score every position
        logits = model(batch["input_ids"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                       dropout_rng=rng)
        targets, weights = batch["targets"], batch["loss_mask"]
    else:  # vocabulary logits only at the target positions (see data.lm.add_target_index)
        hidden, _ = model.hidden(batch["input_ids"], segment_ids=batch["segment_ids"],
                                 positions=batch["positions"], dropout_rng=rng)
        index = batch["target_index"]
        hidden = jnp.take_along_axis(hidden, index[..., None], axis=1)
        logits = model.logits(hidden)
        targets, weights = jnp.take_along_axis(batch["targets"], index, axis=1), batch["target_weight"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    count = jnp.sum(weights)
    loss_sum = jnp.sum(ce * weights)
    # A token is correct when its target's logit is the largest: argmax == target, except that a target tied
    # for the maximum counts. Not argmax itself: XLA:CPU runs that (value, index) reduction over the
    # vocabulary on one thread; a max is a plain parallel reduce.
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = jnp.sum((target_logit >= jnp.max(logits, axis=-1)) * weights)
    return loss_sum / jnp.maximum(count, 1.0), {"loss_sum": loss_sum, "correct": correct, "count": count}


def simcse_loss(model, batch: dict, rng: jax.Array | None, temperature: float = 0.05) -> tuple[jax.Array, dict]:
    """Unsupervised SimCSE (Gao et al. 2021): each sentence embedded twice under different dropout is its own
    positive, the other sentences of the batch are negatives. A sentence encoder's pre-training-like objective
    on unlabelled text (all-MiniLM-L6-v2 was trained contrastively); `model.embed` is the mean-pooled encoder."""
    if rng is None:
        raise ValueError("simcse_loss needs a dropout key: the two views differ only by dropout")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    a = model.embed(ids, mask, dropout_rng=jax.random.fold_in(rng, 0))
    b = model.embed(ids, mask, dropout_rng=jax.random.fold_in(rng, 1))
    a = a / jnp.linalg.norm(a, axis=-1, keepdims=True)
    b = b / jnp.linalg.norm(b, axis=-1, keepdims=True)
    weights = batch["weights"]
    # Padding rows are neither anchors nor negatives.
    logits = jnp.where(weights[None, :] > 0, a @ b.T / temperature, -1e9)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(ids.shape[0]))
    count = jnp.sum(weights)
    loss_sum = jnp.sum(ce * weights)
    return loss_sum / jnp.maximum(count, 1.0), {"loss_sum": loss_sum, "count": count}
