"""`config.profile_steps`: a JAX profiler trace of chosen train steps, for TensorBoard's profile tab or Perfetto.

The trace starts before step `first` is dispatched and stops once step `last` has finished on the device (steps
are dispatched ahead of the device: stopping at dispatch would cut the last ones off). A multi-process run traces
every process, each in profile/process_N. A resumed run past `first` traces what is left of the range.
"""

from __future__ import annotations

import jax

from sft_jax import storage


class StepProfiler:
    def __init__(self, steps: tuple[int, ...], path: str):
        self.first, self.last = (steps[0], steps[1]) if steps else (0, -1)
        if jax.process_count() > 1:
            path = storage.join(path, f"process_{jax.process_index()}")
        self.path, self.active = path, False

    def before(self, step: int) -> None:
        """Called before step `step` (from 1) is dispatched."""
        if not self.active and self.first <= step <= self.last:
            jax.profiler.start_trace(self.path, create_perfetto_trace=True)  # also a file ui.perfetto.dev opens
            self.active = True

    def after(self, step: int, state) -> None:
        """Called once step `step` is dispatched, with the state it returns."""
        if self.active and step >= self.last:
            jax.block_until_ready(state)
            self.close()

    def close(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
