"""Per-group learning rates and unfreeze steps: layer-wise LR decay (LLRD), gradual unfreezing, LP-FT.

The strategy's label tree says which parameters may learn at all; this module refines its trainable label
into groups ("head", "layer5", ..., "layer0", "embeddings", "other") and gives each group

- a learning-rate multiplier (LLRD: `decay ** depth`, depth 0 for the head, 1 for the top block, ...,
  num_layers + 1 for the embeddings; ULMFiT's discriminative fine-tuning, ELECTRA/BEiT's layer decay), and
- a start step (gradual unfreezing: the top block group at `every`, the next one at `2 * every`, ...;
  LP-FT: the head from step 0, everything else from `head_steps`).

The optimizer is one `optax.partition` over the groups, each an AdamW on its own scaled schedule wrapped in
`delayed(start)`: before its start a group gets zero updates and its optimizer state (moments, counts) is
held, so it begins fresh, as a newly unfrozen parameter does in ULMFiT. Clipping is by the global norm of all
trainable gradients, as without groups. The train step is compiled once per phase (a distinct set of started
groups), with only that phase's groups differentiated, so a head-only phase costs a head-only step.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sft_jax import optim
from sft_jax.strategies import FROZEN, ParamLayout

HEAD, EMBEDDINGS, OTHER = "head", "embeddings", "other"


@dataclasses.dataclass(frozen=True)
class Group:
    """A learning-rate multiplier and the step from which the group learns."""

    lr_scale: float = 1.0
    start: int = 0


def group_of(name: str, layout: ParamLayout) -> str:
    """The group of a parameter path: head, layer<i>, embeddings or other."""
    if re.search("^" + layout.head, name):
        return HEAD
    match = re.search("^" + layout.layer.format(i=r"(\d+)"), name)
    if match:
        return f"layer{int(match.group(1))}"
    if re.search("^" + layout.embeddings, name):
        return EMBEDDINGS
    return OTHER


def depth(group: str, num_layers: int) -> int:
    """Distance from the output: head 0 (and parameters outside the layout), top block 1, embeddings L+1."""
    if group.startswith("layer"):
        return num_layers - int(group[len("layer"):])
    return num_layers + 1 if group == EMBEDDINGS else 0


def plan_groups(layout: ParamLayout, *, llrd: float = 1.0, unfreeze_every: int = 0, unfreeze_blocks: int = 1,
                lp_steps: int = 0) -> dict[str, Group]:
    """Multiplier and start step of every group of `layout`.

    llrd: multiplier `llrd ** depth`. unfreeze_every: gradual unfreezing top-down, `unfreeze_blocks` blocks
    per stage, one stage every `unfreeze_every` steps (embeddings with the stage after the bottom block).
    lp_steps: LP-FT, the head alone for that many steps, then everything.
    """
    if unfreeze_every and lp_steps:
        raise ValueError("gradual unfreezing and LP-FT both set the unfreeze steps; use one of them")
    n = layout.num_layers
    plan = {}
    for group in [HEAD, OTHER, EMBEDDINGS] + [f"layer{i}" for i in range(n)]:
        d = depth(group, n)
        start = 0
        if unfreeze_every and d > 0:
            start = ((d - 1) // unfreeze_blocks + 1) * unfreeze_every
        elif lp_steps and group != HEAD:
            start = lp_steps
        plan[group] = Group(lr_scale=float(llrd) ** d, start=start)
    return plan


def group_labels(labels: Mapping[str, str], layout: ParamLayout) -> dict[str, str]:
    """The strategy's labels with each trainable parameter relabelled by its group (frozen stays frozen)."""
    return {name: label if label == FROZEN else group_of(name, layout) for name, label in labels.items()}


class DelayedState(NamedTuple):
    count: jax.Array
    inner: optax.OptState


def delayed(inner: optax.GradientTransformation, start: int) -> optax.GradientTransformation:
    """`inner` from step `start` on; before, zero updates and `inner`'s state held (so it starts fresh)."""

    def init(params):
        return DelayedState(count=jnp.zeros([], jnp.int32), inner=inner.init(params))

    def update(updates, state, params=None):
        active = state.count >= start
        new_updates, new_inner = inner.update(updates, state.inner, params)
        new_updates = jax.tree.map(lambda u: jnp.where(active, u, jnp.zeros_like(u)), new_updates)
        new_inner = jax.tree.map(lambda n, o: jnp.where(active, n, o), new_inner, state.inner)
        return new_updates, DelayedState(count=optax.safe_increment(state.count), inner=new_inner)

    return optax.GradientTransformation(init, update)


def group_schedule(schedule: optax.Schedule, group: Group, warmup_steps: int,
                   head_ratio: float = 1.0, lp_steps: int = 0) -> optax.Schedule:
    """The learning rate of a group, as a function of its own step count (0 at its start).

    The global schedule shifted to the group's start and scaled by its multiplier; a group that starts late
    warms up again over `warmup_steps` (its Adam moments are fresh). `head_ratio` scales the first `lp_steps`
    steps (LP-FT's linear probe may use a larger step than the fine-tuning that follows).
    """

    def fn(count):
        step = count + group.start
        lr = schedule(step) * group.lr_scale
        if group.start > 0 and warmup_steps > 0:
            lr = lr * jnp.minimum(1.0, (count + 1) / warmup_steps)
        if lp_steps and head_ratio != 1.0:
            lr = lr * jnp.where(step < lp_steps, head_ratio, 1.0)
        return lr

    return fn


def grouped_optimizer(labels: Mapping[str, str], plan: Mapping[str, Group], schedule: optax.Schedule, *,
                      warmup_steps: int, weight_decay: float, clip_norm: float | None, head_ratio: float = 1.0,
                      lp_steps: int = 0, state_dtype: str = "float32") -> optax.GradientTransformation:
    """Global-norm clipping, then per group (labels from `group_labels`) a delayed AdamW on its own schedule;
    frozen parameters get `set_to_zero` (no state)."""
    transforms = {FROZEN: optax.set_to_zero()}
    for group in sorted(set(labels.values()) - {FROZEN}):
        g = plan[group]
        lr = group_schedule(schedule, g, warmup_steps, head_ratio if group == HEAD else 1.0, lp_steps)
        transforms[group] = delayed(optim.adamw(lr, weight_decay=weight_decay, clip_norm=None,
                                                state_dtype=state_dtype), g.start)
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    return optax.chain(*parts, optax.partition(transforms, dict(labels)))


def phases(labels: Mapping[str, str], plan: Mapping[str, Group]) -> list[tuple[int, tuple[str, ...]]]:
    """[(first step, trainable names)] of each phase: a new phase begins where a group starts."""
    starts = sorted({plan[g].start for g in set(labels.values()) - {FROZEN}} | {0})
    return [(s, tuple(sorted(n for n, g in labels.items() if g != FROZEN and plan[g].start <= s))) for s in starts]


def phase_at(starts: Sequence[int], step: int) -> int:
    """Index of the phase that `step` is in, given the phases' first steps (ascending, the first 0)."""
    return bisect.bisect_right(starts, step) - 1


class PhasedStep:
    """The train step of the phase a step is in, compiled once per phase: `step_fn = phased(step)`."""

    def __init__(self, phase_list: Sequence[tuple[int, tuple[str, ...]]], make: Callable[[Sequence[str]], Callable]):
        self.starts = [s for s, _ in phase_list]
        self.trainable = [t for _, t in phase_list]
        self._make, self._fns = make, {}

    def phase(self, step: int) -> int:
        return phase_at(self.starts, step)

    def __call__(self, step: int) -> Callable:
        p = self.phase(step)
        if p not in self._fns:
            self._fns[p] = self._make(self.trainable[p])
        return self._fns[p]
