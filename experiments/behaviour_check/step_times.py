"""Train-step times of two checkouts on one machine, interleaved: has a change made sft_jax slower?

    python -m experiments.behaviour_check.step_times --repos=/tmp/before,. [--cases=minilm-full,smollm2-full]

Each (round, checkout, case) is a fresh process that sets up the CPU as the command line does, builds the
benchmark's train step (`experiments/benchmarks/ours.py` of that checkout: the step `train_and_evaluate` runs,
on a synthetic batch of the benchmark's main shape), warms it up and times it. Checkouts alternate within
each round, so slow drift of the machine falls on both alike; the table gives each case's median and fastest
step per checkout and their ratios, with the machine's matmul peak measured before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

SHAPES = {"minilm": (32, 128), "smollm2": (4, 256)}  # the benchmark's main (batch, tokens)
_WORKER = """
import json, sys, time
try:
    from sft_jax import platform
    platform.configure_cpu()
except ImportError:  # checkouts from before sft_jax.platform set the CPU up on import
    import sft_jax
from experiments.benchmarks import ours
model, strategy, dtype, batch, seq, warmup, steps = sys.argv[1:8]
step = ours.OursStep(model, strategy, dtype, int(batch), int(seq))
for _ in range(int(warmup)):
    step.step()
times = []
for _ in range(int(steps)):
    start = time.perf_counter()
    step.step()
    times.append(time.perf_counter() - start)
print(json.dumps(times))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repos", default="", help="two checkouts, comma-separated: A,B (B/A is the ratio)")
    p.add_argument("--cases", default="minilm-full,smollm2-full", help="MODEL-STRATEGY[-DTYPE], comma-separated")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", help="a JSON file for every timing")
    p.add_argument("--table_only", help="print the table of an earlier --out file and exit")
    args = p.parse_args()
    if args.table_only:
        with open(args.table_only) as f:
            saved = json.load(f)
        print(table(saved["cpu"], saved["times"], saved.get("setup", "")))
        return
    repos = [os.path.abspath(r) for r in args.repos.split(",") if r]
    if len(repos) != 2:
        p.error("--repos: give two checkouts, A,B")
    peaks = {"start": _peak(repos[1])}
    times: dict[str, dict[str, list[float]]] = {case: {r: [] for r in repos} for case in args.cases.split(",")}
    for i in range(args.rounds):
        for case in times:
            model, strategy, *dtype = case.split("-")
            for repo in repos if i % 2 == 0 else repos[::-1]:
                cmd = [sys.executable, "-c", _WORKER, model, strategy, dtype[0] if dtype else "float32",
                       *map(str, SHAPES[model]), str(args.warmup), str(args.steps)]
                out = subprocess.run(cmd, cwd=repo, env={**os.environ, "PYTHONPATH": repo}, check=True,
                                     capture_output=True, text=True).stdout
                times[case][repo] += json.loads(out.strip().splitlines()[-1])
                print(f"round {i + 1} {case} {repo}: {statistics.median(times[case][repo]):.3f} s", flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    peaks["end"] = _peak(repos[1])
    setup = (f"{os.cpu_count()} CPUs; JAX float32 2048^3 matmul peak {peaks['start']:.0f} GFLOP/s at the start, "
             f"{peaks['end']:.0f} at the end; {args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up")
    print(table(cpu, times, setup))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cpu": cpu, "setup": setup, "times": times}, f, indent=1)


def _peak(repo: str) -> float:
    """GFLOP/s of a float32 2048^3 matmul through XLA (the benchmark's `matmul_peak`), in a fresh process."""
    code = ("from sft_jax import platform; platform.configure_cpu()\n"
            "from experiments.benchmarks import ours; print(ours.matmul_peak('float32', 2048) / 1e9)")
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, env={**os.environ, "PYTHONPATH": repo},
                         check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def table(cpu: str, times: dict[str, dict[str, list[float]]], setup: str) -> str:
    """Median and fastest step of each case per checkout, and their ratios (second / first checkout)."""
    lines = [f"{cpu}; {setup}", ""]
    a, b = next(iter(times.values()))
    lines += [f"| case | median {a} | median {b} | ratio | fastest {a} | fastest {b} | ratio |",
              "|---|---|---|---|---|---|---|"]
    for case, by_repo in times.items():
        ma, mb = statistics.median(by_repo[a]), statistics.median(by_repo[b])
        fa, fb = min(by_repo[a]), min(by_repo[b])
        lines.append(f"| {case} | {ma:.3f} s | {mb:.3f} s | {mb / ma:.3f} | {fa:.3f} s | {fb:.3f} s | {fb / fa:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
