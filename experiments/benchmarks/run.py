"""Train-step throughput of sft_jax against PyTorch + transformers, in one process, alternating.

    python -m experiments.benchmarks.run [--quick] [--cases=main,sweeps | minilm-full,smollm2-lora,...]
                                         [--steps=N] [--rounds=R] [--threads=T]

Cases: MiniLM (all-MiniLM-L6-v2, sequence classification) at batch 32 x 128 and SmolLM2-135M (causal LM)
at batch 4 x 256, strategies full / partial / head / lora, sft_jax in float32 and bfloat16 against PyTorch
float32 (and PyTorch bfloat16 autocast for reference); then step time against sequence length and batch size.
Each group's steps are built first, warmed up (ours: the first call compiles), then timed in rounds that
rotate through them, so a load change on a shared machine hits all of them alike; the per-step time is the
median over rounds. Also measured in the same run: the float32 / bfloat16 matmul peak (MFU denominator),
compile time and peak resident memory. Runs unchanged on a GPU (the device is recorded).
Writes results.json, RESULTS.md and plots next to this file.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

STRATEGIES = ("full", "partial", "head", "lora")
MAIN = {"minilm": (32, 128), "smollm2": (4, 256)}
# sft_jax implements LoRA for decoders only (classification rejects strategy=lora).
SUPPORTED = {("minilm", "lora"): False}
SWEEPS = {  # name: (model, strategy, [(batch, seq_len), ...])
    "seq-minilm": ("minilm", "full", [(8, s) for s in (64, 128, 256, 512)]),
    "seq-smollm2": ("smollm2", "lora", [(1, s) for s in (64, 128, 256, 512, 1024)]),
    "batch-minilm": ("minilm", "full", [(b, 128) for b in (4, 8, 16, 32, 64)]),
}
QUICK_SWEEPS = {
    "seq-minilm": ("minilm", "full", [(8, s) for s in (64, 256, 512)]),
    "seq-smollm2": ("smollm2", "lora", [(1, s) for s in (64, 256, 512)]),
    "batch-minilm": ("minilm", "full", [(b, 128) for b in (4, 8, 16)]),
}


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> None:
    try:  # Linux: "5" resets VmHWM, so each timed segment sees its own peak
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def measure(steps: dict, rounds: int, per_round: int, warmup: int) -> dict[str, dict]:
    """Median seconds per step of each step object, timed in rotating rounds, and its first-call time."""
    out = {name: {"times": [], "cpu": [], "peak_rss_mb": 0.0} for name in steps}
    for name, s in steps.items():
        t = time.perf_counter()
        s.step()
        out[name]["first_step_s"] = time.perf_counter() - t
        for _ in range(warmup - 1):
            s.step()
    names = list(steps)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            gc.collect()
            _reset_peak_rss()
            t, c = time.perf_counter(), time.process_time()
            for _ in range(per_round):
                loss = steps[name].step()
            out[name]["times"].append((time.perf_counter() - t) / per_round)
            out[name]["cpu"].append((time.process_time() - c) / per_round)
            out[name]["peak_rss_mb"] = max(out[name]["peak_rss_mb"], _rss_mb("VmHWM"))
            if loss != loss:
                raise FloatingPointError(f"{name}: loss is NaN")
    for v in out.values():
        v["step_s"] = statistics.median(v["times"])
        v["cpu_s"] = statistics.median(v["cpu"])
    return out


def device_name() -> str:
    import jax

    d = jax.devices()[0]
    if d.platform == "cpu":
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line),
                   platform.processor())
        return f"cpu: {cpu} ({len(os.sched_getaffinity(0))} threads)"
    return f"{d.platform}: {d.device_kind}"


class Autocast:
    """The same torch model and optimizer, stepped under bfloat16 autocast."""

    def __init__(self, torch_step):
        self.torch_step = torch_step

    def step(self) -> float:
        self.torch_step.autocast = True
        try:
            return self.torch_step.step()
        finally:
            self.torch_step.autocast = False


def run_group(model: str, strategy: str, batch: int, seq_len: int, dtypes, args, torch_device: str,
              peaks: dict, torch_bf16: bool) -> list[dict]:
    from experiments.benchmarks.baseline import TorchStep
    from experiments.benchmarks.ours import OursStep, synthetic_batch

    steps, ours = {}, {}
    for dtype in dtypes:
        ours[dtype] = steps[f"ours-{dtype}"] = OursStep(model, strategy, dtype, batch, seq_len)
    torch_step = steps["torch-float32"] = TorchStep(model, strategy, synthetic_batch(model, batch, seq_len),
                                                    torch_device, os.path.join(HERE, "workdirs"))

    if torch_bf16:
        steps["torch-bf16-autocast"] = Autocast(torch_step)
    m = measure(steps, args.rounds, args.steps, args.warmup)
    tokens = batch * seq_len
    base = m["torch-float32"]
    records = []
    for dtype, s in ours.items():
        r = m[f"ours-{dtype}"]
        flops = s.flops_per_step(seq_len)
        rec = {"case": f"{model}-{strategy}-{dtype}-b{batch}-t{seq_len}", "model": model, "strategy": strategy,
               "dtype": dtype, "batch": batch, "seq_len": seq_len,
               "ours_tokens_per_s": tokens / r["step_s"], "baseline_tokens_per_s": tokens / base["step_s"],
               "ratio": base["step_s"] / r["step_s"], "mfu": flops / r["step_s"] / peaks[f"jax-{dtype}"],
               "device": peaks["device"], "baseline": "torch float32 eager (transformers, sdpa attention)",
               "ours_step_s": r["step_s"], "baseline_step_s": base["step_s"],
               # CPU seconds (all threads) per step: less sensitive than wall time to other jobs' load
               "ours_cpu_s_per_step": r["cpu_s"], "baseline_cpu_s_per_step": base["cpu_s"],
               "ours_step_times_s": r["times"], "baseline_step_times_s": base["times"],
               "compile_s": max(r["first_step_s"] - r["step_s"], 0.0),
               "baseline_first_step_s": base["first_step_s"],
               "ours_peak_rss_mb": r["peak_rss_mb"], "baseline_peak_rss_mb": base["peak_rss_mb"],
               "flops_per_step": flops, "baseline_mfu_vs_fp32_peak": flops / base["step_s"] / peaks["jax-float32"],
               "trainable_params": int(sum(__import__("numpy").prod(s.shapes[n]) for n in s.trainable)),
               "load_avg_1m": os.getloadavg()[0]}
        if "torch-bf16-autocast" in m:
            rec["baseline_bf16_autocast_tokens_per_s"] = tokens / m["torch-bf16-autocast"]["step_s"]
        records.append(rec)
        print(f"{rec['case']:<40} ours {rec['ours_tokens_per_s']:9.1f} tok/s  torch {rec['baseline_tokens_per_s']:9.1f}"
              f"  ratio {rec['ratio']:.2f}  mfu {rec['mfu']:.2f}  compile {rec['compile_s']:.1f}s", flush=True)
    del steps, ours, torch_step
    gc.collect()
    return records


def run_unit(unit: str, sweeps: dict, records: list, args, torch_device: str, peaks: dict, save) -> None:
    """One main group (MODEL-STRATEGY, float32 and bfloat16) or one sweep, appended to `records`."""
    if unit in sweeps:
        model, strategy, points = sweeps[unit]
        for batch, seq_len in points:
            for rec in run_group(model, strategy, batch, seq_len, ("float32",), args, torch_device, peaks,
                                 torch_bf16=False):
                records.append({**rec, "case": f"{unit}:{rec['case']}", "sweep": unit})
            save()
        return
    model, strategy = unit.split("-")
    batch, seq_len = MAIN[model]
    # SmolLM2's float32 and bfloat16 states are not held at once (memory): one group per dtype, each with
    # its own alternating PyTorch float32 measurement.
    for dtypes in (("float32",), ("bfloat16",)) if model == "smollm2" else (("float32", "bfloat16"),):
        records.extend(run_group(model, strategy, batch, seq_len, dtypes, args, torch_device, peaks,
                                 torch_bf16=model in args.torch_bf16.split(",") and "float32" in dtypes))
        save()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds and sweep points (a CPU-budget run)")
    p.add_argument("--cases", default="main,sweeps",
                   help="comma list: main, sweeps, MODEL-STRATEGY (e.g. minilm-full), or a sweep name "
                        f"({', '.join(SWEEPS)})")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (rotating through the variants)")
    p.add_argument("--warmup", type=int, default=0,
                   help="untimed steps first, the first one compiling (default 2)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for both (0: all this process may use)")
    p.add_argument("--torch_bf16", default="minilm",
                   help="models (comma list, or 'none') that also get the PyTorch bfloat16 autocast reference")
    p.add_argument("--out", default=HERE, help="where results.json, RESULTS.md and plots go")
    p.add_argument("--report_only", action="store_true",
                   help="rewrite RESULTS.md from the results.json and meta.json in --out (no measuring)")
    args = p.parse_args(argv)
    if args.report_only:
        from experiments.benchmarks.report import write_report

        with open(os.path.join(args.out, "results.json")) as f, open(os.path.join(args.out, "meta.json")) as g:
            write_report(json.load(f), json.load(g), args.out)
        return
    os.makedirs(args.out, exist_ok=True)
    args.steps = args.steps or (1 if args.quick else 3)
    args.rounds = args.rounds or (2 if args.quick else 5)
    # 2 even with --quick: after a group's steps are built, the second step is the first on a settled heap
    args.warmup = args.warmup or 2
    if args.threads:  # both XLA's and torch's thread pools size themselves from the affinity mask
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    threads = len(os.sched_getaffinity(0))

    from sft_jax import host_malloc, platform

    platform.configure_cpu()  # before JAX and torch: the malloc settings must precede any thread's first malloc
    import jax
    import torch

    torch.set_num_threads(threads)
    from experiments.benchmarks.baseline import torch_matmul_peak
    from experiments.benchmarks.ours import matmul_peak

    torch_device = "cuda" if torch.cuda.is_available() and jax.devices()[0].platform == "gpu" else "cpu"
    n = 2048 if jax.devices()[0].platform == "cpu" else 8192
    load_start = os.getloadavg()
    peaks = {"device": device_name(), "threads": threads, "matmul_n": n}

    # On CPU the JAX peak is the best of the matmul libraries the steps compile with (XLA's own and oneDNN's,
    # `config.cpu_matmuls`): the MiniLM steps run their dots in oneDNN, which reaches a higher 2048^3 rate.
    jax_libs = ("xla", "onednn") if jax.devices()[0].platform == "cpu" else ("xla",)

    def measure_peaks(when: str) -> None:  # at start and end; the best counts (a loaded machine only lowers it)
        for dtype in ("float32", "bfloat16"):
            readings = {f"jax-{dtype}-{lib}": matmul_peak(dtype, n, library=lib) for lib in jax_libs}
            readings[f"torch-{dtype}"] = torch_matmul_peak(dtype, n, torch_device)
            for key, value in readings.items():
                peaks[f"{key}-{when}"] = value
                peaks[key] = max(peaks.get(key, 0.0), value)
            peaks[f"jax-{dtype}"] = max(peaks[f"jax-{dtype}-{lib}"] for lib in jax_libs)
        print(json.dumps(peaks), flush=True)

    measure_peaks("start")

    sweeps = QUICK_SWEEPS if args.quick else SWEEPS
    # Units run in the order given (incremental saves: what ran first is kept if the run is cut short).
    groups = [f"{m}-{s}" for m in MAIN for s in STRATEGIES if SUPPORTED.get((m, s), True)]
    units = []
    for name in args.cases.split(","):
        expanded = groups if name == "main" else list(sweeps) if name == "sweeps" else [name]
        for unit in expanded:
            if unit not in groups and unit not in sweeps:
                p.error(f"--cases: unknown case {unit!r}; expected main, sweeps, {', '.join(groups + list(sweeps))}")
            units.append(unit)
    records, t0 = [], time.time()
    command = "python -m experiments.benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])

    def save(final: bool = False) -> None:  # after every group: a long run shows (and keeps) its progress
        meta = {"peaks_flops": peaks, "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
                "wall_s": time.time() - t0, "jax": jax.__version__, "torch": torch.__version__,
                "command": command.strip(), "complete": final,
                "steps_per_round": args.steps, "rounds": args.rounds, "warmup": args.warmup,
                "host_malloc": host_malloc.applied()}
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(records, f, indent=1)
        with open(os.path.join(args.out, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        from experiments.benchmarks.report import write_report

        write_report(records, meta, args.out)

    errors = {}
    for unit in units:
        try:
            run_unit(unit, sweeps, records, args, torch_device, peaks, save)
        except Exception as e:  # noqa: BLE001 - one failing case must not lose the others' measurements
            import traceback

            traceback.print_exc()
            errors[unit] = f"{type(e).__name__}: {e}"
            peaks["errors"] = errors
            save()
    measure_peaks("end")
    # MFU against the final (best) peaks
    for r in records:
        flops_rate = r["flops_per_step"] / r["ours_step_s"]
        r["mfu"] = flops_rate / peaks[f"jax-{r['dtype']}"]
        r["baseline_mfu_vs_fp32_peak"] = r["flops_per_step"] / r["baseline_step_s"] / peaks["jax-float32"]
    save(final=True)


if __name__ == "__main__":
    main()
