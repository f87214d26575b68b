"""Orbax checkpoints in `WORKDIR/checkpoints/`: `latest/` (full train state, for resume) and `best/`
(parameters of the best evaluation so far). Each holds three items: `params`, `train` (step, optimizer
state, rng) and `meta` (JSON: data position, early-stopping state)."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from sft_jax.state import TrainState

CHECKPOINTS_DIR = "checkpoints"  # inside a workdir (see `sft_jax.rundir`)


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _options(name: str, keep: int) -> ocp.CheckpointManagerOptions:
    """Options of the `name` manager. Its multi-process barriers carry `name` as a prefix: orbax names a
    barrier after the step directory alone (`async_write_complete.3`), so `best` and `latest` saving the same
    step at once, each in its own background thread, met at one barrier name in an order that differed
    between processes, and a multi-host run could hang at its last step (tests/test_multihost.py)."""
    return ocp.CheckpointManagerOptions(
        max_to_keep=keep, multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name))


class Checkpoints:
    def __init__(self, workdir: str, keep: int = 2):
        root = os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR)
        self.latest = ocp.CheckpointManager(os.path.join(root, "latest"), options=_options("latest", keep))
        self.best = ocp.CheckpointManager(os.path.join(root, "best"), options=_options("best", 1))

    @staticmethod
    def _save(manager, step: int, params, meta: dict, train: Any | None = None):
        items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
        if train is not None:
            items["train"] = ocp.args.StandardSave(train)
        if step in manager.all_steps():
            # Left by a run killed after this step's `best` save finished but before its `latest` save did
            # (asynchronous): the resumed run restarts from an earlier step and reaches this one again.
            manager.delete(step)
        manager.save(step, args=ocp.args.Composite(**items), force=True)

    def save_latest(self, state: TrainState, meta: dict) -> None:
        train = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
        self._save(self.latest, int(state.step), state.params, meta, train)

    def save_best(self, state: TrainState, meta: dict) -> None:
        self._save(self.best, int(state.step), state.params, meta)

    def restore_latest(self, target: TrainState) -> tuple[TrainState, dict] | None:
        """Restores into the shapes, dtypes and shardings of `target`; None when there is no checkpoint."""
        step = self.latest.latest_step()
        if step is None:
            return None
        train_target = {"step": target.step, "opt_state": target.opt_state, "rng": target.rng}
        r = self.latest.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(target.params)),
            train=ocp.args.StandardRestore(_abstract(train_target)),
            meta=ocp.args.JsonRestore()))
        state = TrainState(step=r.train["step"], params=r.params, opt_state=r.train["opt_state"],
                           rng=r.train["rng"])
        return state, r.meta

    def restore_params(self, target_params: dict, which: str = "best") -> tuple[dict, dict]:
        manager = self.best if which == "best" else self.latest
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no {which} checkpoint in {manager.directory}")
        r = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(target_params)), meta=ocp.args.JsonRestore()))
        return r.params, r.meta

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()
