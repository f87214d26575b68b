"""What stops a run safely: a scheduler's preemption notice, and non-finite losses or gradients."""

from __future__ import annotations

import signal

import jax
import tqdm


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
    """A non-finite loss or gradient with nan_policy=stop."""


def check_finite(pending: list, policy: str, meta: dict, ckpt) -> None:
    """Acts on the non-finite flags of the steps since the last check (one host transfer for all of them):
    with policy "skip" counts them in `meta` (the train step did not apply them), with "stop" raises."""
    if not pending:
        return
    flags = jax.device_get([flag for _, flag in pending])
    bad = [step for (step, _), flag in zip(pending, flags) if int(flag)]
    if not bad:
        return
    if policy == "skip":
        meta["skipped_steps"] = meta.get("skipped_steps", 0) + len(bad)
        tqdm.tqdm.write(f"skipped {len(bad)} step(s) with a non-finite loss or gradient: {bad[:10]}")
        return
    ckpt.wait()
    last = ckpt.latest.latest_step()
    raise TrainingDiverged(f"non-finite loss or gradient at step {bad[0]} (steps {bad[:10]}); those updates were "
                           f"not applied and no such state was saved (latest checkpoint: step {last}). Lower the "
                           "learning rate, check the data, or set --config.nan_policy=skip to skip such steps")
