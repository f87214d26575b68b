"""In-process A/B of train-step variants, interleaved: how notes.md's "X -> Y s per step" figures were made.

    python -m experiments.benchmarks.ab.ab MODEL STRATEGY DTYPE PATCH VARIANTS [--rounds=N]
    e.g. python -m experiments.benchmarks.ab.ab smollm2 lora float32 lora_dot old,new
         python -m experiments.benchmarks.ab.ab smollm2 full float32 attention_blocks old,new --batch=1 --seq_len=1024
         python -m experiments.benchmarks.ab.ab minilm full float32 cpu_matmuls xla,onednn --torch

PATCH is a module in this folder with `apply(variant)`, which swaps a piece of sft_jax back to its earlier
form ("old") or leaves the current one ("new"). Each variant's step is built (and compiled) right after its
`apply`, then the compiled steps run in rotating rounds, so every variant sees the same machine: on this
VM, whose speed drifts by up to 1.7x within minutes, separate processes cannot be compared.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import time

from sft_jax import platform

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=("minilm", "smollm2"))
    p.add_argument("strategy", choices=("full", "partial", "head", "lora"))
    p.add_argument("dtype", choices=("float32", "bfloat16"))
    p.add_argument("patch", help="module in experiments/benchmarks/ab with apply(variant)")
    p.add_argument("variants", help="comma list, e.g. old,new")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--batch", type=int, help="default: the benchmark's main point (32 MiniLM, 4 SmolLM2)")
    p.add_argument("--seq_len", type=int, help="default: 128 MiniLM, 256 SmolLM2")
    p.add_argument("--torch", action="store_true",
                   help="also rotate PyTorch's float32 step in, as run.py does (its threads share the process)")
    args = p.parse_args(argv)
    platform.configure_cpu()  # before JAX starts, as on the command line
    from experiments.benchmarks.ours import OursStep

    patch = importlib.import_module(f"experiments.benchmarks.ab.{args.patch}")
    batch, seq_len = (32, 128) if args.model == "minilm" else (4, 256)
    batch, seq_len = args.batch or batch, args.seq_len or seq_len
    steps = {}
    for v in args.variants.split(","):
        patch.apply(v)
        steps[v] = OursStep(args.model, args.strategy, args.dtype, batch, seq_len)
        steps[v].step(), steps[v].step()  # compile with this variant in place, then warm up
    if args.torch:
        import torch

        from experiments.benchmarks.baseline import TorchStep

        torch.set_num_threads(len(os.sched_getaffinity(0)))
        from experiments.benchmarks.ours import synthetic_batch

        steps["torch"] = TorchStep(args.model, args.strategy, synthetic_batch(args.model, batch, seq_len), "cpu",
                                   os.path.join(os.path.dirname(HERE), "workdirs"))
        steps["torch"].step()
    names = list(steps)
    wall, cpu, loss = {n: [] for n in names}, {n: [] for n in names}, {}
    for r in range(args.rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t, c = time.perf_counter(), time.process_time()
            loss[n] = steps[n].step()
            wall[n].append(time.perf_counter() - t)
            cpu[n].append(time.process_time() - c)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {wall[n][-1]:.3f} s" for n in names), flush=True)
    for n in names:
        print(f"{n:8s} wall median {statistics.median(wall[n]):.3f} s (min {min(wall[n]):.3f})  "
              f"CPU median {statistics.median(cpu[n]):.3f} s  loss {loss[n]:.6f}")
    # Per round, each variant's time over the first's (their steps ran seconds apart): robust to the drift.
    for n in names[1:]:
        for what, times in (("wall", wall), ("CPU", cpu)):
            ratios = sorted(t / t0 for t, t0 in zip(times[n], times[names[0]]))
            q1, q3 = statistics.quantiles(ratios, n=4)[0::2] if len(ratios) > 1 else (ratios[0], ratios[0])
            print(f"{n} / {names[0]} {what}: median {statistics.median(ratios):.4f} (quartiles {q1:.4f}-{q3:.4f}, "
                  f"range {ratios[0]:.4f}-{ratios[-1]:.4f}, {len(ratios)} rounds)")


if __name__ == "__main__":
    main()
