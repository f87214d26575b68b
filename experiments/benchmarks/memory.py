"""Peak memory of one framework's train step, each measured in a process of its own: in one process the
high-water mark is the sum of everything that process ever held (both frameworks, every variant of a group),
not a footprint.

    python -m experiments.benchmarks.run --memory_only=CASE --framework=jax|torch [--variant=eager|compile|...]

builds that one step, runs a few steps and prints {"peak_rss_mb": ...} (and the device's own peak on a GPU) as its
last line; `peak_memory` runs it from the benchmark's process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def vmhwm_mb() -> float:
    """This process's peak resident set (Linux VmHWM), in MiB; nan where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def measure_here(case: str, framework: str, variant: str, steps: int, model_dir: str | None) -> dict:
    """In the child process: build CASE's step for `framework` (`variant`: a cases.COMPILERS key, for
    torch), run `steps` steps, return the peaks. Imports only that framework."""
    from experiments.benchmarks.cases import parse_case, synthetic_batch

    model, strategy, dtype, batch, seq_len = parse_case(case)
    out: dict = {}
    if framework == "jax":
        import jax

        from experiments.benchmarks.ours import OursStep

        step = OursStep(model, strategy, dtype, batch, seq_len, model_dir=model_dir)
        for _ in range(steps):
            step.step()
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats and jax.devices()[0].platform != "cpu":
            out["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
    else:
        import torch

        from experiments.benchmarks.baseline import TorchStep, TorchVariant

        torch.set_num_threads(len(os.sched_getaffinity(0)))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_step = TorchStep(model, strategy, synthetic_batch(model, batch, seq_len), device,
                               os.path.join(HERE, "workdirs"), model_dir=model_dir)
        step = TorchVariant(torch_step, variant, dtype)
        for _ in range(steps):
            step.step()
        if device == "cuda":
            out["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out["peak_rss_mb"] = vmhwm_mb()
    # Which frameworks this process loaded: the PyTorch one never loads JAX. sft_jax's loads torch's libraries
    # (not a torch model) where torch is installed: transformers imports it to load the tokenizer, as in training.
    out["frameworks_loaded"] = [name for name in ("jax", "torch") if name in sys.modules]
    return out


def peak_memory(case: str, framework: str, *, variant: str = "eager", steps: int = 3, threads: int,
                model_dirs: str = "") -> dict:
    """Runs `measure_here` in a fresh process on the same `threads`; returns its peaks and the command, or
    {"error": one line} when that process failed."""
    cmd = [sys.executable, "-m", "experiments.benchmarks.run", f"--memory_only={case}", f"--framework={framework}",
           f"--variant={variant}", f"--memory_steps={steps}", f"--threads={threads}"]
    if model_dirs:
        cmd.append(f"--model_dir={model_dirs}")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"{framework} memory process exited {proc.returncode}: {tail}"[:300]}
    return json.loads(lines[-1])
