"""Where a run's metrics go, and when the loop's periodic actions fire."""

from __future__ import annotations

import json

from sft_jax import distributed, storage
from sft_jax.rundir import METRICS_FILE, RunDir
from sft_jax.trainer.trackers import Trackers


def drop_after(path: str, step: int) -> int:
    """Removes from metrics.jsonl the lines of steps after `step` (a run resumed from `step` logs them again) and
    a last line cut short by a killed process; returns how many went. A damaged line before the last is a
    ValueError naming the file and line."""
    if not storage.exists(path):
        return 0
    lines = storage.read_bytes(path).splitlines(keepends=True)
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
        storage.write_text(path, b"".join(keep).decode())  # at once: a crash here leaves the old file, not half
    return len(lines) - len(keep)


class MetricWriter:
    """metrics.jsonl (one line per logged step) and the trackers (`sft_jax.trainer.trackers`: TensorBoard, and W&B
    / MLflow when `config.logging` names them) in the workdir (process 0 only). A run resumed from `resume_step`
    first drops what was logged after it, so no step appears twice: from metrics.jsonl, and from TensorBoard's
    view through its `purge_step`."""

    def __init__(self, rundir: RunDir, resume_step: int = 0, config=None):
        self.active = distributed.is_primary()
        if self.active:
            path = rundir.file(METRICS_FILE)
            sent_until = last_step(path)  # what W&B / MLflow got before this resume, which they cannot drop
            drop_after(path, resume_step)
            self.jsonl = storage.Appender(path)  # flushed at each write
            self.trackers = Trackers(rundir, resume_step, config, sent_until)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.active:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.trackers.log(step, values)

    def write_results(self, results: dict) -> None:
        """The final results (results.json's) to the trackers that keep them (W&B's summary, MLflow's final/)."""
        if self.active:
            self.trackers.summarise(results)

    def close(self) -> None:
        if self.active:
            self.jsonl.close()
            self.trackers.close()


def last_step(path: str) -> int:
    """The last step metrics.jsonl holds (0: none); lines that do not parse are drop_after's to report."""
    if not storage.exists(path):
        return 0
    steps = [0]
    with storage.open(path, "rb") as f:
        for line in f:
            try:
                steps.append(int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                continue
    return max(steps)


def due(step: int, every: int, *also: bool) -> bool:
    """Whether a periodic action runs after `step`: every `every` steps, and whenever any of `also` holds
    (the last step, an early stop, a preemption)."""
    return step % every == 0 or any(also)
