"""Wall, user and system seconds and page faults of single train steps (stop 18's malloc table in ../notes.md).

    python -m experiments.benchmarks.micro.step_faults MODEL STRATEGY DTYPE [--torch] [--steps=5]
    SFT_JAX_MALLOC=0 python -m experiments.benchmarks.micro.step_faults ...   # glibc's malloc defaults

`sft_jax.platform.configure_cpu()` runs before JAX starts, so its malloc settings apply unless SFT_JAX_MALLOC=0;
with --torch PyTorch's step for the same case alternates with ours in the process, as in run.py.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

from experiments.benchmarks.ours import OursStep, synthetic_batch
from sft_jax import platform

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=("minilm", "smollm2"))
    p.add_argument("strategy", choices=("full", "partial", "head", "lora"))
    p.add_argument("dtype", choices=("float32", "bfloat16"))
    p.add_argument("--torch", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    platform.configure_cpu()  # malloc and XNNPACK settings, before JAX starts
    shape = (32, 128) if args.model == "minilm" else (4, 256)
    ours = OursStep(args.model, args.strategy, args.dtype, *shape)
    ours.step(), ours.step()
    steps = {"ours": ours.step}
    if args.torch:
        import torch

        from experiments.benchmarks.baseline import TorchStep

        torch.set_num_threads(len(os.sched_getaffinity(0)))
        base = TorchStep(args.model, args.strategy, synthetic_batch(args.model, *shape), "cpu",
                         os.path.join(os.path.dirname(HERE), "workdirs"))
        base.step()
        steps["torch"] = base.step
    for _ in range(args.steps):
        for name, step in steps.items():
            a, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            step()
            wall, b = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
            print(f"{name:6s} wall {wall:.3f} s  user {b.ru_utime - a.ru_utime:.3f} s  "
                  f"sys {b.ru_stime - a.ru_stime:.3f} s  minor faults {b.ru_minflt - a.ru_minflt}", flush=True)


if __name__ == "__main__":
    main()
