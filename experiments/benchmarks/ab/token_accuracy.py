"""old: lm_loss's token accuracy as argmax == target; new: target logit >= max (`losses.lm_loss`)."""
import jax.numpy as jnp
import optax

import sft_jax.losses as losses
from experiments.benchmarks import ours

_NEW = losses.lm_loss


def _old(model, batch, rng):  # the benchmark's batches score every position (no target_index)
    logits = model(batch["input_ids"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                   dropout_rng=rng)
    targets, weights = batch["targets"], batch["loss_mask"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    count = jnp.sum(weights)
    loss_sum = jnp.sum(ce * weights)
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * weights)
    return loss_sum / jnp.maximum(count, 1.0), {"loss_sum": loss_sum, "correct": correct, "count": count}


def apply(variant: str) -> None:
    ours.lm_loss = {"old": _old, "new": _NEW}[variant]
