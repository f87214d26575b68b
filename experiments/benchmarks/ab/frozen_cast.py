"""old: frozen bfloat16 weights cast from float32 in every step; new: cast once (`with_compute_params`)."""

from experiments.benchmarks import ours
from sft_jax import train_step

_NEW = train_step.compute_cast_plan


def apply(variant: str) -> None:
    ours.compute_cast_plan = {"old": lambda *args, **kwargs: {}, "new": _NEW}[variant]
