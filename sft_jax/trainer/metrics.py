"""Where a run's metrics go, and when the loop's periodic actions fire."""

from __future__ import annotations

import json
import os

from sft_jax import distributed
from sft_jax.rundir import METRICS_FILE, RunDir


def drop_after(path: str, step: int) -> int:
    """Removes from metrics.jsonl the lines of steps after `step` (a run resumed from `step` logs them again) and
    a last line cut short by a killed process; returns how many went. A damaged line before the last is a
    ValueError naming the file and line."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    keep = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            logged = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            if i == len(lines) - 1 and not line.endswith(b"\n"):
                break  # the line being written when the process died
            raise ValueError(f"{path}: line {i + 1} is damaged (not a JSON object with a step); remove or repair "
                             "it to resume") from None
        if logged <= step:
            keep.append(line if line.endswith(b"\n") else line + b"\n")
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.writelines(keep)
        os.replace(tmp, path)  # at once: a crash here leaves the old file, not half of it
    return len(lines) - len(keep)


class MetricWriter:
    """metrics.jsonl (one line per logged step) and TensorBoard events in the workdir (process 0 only). A run
    resumed from `resume_step` first drops what was logged after it, so no step appears twice: from metrics.jsonl,
    and from TensorBoard's view through its `purge_step`."""

    def __init__(self, rundir: RunDir, resume_step: int = 0):
        from tensorboardX import SummaryWriter

        self.active = distributed.is_primary()
        if self.active:
            drop_after(rundir.file(METRICS_FILE), resume_step)
            self.jsonl = open(rundir.file(METRICS_FILE), "a")
            self.tb = SummaryWriter(rundir.path, purge_step=resume_step + 1)

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
