"""Orbax checkpoints in `WORKDIR/checkpoints/`: `latest/` (full train state, for resume) and `best/`
(parameters of the best evaluation so far). Each holds three items: `params`, `train` (step, optimizer
state, rng, float32 masters) and `meta` (JSON: data position, early-stopping state).

A run whose frozen parameters are rebuilt exactly from its config (a language model's pre-trained weights,
with its adapters, quantised base (QLoRA) and storage dtype: `Task.rebuilds_base`) leaves them out: `params`
holds only what trains, and `meta["base"]` (`FrozenBase`) the model, a fingerprint of its weight files and a
checksum of each left-out array. Restoring takes those from the target (the rebuilt model) after checking
them, so a resume on changed weights stops with one line naming the file or array.

Every restore verifies what it reads (`sft_jax.checkpoint_integrity`): a damaged step is named, set aside in
`checkpoints/damaged/` and the newest intact one is used. A save that fails (disk full) raises
`CheckpointSaveFailed` with one line (`sft_jax.checkpoint_failures`)."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from sft_jax import checkpoint_integrity as integrity
from sft_jax import storage
from sft_jax.checkpoint_failures import CheckpointSaveFailed, describe, reason
from sft_jax.checkpoint_integrity import ARRAYS_KEY, DamagedCheckpoint, DamagedStep
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


def check_store(workdir: str) -> None:
    """Raises ValueError (one line) for a workdir on a store orbax cannot write checkpoints to: its arrays go
    through TensorStore's file and gcs drivers only, so s3:// is refused (gs:// and local or mounted paths work)."""
    if os.fspath(workdir).startswith("s3://"):
        raise ValueError(f"{workdir}: orbax {ocp.__version__} writes checkpoints only to local (or mounted) paths "
                         "and gs://, not s3://; put the workdir there (data may stay on s3://)")


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _train_item(state: TrainState) -> dict:
    """What `latest/` keeps beside the parameters: step, optimizer state, rng, and any float32 masters."""
    item = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
    if state.master:
        item["master"] = state.master
    return item


def _options(name: str, keep: int, clean: bool) -> ocp.CheckpointManagerOptions:
    """Options of the `name` manager. Its multi-process barriers carry `name` as a prefix: orbax names a
    barrier after the step directory alone (`async_write_complete.3`), so `best` and `latest` saving the same
    step at once, each in its own background thread, met at one barrier name in an order that differed
    between processes, and a multi-host run could hang at its last step (tests/test_multihost.py). With `clean`,
orbax removes the `<step>.orbax-checkpoint-tmp*` directories of saves that never finished."""
    return ocp.CheckpointManagerOptions(
        max_to_keep=keep, cleanup_tmp_directories=clean,
        multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name))


class Checkpoints:
    """`latest/` and `best/` of a workdir. With `base` set (`FrozenBase`), saves leave those parameters out.
    `clean_unfinished` (for the training run alone: a reader must not remove a running save's files) removes
    what saves that never finished left."""

    def __init__(self, workdir: str, keep: int = 2, base: FrozenBase | None = None, clean_unfinished: bool = False):
        check_store(workdir)
        self.workdir = storage.absolute(workdir)
        self.root = os.path.join(self.workdir, CHECKPOINTS_DIR)
        self.clean_unfinished = clean_unfinished
        self.latest = ocp.CheckpointManager(os.path.join(self.root, "latest"),
                                            options=_options("latest", keep, clean_unfinished))
        self.best = ocp.CheckpointManager(os.path.join(self.root, "best"),
                                          options=_options("best", 1, clean_unfinished))
        self._kept: ocp.CheckpointManager | None = None  # opened on first use: most runs keep no steps
        self.base = base
        self._pending: dict[str, int] = {}  # manager name -> step of its save still being written
        self._failed: CheckpointSaveFailed | None = None

    @property
    def kept(self) -> ocp.CheckpointManager:
        """`kept/`: full train states of chosen steps (`config.keep_checkpoints_at`), none ever deleted."""
        if self._kept is None:
            self._kept = ocp.CheckpointManager(os.path.join(self.root, "kept"),
                                               options=_options("kept", None, self.clean_unfinished))
        return self._kept

    def _manager(self, which: str) -> ocp.CheckpointManager:
        return {"best": self.best, "latest": self.latest}.get(which) or self.kept

    # --- saving -------------------------------------------------------------------------------------------
    def _save(self, which: str, step: int, params, meta: dict, train: Any | None = None):
        manager = self._manager(which)
        if self.base is not None:
            params = {k: v for k, v in params.items() if k not in self.base.names}
            meta = {**meta, BASE_KEY: self.base.to_json()}
        arrays = {"params": params, **({"train": integrity.flat_arrays(train)} if train is not None else {})}
        meta = {**meta, ARRAYS_KEY: integrity.record(arrays)}  # what each restore verifies the step by
        items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
        if train is not None:
            items["train"] = ocp.args.StandardSave(train)
        self._settle(which)  # the previous save's failure, if any, is that step's
        if step in manager.all_steps():
            # Left by a run killed after this step's `best` save finished but before its `latest` save did
            # (asynchronous): the resumed run restarts from an earlier step and reaches this one again.
            manager.delete(step)
        try:
            manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:
            raise self._failure(which, step, e) from None
        self._pending[which] = step

    def save_latest(self, state: TrainState, meta: dict) -> None:
        self._save("latest", int(state.step), state.params, meta, _train_item(state))

    def save_best(self, state: TrainState, meta: dict) -> None:
        self._save("best", int(state.step), state.params, meta)

    def save_kept(self, state: TrainState, meta: dict) -> None:
        """The whole train state of this step in `kept/`, for forks (`config.fork_from`) and later analysis."""
        self._save("kept", int(state.step), state.params, meta, _train_item(state))

    def _failure(self, which: str, step: int | None, e: BaseException) -> CheckpointSaveFailed:
        if self._failed is None:
            self.latest.reload()  # from disk: a step whose save failed is no checkpoint
            self._failed = CheckpointSaveFailed(describe(which, step, str(self._manager(which).directory), e,
                                                         self.latest.latest_step()))
        return self._failed

    def _settle(self, which: str) -> None:
        """Waits for the `which` save in flight; CheckpointSaveFailed if it failed."""
        step = self._pending.pop(which, None)
        if self._failed is not None:
            raise self._failed
        try:
            self._manager(which).wait_until_finished()
        except Exception as e:
            raise self._failure(which, step, e) from None

    def poll(self) -> None:
        """Raises CheckpointSaveFailed once a save writing in the background has failed, so that a run stops at
        the failed save instead of training on unsaved (single-process: processes of a multi-host run could
        see a finished save at different steps, and learn of a failure at their next save instead)."""
        if jax.process_count() > 1:
            return
        for which in list(self._pending):
            if not self._manager(which).is_saving_in_progress():
                self._settle(which)

    def wait(self) -> None:
        self._settle("latest")
        self._settle("best")
        if self._kept is not None:
            self._settle("kept")

    def close(self) -> None:
        if self._failed is None:
            self.wait()
            self.latest.close()
            self.best.close()
            if self._kept is not None:
                self._kept.close()

    # --- restoring ----------------------------------------------------------------------------------------
    def _read(self, which: str, step: int, target_params: dict, train_target: Any | None = None):
        """(params, train or None, meta, left-out names) of one step, verified against what its save recorded.
        DamagedStep when it cannot be read back as saved; a step of another configuration, or one whose frozen
        base (left out) changed, is a ValueError instead: nothing is wrong with it."""
        manager = self._manager(which)
        where = os.path.join(str(manager.directory), str(step))
        items = ("params", "meta") + (("train",) if train_target is not None else ())
        meta, error = None, None
        try:
            integrity.check_files(where, items)
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            if not isinstance(meta, dict):
                raise DamagedStep(where, "meta/metadata holds no JSON object")
        except DamagedStep as e:
            error = e
        except Exception as e:
            error = DamagedStep(where, reason(e))
        if not integrity.agree(error is None):
            raise error or DamagedStep(where, "damaged on another process")
        saved, saved_base = meta.pop(ARRAYS_KEY, None), meta.pop(BASE_KEY, None)
        left_out = frozenset()
        if saved_base is not None:
            base = FrozenBase.from_json(saved_base)
            base.check(target_params, self.workdir, self.base)
            left_out = base.names
        targets = {"params": {k: v for k, v in target_params.items() if k not in left_out}}
        if train_target is not None:
            targets["train"] = train_target
        if saved is not None:
            for item, target in targets.items():
                integrity.check_layout(saved, item, integrity.flat_arrays(target) if item == "train" else target,
                                       where)
        r = None
        try:
            with integrity.quiet_abandoned_reads():
                r = manager.restore(step, args=ocp.args.Composite(
                    **{item: ocp.args.StandardRestore(_abstract(t)) for item, t in targets.items()}))
        except Exception as e:
            error = DamagedStep(where, reason(e))
        if not integrity.agree(error is None):
            raise error or DamagedStep(where, "damaged on another process")
        train = r.train if train_target is not None else None
        if saved is not None:
            integrity.verify(saved, "params", r.params, where)
            if train is not None:
                integrity.verify(saved, "train", integrity.flat_arrays(train), where)
        return r.params, train, meta, left_out

    def _newest_intact(self, which: str, read: Callable[[int], Any]):
        """`read(step)` of the newest step that reads back intact, None when there is none. Damaged steps newer
        than it are reported and set aside (`checkpoints/damaged/`, never deleted); when none is intact, all
        stay where they are and DamagedCheckpoint names them."""
        manager = self._manager(which)
        damaged: list[DamagedStep] = []
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                result = read(step)
            except DamagedStep as e:
                damaged.append(e)
                continue
            for d in damaged:
                dest = integrity.set_aside(d.path, which)
                tqdm.tqdm.write(f"checkpoint {d.path} is damaged ({d.reason}): moved to {dest}; using step {step}",
                                file=sys.stderr)
            if damaged:
                manager.reload()  # orbax no longer lists the steps set aside
            return result
        if damaged:
            raise DamagedCheckpoint(f"no intact {which} checkpoint in {manager.directory}: " + "; ".join(
                f"step {os.path.basename(d.path)}: {d.reason}" for d in damaged) +
                " (move the damaged steps away, or use a new workdir, to start over)")
        return None

    def restore_latest(self, target: TrainState) -> tuple[TrainState, dict] | None:
        """Restores the newest intact step into the shapes, dtypes and shardings of `target`; None when there is
        no checkpoint. A frozen base the checkpoint leaves out comes from `target`, once checked
        (`FrozenBase.check`)."""
        return self._newest_intact("latest", lambda step: self._read_state("latest", step, target))

    def _read_state(self, which: str, step: int, target: TrainState) -> tuple[TrainState, dict]:
        params, train, meta, left_out = self._read(which, step, target.params, _train_item(target))
        state = TrainState(step=train["step"], params={**{k: target.params[k] for k in left_out}, **params},
                           opt_state=train["opt_state"], rng=train["rng"], master=train.get("master", {}))
        return state, meta

    def steps(self, which: str) -> list[int]:
        """The steps `which` ("latest", "best", "kept") holds, oldest first."""
        if which == "kept" and not os.path.isdir(os.path.join(self.root, "kept")):
            return []
        return sorted(self._manager(which).all_steps())

    def restore_step(self, target: TrainState, step: int) -> tuple[TrainState, dict]:
        """The train state of exactly `step`, from `kept/` or else `latest/`, into the shapes, dtypes and
        shardings of `target`. ValueError naming the steps there are when neither holds it; DamagedStep when it
        does not read back as saved."""
        which = "kept" if step in self.steps("kept") else "latest" if step in self.steps("latest") else None
        if which is None:
            raise ValueError(f"{self.workdir}: no checkpoint of step {step} (kept: {self.steps('kept') or 'none'}; "
                             f"latest: {self.steps('latest') or 'none'}); a run keeps steps with "
                             "config.keep_checkpoints_at")
        return self._read_state(which, step, target)

    def restore_params(self, target_params: dict, which: str = "best") -> tuple[dict, dict]:
        """The parameters of the newest intact `which` checkpoint in the shapes of `target_params` (and a left-out
        frozen base from them, once checked), and its meta."""
        if not self._manager(which).all_steps():
            raise FileNotFoundError(f"no {which} checkpoint in {self._manager(which).directory}")
        params, _, meta, left_out = self._newest_intact(which, lambda step: self._read(which, step, target_params))
        return {**{k: target_params[k] for k in left_out}, **params}, meta
