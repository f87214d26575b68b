"""Check a plan on the machine at hand: run the planned step and measure what it really holds.

`measure(config)` compiles the step as `plan` does, then builds the state (zeros, laid out on the devices
directly: no host copy) and runs a few steps, reading the process's peak resident memory (Linux VmHWM, reset
after compiling) minus what it held before the state was built. On CPU devices that is the state, the batch
and the step's temporaries: what the plan predicts.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections

from sft_jax.plan import CompiledStep, compile_step


def _status(key: str) -> int:
    """A byte count from /proc/self/status (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(match.group(1)) * 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def measure(config: ml_collections.ConfigDict, steps: int = 2, devices=None) -> int:
    """Peak resident bytes of `steps` train steps of `config` beyond what the process held before its state
    was built (Linux only)."""
    step = compile_step(config, devices)
    make_state, make_batch = builders(step)
    _reset_peak()
    before = _status("VmRSS")
    state, batch = make_state(), make_batch()
    for _ in range(steps):
        state, metrics = step.compiled(state, batch)
    jax.block_until_ready((state, metrics))
    return _status("VmHWM") - before


def builders(step: CompiledStep):
    """(make_state, make_batch): compiled functions building a state of zeros and a full batch (every position
    a target) for `step`, laid out on its devices. Compiled here, so that running them allocates only arrays."""

    def compiled(tree, ones=()):
        shardings = jax.tree.map(lambda x: x.sharding, tree)

        def build():
            if isinstance(tree, dict):
                return {k: (jnp.ones if k in ones else jnp.zeros)(x.shape, x.dtype) for k, x in tree.items()}
            return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), tree)

        return jax.jit(build, out_shardings=shardings).lower().compile()

    return compiled(step.state), compiled(step.batch, ones=("loss_mask", "target_weight"))
