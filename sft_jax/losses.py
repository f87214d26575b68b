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


def lm_loss(model, batch: dict, rng: jax.Array | None, *, chunk: int = 0) -> tuple[jax.Array, dict]:
    """Next-token cross-entropy averaged over target tokens (batch["loss_mask"] == 1).

    The batch is already shifted (`targets[t]` is the token after `input_ids[t]`), so packed rows and
    prompt masks need nothing here. A batch without target tokens is an error upstream, not a NaN here:
    the count is clamped to 1 so such a batch contributes zero loss and zero gradient.

    With `chunk` > 0 the vocabulary logits are computed `chunk` target positions per row at a time (a scan whose
    body is rematerialised), so that only [batch, chunk, vocab] float32 logits are ever alive, in the forward
    and the backward pass, instead of [batch, targets, vocab]: what a 128k-256k vocabulary needs. The sums are
    the same; the gradient equal within float32 rounding.
    """
    if "target_index" not in batch:  # a hand-made batch: score every position
        targets, weights = batch["targets"], batch["loss_mask"].astype(jnp.float32)
        if not chunk:
            logits = model(batch["input_ids"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                           dropout_rng=rng)
            loss_sum, correct = _sums(logits, targets, weights)
            count = jnp.sum(weights)
            return loss_sum / jnp.maximum(count, 1.0), {"loss_sum": loss_sum, "correct": correct, "count": count}
        hidden, _ = model.hidden(batch["input_ids"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                                 dropout_rng=rng)
    else:  # vocabulary logits only at the target positions (see data.lm.add_target_index)
        hidden, _ = model.hidden(batch["input_ids"], segment_ids=batch["segment_ids"],
                                 positions=batch["positions"], dropout_rng=rng)
        index = batch["target_index"]
        hidden = jnp.take_along_axis(hidden, index[..., None], axis=1)
        targets, weights = jnp.take_along_axis(batch["targets"], index, axis=1), batch["target_weight"]
    weights = weights.astype(jnp.float32)
    if chunk and hidden.shape[1] > chunk:
        loss_sum, correct = _chunked_sums(model, hidden, targets, weights, chunk)
    else:
        loss_sum, correct = _sums(model.logits(hidden), targets, weights)
    count = jnp.sum(weights)
    return loss_sum / jnp.maximum(count, 1.0), {"loss_sum": loss_sum, "correct": correct, "count": count}


def _sums(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted cross-entropies, weighted count of tokens whose target has the largest logit)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    # A token is correct when its target's logit is the largest: argmax == target, except that a target tied
    # for the maximum counts. Not argmax itself: XLA:CPU runs that (value, index) reduction over the
    # vocabulary on one thread; a max is a plain parallel reduce.
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(ce * weights), jnp.sum((target_logit >= jnp.max(logits, axis=-1)) * weights)


def _chunked_sums(model, hidden: jax.Array, targets: jax.Array, weights: jax.Array, chunk: int
                  ) -> tuple[jax.Array, jax.Array]:
    """`_sums` over [B, chunk] slices of the target positions, one at a time. The chunks split the position
    axis, not the batch, so a batch sharded over the mesh stays sharded; padding positions weigh 0."""
    b, t, h = hidden.shape
    pad = -t % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets, weights = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(weights, ((0, 0), (0, pad)))
    n = (t + pad) // chunk

    def split(x):  # [B, n * chunk, ...] -> [n, B, chunk, ...]
        return jnp.swapaxes(x.reshape(b, n, chunk, *x.shape[2:]), 0, 1)

    @jax.checkpoint  # the backward pass recomputes each chunk's logits rather than keeping them all
    def body(totals, xs):
        h_chunk, t_chunk, w_chunk = xs
        sums = _sums(model.logits(h_chunk), t_chunk, w_chunk)
        return (totals[0] + sums[0], totals[1] + sums[1]), None

    zero = jnp.zeros((), jnp.float32)
    (loss_sum, correct), _ = jax.lax.scan(body, (zero, zero), (split(hidden), split(targets), split(weights)))
    return loss_sum, correct


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
