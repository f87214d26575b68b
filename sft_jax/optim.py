"""AdamW with a weight-decay mask, warmup then decay, and gradient clipping, from plain arguments."""

from __future__ import annotations

import re

import optax

from sft_jax import optim_states

# Biases and normalisation parameters are not decayed (as in BERT and most fine-tuning recipes).
NO_DECAY = re.compile(r"(^|/)bias$|(^|/)(scale|norm[^/]*)$|norm/")


def decay_mask(params: dict) -> dict:
    return {name: not NO_DECAY.search(name) for name in params}


def make_schedule(learning_rate: float, max_steps: int, warmup_steps: int, decay: str = "linear") -> optax.Schedule:
    """Linear warmup to `learning_rate`, then `decay` ("linear", "cosine" or "constant") to the end."""
    warmup_steps = min(warmup_steps, max_steps)
    rest = max(max_steps - warmup_steps, 1)
    if decay == "linear":
        after = optax.linear_schedule(learning_rate, 0.0, rest)
    elif decay == "cosine":
        after = optax.cosine_decay_schedule(learning_rate, rest)
    elif decay == "constant":
        after = optax.constant_schedule(learning_rate)
    else:
        raise ValueError(f"unknown schedule decay {decay!r}; expected linear, cosine or constant")
    if warmup_steps == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), after], [warmup_steps])


def resolve_warmup_steps(warmup_steps: int, warmup_ratio: float, max_steps: int) -> int:
    """Steps of linear warm-up: `warmup_ratio` of `max_steps` (rounded) when the ratio is set, else `warmup_steps`.
    A ratio follows `max_steps` when a run is shortened on the command line; a step count does not."""
    return int(round(warmup_ratio * max_steps)) if warmup_ratio else int(warmup_steps)


def long_warmup_warning(warmup_steps: int, warmup_ratio: float, max_steps: int) -> str | None:
    """One line when warm-up covers more than half of the run (the rate would peak late or never), else None."""
    steps = resolve_warmup_steps(warmup_steps, warmup_ratio, max_steps)
    if 2 * steps <= max_steps:
        return None
    peak = f"peaks at step {steps}" if steps < max_steps else "never reaches learning_rate"
    covers = f"warning: warm-up covers {min(steps, max_steps)} of the run's {max_steps} steps"
    if warmup_ratio:
        return (f"{covers} (config.warmup_ratio={warmup_ratio}): the learning rate {peak}; a smaller warmup_ratio "
                "(e.g. 0.06) leaves most of the run after the peak")
    return (f"{covers} (config.warmup_steps={steps}, config.max_steps={max_steps}): the learning rate {peak}; "
            "set config.warmup_ratio (e.g. 0.06, with warmup_steps=0) for a warm-up that follows max_steps")


def adamw(schedule: optax.Schedule, *, weight_decay: float = 0.01, clip_norm: float | None = 1.0,
          b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, state_dtype: str = "float32"
          ) -> optax.GradientTransformation:
    """Clip by global norm (of the trainable gradients), then AdamW with biases and norms undecayed; the
    moments stored as `state_dtype` (float32, bfloat16 or int8: `sft_jax.optim_states`)."""
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    if state_dtype == "float32":
        parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    else:  # optax.adamw's chain with the moments stored narrower
        parts += [optim_states.scale_by_adam(state_dtype, b1=b1, b2=b2, eps=eps),
                  optax.add_decayed_weights(weight_decay, decay_mask), optax.scale_by_learning_rate(schedule)]
    return optax.chain(*parts)
