"""Orbax checkpoints in `WORKDIR/checkpoints/`: `latest/` (full train state, for resume) and `best/`
(parameters of the best evaluation so far). Each holds three items: `params`, `train` (step, optimizer
state, rng, float32 masters) and `meta` (JSON: data position, early-stopping state).

A run whose frozen parameters are rebuilt exactly from its config (a language model's pre-trained weights,
with its adapters, quantised base (QLoRA) and storage dtype: `Task.rebuilds_base`) leaves them out: `params`
holds only what trains, and `meta["base"]` (`FrozenBase`) the model, a fingerprint of its weight files and a
checksum of each left-out array. Restoring takes those from the target (the rebuilt model) after checking
them, so a resume on changed weights stops with one line naming the file or array."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from sft_jax.models.registry import weight_fingerprint
from sft_jax.state import TrainState, array_checksums

CHECKPOINTS_DIR = "checkpoints"  # inside a workdir (see `sft_jax.rundir`)
BASE_KEY = "base"  # in a checkpoint's meta


@dataclasses.dataclass(frozen=True)
class FrozenBase:
    """The frozen parameters a run's checkpoints leave out, and what tells a rebuilt copy from the original:
    `files` (`registry.weight_fingerprint` of `model`: each weight file's size and header hash) and
    `checksums` ({name: `state.array_checksums`} of the arrays as the run holds them: quantised, cast)."""

    model: str
    files: dict[str, str]
    checksums: dict[str, str]

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.checksums)

    @classmethod
    def of(cls, model: str, params: dict, names) -> FrozenBase:
        return cls(model, weight_fingerprint(model), array_checksums(params, sorted(names)))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> FrozenBase:
        return cls(d["model"], dict(d["files"]), dict(d["checksums"]))

    def check(self, params: dict, where: str, current: FrozenBase | None = None) -> None:
        """Raises ValueError (one line) unless `params` hold this base: the same weight files, and arrays
        bit-identical to those the run saved beside (`current`: the rebuilt base's own record, if made)."""
        abstract = [n for n in sorted(self.names) if not isinstance(params.get(n), (jax.Array, np.ndarray))]
        if abstract:
            raise ValueError(f"{where}: the checkpoint leaves out the frozen base ({len(self.names)} arrays, e.g. "
                             f"{abstract[0]}); restore into the model rebuilt from {self.model} with its values "
                             "(sft_jax.tasks.language_model.load_finetuned_lm)")
        files = current.files if current is not None else weight_fingerprint(self.model)
        for name in sorted(set(self.files) | set(files)):
            if self.files.get(name) != files.get(name):
                what = "is missing" if name not in files else "is new" if name not in self.files else \
                    f"changed (size:header {self.files[name]} -> {files[name]})"
                raise ValueError(f"{self.model}/{name} {what} since the run in {where} started; its checkpoints "
                                 "hold no copy of the frozen base, which is rebuilt from these files: restore them "
                                 "or start a new workdir")
        sums = current.checksums if current is not None and current.names == self.names else \
            array_checksums(params, sorted(self.names))
        changed = [n for n in sorted(self.names) if sums[n] != self.checksums[n]]
        if changed:
            raise ValueError(f"{where}: the frozen base rebuilt from {self.model} differs from the one the run "
                             f"trained on ({len(changed)} arrays, e.g. {changed[0]}); its checkpoints hold no "
                             "copy of it: restore the original weights or start a new workdir")


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _train_item(state: TrainState) -> dict:
    """What `latest/` keeps beside the parameters: step, optimizer state, rng, and any float32 masters."""
    item = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
    if state.master:
        item["master"] = state.master
    return item


def _options(name: str, keep: int) -> ocp.CheckpointManagerOptions:
    """Options of the `name` manager. Its multi-process barriers carry `name` as a prefix: orbax names a
    barrier after the step directory alone (`async_write_complete.3`), so `best` and `latest` saving the same
    step at once, each in its own background thread, met at one barrier name in an order that differed
    between processes, and a multi-host run could hang at its last step (tests/test_multihost.py)."""
    return ocp.CheckpointManagerOptions(
        max_to_keep=keep, multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name))


class Checkpoints:
    """`latest/` and `best/` of a workdir. With `base` set (`FrozenBase`), saves leave those parameters out."""

    def __init__(self, workdir: str, keep: int = 2, base: FrozenBase | None = None):
        root = os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR)
        self.workdir = os.path.abspath(workdir)
        self.latest = ocp.CheckpointManager(os.path.join(root, "latest"), options=_options("latest", keep))
        self.best = ocp.CheckpointManager(os.path.join(root, "best"), options=_options("best", 1))
        self.base = base

    def _save(self, manager, step: int, params, meta: dict, train: Any | None = None):
        if self.base is not None:
            params = {k: v for k, v in params.items() if k not in self.base.names}
            meta = {**meta, BASE_KEY: self.base.to_json()}
        items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
        if train is not None:
            items["train"] = ocp.args.StandardSave(train)
        if step in manager.all_steps():
            # Left by a run killed after this step's `best` save finished but before its `latest` save did
            # (asynchronous): the resumed run restarts from an earlier step and reaches this one again.
            manager.delete(step)
        manager.save(step, args=ocp.args.Composite(**items), force=True)

    def save_latest(self, state: TrainState, meta: dict) -> None:
        self._save(self.latest, int(state.step), state.params, meta, _train_item(state))

    def save_best(self, state: TrainState, meta: dict) -> None:
        self._save(self.best, int(state.step), state.params, meta)

    def _meta_and_base(self, manager, step: int, target_params: dict) -> tuple[dict, frozenset[str]]:
        """The meta of a checkpoint and the names it leaves out, checked against `target_params` first."""
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        saved = meta.pop(BASE_KEY, None)
        if saved is None:
            return meta, frozenset()
        base = FrozenBase.from_json(saved)
        base.check(target_params, self.workdir, self.base)
        return meta, base.names

    def restore_latest(self, target: TrainState) -> tuple[TrainState, dict] | None:
        """Restores into the shapes, dtypes and shardings of `target`; None when there is no checkpoint. A frozen
        base the checkpoint leaves out comes from `target`, once checked (`FrozenBase.check`)."""
        step = self.latest.latest_step()
        if step is None:
            return None
        meta, left_out = self._meta_and_base(self.latest, step, target.params)
        r = self.latest.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract({k: v for k, v in target.params.items() if k not in left_out})),
            train=ocp.args.StandardRestore(_abstract(_train_item(target)))))
        params = {**{k: target.params[k] for k in left_out}, **r.params}
        state = TrainState(step=r.train["step"], params=params, opt_state=r.train["opt_state"],
                           rng=r.train["rng"], master=r.train.get("master", {}))
        return state, meta

    def restore_params(self, target_params: dict, which: str = "best") -> tuple[dict, dict]:
        """The parameters of the `which` checkpoint in the shapes of `target_params` (and a left-out frozen base
        from them, once checked), and its meta."""
        manager = self.best if which == "best" else self.latest
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no {which} checkpoint in {manager.directory}")
        meta, left_out = self._meta_and_base(manager, step, target_params)
        r = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(
            _abstract({k: v for k, v in target_params.items() if k not in left_out}))))
        return {**{k: target_params[k] for k in left_out}, **r.params}, meta

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()
