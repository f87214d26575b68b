"""GPU check, at most about 5 minutes: `make gpu-check` (or `python -m experiments.gpu_check.run`).

On a machine whose JAX sees a GPU (CUDA jaxlib installed; no network needed):
1. the parity tests that matter on a new backend (decoder families against transformers, remat gradients, the
   chunked loss, QLoRA's matmul) run on the accelerator;
2. the train step of random-weight models of SmolLM2-135M, Gemma 3 270M and Llama-3.2-1B shapes (`shapes/`),
   LoRA and full fine-tuning, bfloat16 compute, runs for a few timed steps: tokens/s, peak memory where the
   backend reports it, and MFU against this device's measured bfloat16 matmul peak (model FLOPs from
   `sft_jax.flops`, the planner's count);
3. the cost of `config.deterministic` (XLA's deterministic-ops flag, which bit-identical resumes need on GPU):
   the SmolLM2-135M-shape full fine-tuning step again, in a fresh process with the flag, against step 2's time.

Writes results.json and RESULTS.md here, naming the device. `--quick` (tiny sizes, nothing written) checks the
script itself, on CPU too.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
SHAPES = ("smollm2-135m", "gemma3-270m", "llama-3.2-1b")
PARITY = ["tests/test_decoder_families.py::test_family_matches_transformers", "tests/test_remat.py",
          "tests/test_chunked_loss.py", "tests/test_qlora.py::test_matmul_gradient_without_a_float_copy"]


def parity(timeout: int) -> dict:
    t = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *PARITY],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    print(f"parity tests: {tail} ({time.time() - t:.0f} s)", flush=True)
    return {"returncode": proc.returncode, "summary": tail}


def bf16_peak(n: int) -> float:
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def config_for(shape: str, strategy: str, batch: int, length: int):
    from sft_jax.config_defaults import defaults

    c = defaults()
    c.task, c.model, c.strategy = "language_modeling", str(HERE / "shapes" / f"{shape}.json"), strategy
    c.data.train = c.data.eval = "random-weights.txt"  # never read: the planner's step runs on zeros
    c.dtype = "bfloat16"
    c.param_dtype = "bfloat16" if strategy == "lora" else "float32"
    c.batch_size, c.max_length, c.buckets = batch, length, (length,)
    c.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    c.lm_loss_chunk = 256
    return c


def throughput(shape: str, strategy: str, batch: int, length: int, steps: int, peak: float) -> dict:
    import jax

    from sft_jax.plan import compile_step, plan_of
    from sft_jax.plan.measure import builders

    t0 = time.time()
    step = compile_step(config_for(shape, strategy, batch, length), jax.devices()[:1])
    planned = plan_of(step)
    compile_s = time.time() - t0
    make_state, make_batch = builders(step)
    state, data = make_state(), make_batch()
    for _ in range(2):
        state, metrics = step.compiled(state, data)
    jax.block_until_ready(metrics)
    t = time.perf_counter()
    for _ in range(steps):
        state, metrics = step.compiled(state, data)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - t) / steps
    stats = jax.devices()[0].memory_stats() or {}
    row = {"shape": shape, "strategy": strategy, "batch": batch, "length": length,
           "tokens_per_s": planned.tokens_per_step / seconds, "step_s": seconds,
           "mfu": planned.flops_per_step / seconds / peak, "planned_gb": planned.total / 1e9,
           "peak_gb": stats.get("peak_bytes_in_use", 0) / 1e9 or None, "compile_s": compile_s}
    print(f"{shape:14} {strategy:5} {row['tokens_per_s']:10.0f} tokens/s  MFU {100 * row['mfu']:5.1f}%  "
          f"planned {row['planned_gb']:.1f} GB, peak {row['peak_gb'] or float('nan'):.1f} GB", flush=True)
    return row


def deterministic_cost(plain: dict, steps: int, timeout: int) -> dict:
    """`plain`'s step again with `config.deterministic`'s XLA flag, in a fresh process (XLA reads XLA_FLAGS once,
    when the backend starts): its step time and the ratio to `plain`'s."""
    from sft_jax.platform import determinism_flags

    env = {**os.environ, "XLA_FLAGS": determinism_flags(True, True, os.environ.get("XLA_FLAGS", ""))}
    spec = f"{plain['shape']},{plain['strategy']},{plain['batch']},{plain['length']},{steps}"
    proc = subprocess.run([sys.executable, "-m", "experiments.gpu_check.run", "--one_step_time", spec], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        print(f"deterministic step failed: {proc.stderr[-500:]}", flush=True)
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    step_s = json.loads(proc.stdout.strip().splitlines()[-1])["step_s"]
    row = {"shape": plain["shape"], "strategy": plain["strategy"], "flag": env["XLA_FLAGS"],
           "step_s": step_s, "plain_step_s": plain["step_s"], "slowdown": step_s / plain["step_s"]}
    print(f"config.deterministic: {plain['shape']} {plain['strategy']} step {step_s:.4f} s vs "
          f"{plain['step_s']:.4f} s (x{row['slowdown']:.2f})", flush=True)
    return row


def write(results: dict) -> None:
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    lines = [f"# GPU check: {results['device']}", "",
             f"Command: `python -m experiments.gpu_check.run{' --quick' if results['quick'] else ''}`; "
             f"JAX {results['jax']}; bfloat16 matmul peak measured {results['peak_tflops']:.1f} TFLOP/s.", "",
             f"Parity tests on the device: {results['parity']['summary']}", "",
             "| shape | strategy | batch x length | tokens/s | MFU | planned GB | peak GB |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        peak = f"{r['peak_gb']:.1f}" if r["peak_gb"] else "n/a"
        lines.append(f"| {r['shape']} | {r['strategy']} | {r['batch']} x {r['length']} | {r['tokens_per_s']:.0f} | "
                     f"{100 * r['mfu']:.1f}% | {r['planned_gb']:.1f} | {peak} |")
    lines += ["", "MFU: model FLOPs of a step (`sft_jax.flops.step_flops`: 6N per token for trained matmul weights, "
              "4N for frozen ones that backprop passes, plus causal attention) over step time and the measured peak. "
              "Random weights (zeros); the planner's compiled step; 2 warm-up steps, then the timed ones."]
    d = results.get("deterministic", {})
    if "slowdown" in d:
        lines += ["", f"`config.deterministic=True` ({d['flag']}): {d['shape']} {d['strategy']} step "
                      f"{d['step_s']:.4f} s against {d['plain_step_s']:.4f} s without (x{d['slowdown']:.2f})."]
    (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (checks the script, e.g. on CPU)")
    parser.add_argument("--skip_parity", action="store_true")
    parser.add_argument("--one_step_time", default="", help="SHAPE,STRATEGY,BATCH,LENGTH,STEPS: time that "
                        "step alone and print it as JSON (used with XLA flags of its own)")
    args = parser.parse_args()
    import jax

    if args.one_step_time:
        shape, strategy, batch, length, steps = args.one_step_time.split(",")
        print(json.dumps(throughput(shape, strategy, int(batch), int(length), int(steps), peak=1.0)))
        return

    device = jax.devices()[0]
    name = f"{device.platform}: {getattr(device, 'device_kind', '')} x{jax.device_count()}"
    print(f"device {name}, JAX {jax.__version__}", flush=True)
    results = {"device": name, "jax": jax.__version__, "quick": args.quick,
               "parity": {"summary": "skipped"} if args.skip_parity else parity(150)}
    peak = bf16_peak(1024 if args.quick else 8192)
    results["peak_tflops"] = peak / 1e12
    batch, length, steps = (1, 128, 2) if args.quick else (8, 1024, 10)
    shapes = SHAPES[:1] if args.quick else SHAPES
    results["rows"] = [throughput(s, strategy, batch, length, steps, peak) for s in shapes
                       for strategy in ("lora", "full")]
    results["deterministic"] = deterministic_cost(results["rows"][1], steps, timeout=120)
    if args.quick:  # a check of the script, not figures to keep
        return
    write(results)
    print(f"wrote {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
