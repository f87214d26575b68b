"""Where a run's metrics go, and when the loop's periodic actions fire."""

from __future__ import annotations

import json

from sft_jax import distributed
from sft_jax.rundir import METRICS_FILE, RunDir


class MetricWriter:
    """metrics.jsonl (one line per logged step) and TensorBoard events in the workdir (process 0 only)."""

    def __init__(self, rundir: RunDir):
        from tensorboardX import SummaryWriter

        self.active = distributed.is_primary()
        if self.active:
            self.jsonl = open(rundir.file(METRICS_FILE), "a")
            self.tb = SummaryWriter(rundir.path)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.active:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        for k, v in values.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.active:
            self.jsonl.close()
            self.tb.close()


def due(step: int, every: int, *also: bool) -> bool:
    """Whether a periodic action runs after `step`: every `every` steps, and whenever any of `also` holds
    (the last step, an early stop, a preemption)."""
    return step % every == 0 or any(also)
