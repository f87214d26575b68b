"""XLA:CPU's thunk scheduler under `config.cpu_matmuls="xla"` (the decoders' choice): base: XLA's default;
mem / conc: `xla_cpu_scheduler_type` memory- or concurrency-optimized; serial: the concurrency-optimized
scheduler turned off (`xla_cpu_enable_concurrency_optimized_scheduler=false`); noxnn: XNNPACK off for this
step (`xla_cpu_use_xnnpack=false`, which the command line's XLA_FLAGS turn on)."""

from experiments.benchmarks import ours
from sft_jax import train_step

_BASE = dict(train_step.CPU_MATMULS["xla"])
_EXTRA = {
    "base": {},
    "mem": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"},
    "conc": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED"},
    "serial": {"xla_cpu_enable_concurrency_optimized_scheduler": False},
    "noxnn": {"xla_cpu_use_xnnpack": False},
}


def apply(variant: str) -> None:
    train_step.CPU_MATMULS["xla"] = {**_BASE, **_EXTRA[variant]}
    ours.CPU_MATMULS = "xla"
