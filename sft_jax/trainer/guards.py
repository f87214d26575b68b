"""What stops a run safely: a scheduler's preemption notice, and non-finite values, which are never applied,
saved, kept as best or reported as a result."""

from __future__ import annotations

import math
import signal

import jax
import tqdm

from sft_jax.train_step import all_finite


class Preemption:
    """SIGTERM (a scheduler's preemption notice) asks the loop to checkpoint and return; the command resumes."""

    def __init__(self):
        self.requested = False
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. called from a worker thread): no handler
            pass

    def _handle(self, signum, frame) -> None:
        self.requested = True
        tqdm.tqdm.write("SIGTERM: saving a checkpoint and stopping")

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class TrainingDiverged(ValueError):
    """A non-finite loss, gradient or update with nan_policy=stop, or a run that ends without a finite model."""


_ADVICE = "Lower the learning rate, check the data, or set --config.nan_policy=skip to skip such steps"


def check_finite(pending: list, policy: str, meta: dict, ckpt) -> None:
    """Acts on the non-finite flags of the steps since the last check (one host transfer for all of them):
    with policy "skip" counts them in `meta` (the train step did not apply them), with "stop" raises. The loop
    checks before every save, so with "stop" nothing from the first flagged step on is ever saved."""
    if not pending:
        return
    flags = jax.device_get([flag for _, flag in pending])
    bad = [step for (step, _), flag in zip(pending, flags) if int(flag)]
    if not bad:
        return
    if policy == "skip":
        meta["skipped_steps"] = meta.get("skipped_steps", 0) + len(bad)
        tqdm.tqdm.write(f"skipped {len(bad)} step(s) with a non-finite loss, gradient or update: {bad[:10]}")
        return
    ckpt.wait()
    last = ckpt.latest.latest_step()
    if last is None:
        saved = "no checkpoint was saved before it"
    elif last < bad[0]:
        saved = f"the latest checkpoint, step {last}, is from before it (resume restarts there)"
    else:  # not by this loop, which checks before saving; the step was not applied, so the state is finite
        saved = f"the latest checkpoint, step {last}, was saved after it, without it"
    raise TrainingDiverged(f"non-finite loss, gradient or update at step {bad[0]} (steps {bad[:10]}): not applied, "
                           f"and {saved}. {_ADVICE}")


_finite_state = jax.jit(all_finite)


def check_saveable(state) -> None:
    """Raises unless the parameters, masters and optimizer state about to be saved are all finite. Train steps
    never apply a non-finite update, so this only fires on a state that was non-finite from the start."""
    if not bool(_finite_state((state.params, state.master, state.opt_state))):
        raise TrainingDiverged(f"the parameters or optimizer state at step {int(state.step)} hold nan or inf values "
                               "that no training step wrote (those are never applied): check the pre-trained "
                               "weights; nothing was saved")


def improves(value: float, best: float | None, mode: str) -> bool:
    """Whether an evaluation's `value` is a new best ("max" or "min" `mode`): a non-finite value never is."""
    if not math.isfinite(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


def check_trained(meta: dict, step: int, metric: str) -> None:
    """Raises when the run ends without a finite model to report: every step skipped (nan_policy=skip), or no
    evaluation with a finite `metric` (so no best checkpoint)."""
    skipped = meta.get("skipped_steps", 0)
    if step and skipped >= step:
        raise TrainingDiverged(f"all {step} steps had a non-finite loss, gradient or update and were skipped: "
                               "nothing was trained. Lower the learning rate, check the data and the weights")
    if meta["best_step"] is None:
        raise TrainingDiverged(f"no evaluation gave a finite {metric} ({skipped} of {step} steps skipped), so "
                               "there is no best checkpoint to report")


def check_results(results: dict, best_step) -> None:
    """Raises when a final evaluation metric is nan or inf (instead of writing it as a result)."""
    bad = {k: v for k, v in results.items() if k.startswith("eval/") and isinstance(v, float)
           and not math.isfinite(v)}
    if bad:
        raise TrainingDiverged(f"the best checkpoint (step {best_step}) evaluates to non-finite "
                               f"{', '.join(f'{k}={v}' for k, v in bad.items())}; no results written")
