"""Training throughput as it happens: tokens/s and MFU of each logged window of steps.

MFU (model FLOPs utilisation) = the model FLOPs of the steps (`sft_jax.flops`, as the planner counts them: each
step at its padded batch shape) / their wall time / the peak FLOP/s of all the run's devices in the compute dtype.
The peak: `config.logging.peak_flops` per device when set; else, on GPU and TPU, the vendor's dense peak of the
device kind (float32 at JAX's default matmul precision: TF32 on these GPUs, bfloat16 passes on TPU), and on CPU a
measured one, the best FLOP/s of a square matmul compiled as the run's own steps are (`matmul_peak`), shared by
the host's CPU devices and cached per CPU model and thread count (`storage.cache_root()`/peak_flops.json).
A device kind none of these covers gets no MFU (tokens/s still logged).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from sft_jax import storage

# Dense (not sparse) peak FLOP/s per device: (device_kind substring, bfloat16, float32). Earlier entries first:
# "h100 pcie" before "h100".
DEVICE_PEAKS = (
    ("h100 pcie", 756e12, 378e12),
    ("h100", 989e12, 495e12),
    ("h200", 989e12, 495e12),
    ("gh200", 989e12, 495e12),
    ("a100", 312e12, 156e12),
    ("l4", 121e12, 60e12),
    ("tpu v6", 918e12, 918e12),
    ("tpu v5 lite", 197e12, 197e12),
    ("tpu v5e", 197e12, 197e12),
    ("tpu v5", 459e12, 459e12),
    ("tpu v4", 275e12, 275e12),
)


@functools.cache
def _matmul(compiler_options: tuple) -> Callable:
    """The jitted matmul compiled with `compiler_options`, kept for the life of the process: XLA:CPU's oneDNN
    thunk hands its scratch object back to a pool just after the result is ready, and an executable destroyed in
    that instant (a local jitted function going out of scope) aborts the process in ObjectPool's destructor."""
    return jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32),
                   compiler_options=dict(compiler_options) or None)


def matmul_peak(dtype: str, n: int = 1024, repeats: int = 5, compiler_options: dict | None = None) -> float:
    """Best FLOP/s of an n x n x n jitted matmul in `dtype` on the default device (float32 accumulation for
    bfloat16 inputs, as the models' matmuls do), compiled with `compiler_options` (the CPU matmul library)."""
    dt = jnp.dtype(dtype)
    key = jax.random.key(0)
    a = jax.random.normal(key, (n, n), dt)
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), dt)
    f = _matmul(tuple(sorted((compiler_options or {}).items())))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _measured_cpu_peak(dtype: str, compiler_options: dict | None, measure: Callable[..., float]) -> float:
    """The host's matmul peak in `dtype`, measured once per CPU model, thread count, dtype and matmul library."""
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    key = json.dumps([cpu_model(), threads, dtype, sorted((compiler_options or {}).items()), jax.__version__])
    path = os.path.join(storage.cache_root(), "peak_flops.json")
    try:
        with open(path) as f:
            cached = json.load(f)
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict) or not isinstance(cached.get(key), (int, float)):
        cached = cached if isinstance(cached, dict) else {}
        cached[key] = measure(dtype, compiler_options=compiler_options)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            storage.write_text(path, json.dumps(cached, indent=1))
        except OSError:
            pass  # an unwritable cache costs a measurement next time, nothing more
    return float(cached[key])


def total_peak_flops(dtype: str, per_device: float = 0.0, devices=None, compiler_options: dict | None = None,
                     measure: Callable[..., float] = matmul_peak) -> float | None:
    """Peak FLOP/s of `devices` (the run's mesh; default: all) together in `dtype`; None where it is not known."""
    devices = jax.devices() if devices is None else devices
    if per_device > 0:
        return per_device * len(devices)
    kind = devices[0].device_kind.lower()
    if devices[0].platform == "cpu":
        # The CPU devices of one host share its cores: the host's peak is theirs together.
        return _measured_cpu_peak(dtype, compiler_options, measure) * jax.process_count()
    for name, bf16, f32 in DEVICE_PEAKS:
        if name in kind:
            return (f32 if jnp.dtype(dtype) == jnp.float32 else bf16) * len(devices)
    return None


class Throughput:
    """Tokens and model FLOPs of the steps since the last report, over the wall time they took (time spent
    evaluating excluded): `report()` gives train/tokens_per_s and train/mfu and starts the next window."""

    def __init__(self, peak_flops: float | None, clock: Callable[[], float] = time.perf_counter):
        self.peak, self.clock = peak_flops, clock
        self.restart()

    def restart(self) -> None:
        """Starts a new window now (after a step that compiled, so that compilation is not counted)."""
        self._start, self._excluded, self._tokens, self._flops = self.clock(), 0.0, 0, 0.0

    def add(self, tokens: int, flops: float) -> None:
        self._tokens += tokens
        self._flops += flops

    def exclude(self, seconds: float) -> None:
        """Time inside the window that was not training (an evaluation)."""
        self._excluded += seconds

    def report(self) -> dict[str, float]:
        seconds = max(self.clock() - self._start - self._excluded, 1e-9)
        out = {}
        if self._tokens:
            out["train/tokens_per_s"] = self._tokens / seconds
        if self._flops and self.peak:
            out["train/mfu"] = self._flops / seconds / self.peak
        self.restart()
        return out
