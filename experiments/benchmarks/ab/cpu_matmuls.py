"""xla: XLA:CPU's own matmuls (YNNPACK dots, Eigen for the rest); onednn: every dot of the step handed,
alone, to oneDNN (`config.cpu_matmuls="onednn"`, train_step.CPU_MATMULS)."""
from experiments.benchmarks import ours


def apply(variant: str) -> None:
    ours.CPU_MATMULS = {"old": "xla", "new": "onednn"}.get(variant, variant)
