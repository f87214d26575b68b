"""Extra XLA:CPU compiler options on top of `config.cpu_matmuls="onednn"`'s (train_step.CPU_MATMULS): base: none;
mem / conc: `xla_cpu_scheduler_type` memory- or concurrency-optimized."""

from experiments.benchmarks import ours
from sft_jax import train_step

_BASE = dict(train_step.CPU_MATMULS["onednn"])
_EXTRA = {
    "base": {},
    "mem": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"},
    "conc": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED"},
}


def apply(variant: str) -> None:
    train_step.CPU_MATMULS["onednn"] = {**_BASE, **_EXTRA[variant]}
    ours.CPU_MATMULS = "onednn"
