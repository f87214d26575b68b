"""`config.fork_from="WORKDIR@STEP"`: a new run that starts from another run's whole train state at one of its
kept steps (`config.keep_checkpoints_at`, or a step still in its `latest/`), with some of the config changed.

The fork takes the parameters, optimizer state, masters and dropout key of that step and the data position
that follows from it (batches are a function of seed and step), so a fork with nothing changed continues
bit-identically to its parent; one that changes, say, the learning rate or a regularizer's weight gives a
paired comparison from a shared prefix. What the parent selected (its best checkpoint, early-stopping counts)
is not taken: the fork selects among its own evaluations. A change that alters the state's structure (another
strategy or optimizer) cannot fork and says so in one line.
"""

from __future__ import annotations

import os

from sft_jax.checkpoint import Checkpoints
from sft_jax.state import TrainState


def parse(spec: str) -> tuple[str, int]:
    """(workdir, step) of "WORKDIR@STEP"; ValueError naming config.fork_from otherwise."""
    workdir, _, step = spec.rpartition("@")
    if not workdir or not step.isdigit() or int(step) < 1:
        raise ValueError(f"config.fork_from: expected WORKDIR@STEP with STEP >= 1, got {spec!r}")
    return workdir, int(step)


def start_from(spec: str, target: TrainState, workdir: str) -> TrainState:
    """The train state of the parent's step, laid out as `target` (this run's fresh state)."""
    parent, step = parse(spec)
    if os.path.abspath(parent) == os.path.abspath(workdir):
        raise ValueError(f"config.fork_from: {spec} is this run's own workdir; a fork needs a workdir of its own")
    if not os.path.isdir(parent):
        raise ValueError(f"config.fork_from: {parent}: no such workdir")
    checkpoints = Checkpoints(parent)
    try:
        state, _ = checkpoints.restore_step(target, step)
    except ValueError as e:
        raise ValueError(f"config.fork_from: {e}") from None
    finally:
        checkpoints.close()
    return state
