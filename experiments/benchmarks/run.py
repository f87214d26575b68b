"""Train-step throughput of sft_jax against PyTorch + transformers, in one process, alternating.

    python -m experiments.benchmarks.run [--quick] [--cases=main,sweeps | minilm-full,smollm2-lora,...]
                                         [--steps=N] [--rounds=R] [--threads=T]
                                         [--torch_variants=eager,compile,max-autotune]

Cases: MiniLM (all-MiniLM-L6-v2, sequence classification) at batch 32 x 128 and SmolLM2-135M (causal LM)
at batch 4 x 256, strategies full / partial / head / lora, sft_jax in float32 and bfloat16; then step time
against sequence length and batch size (float32). Each sft_jax row is compared with the fastest PyTorch variant
of the same dtype: eager, torch.compile (default) and torch.compile (max-autotune), each in float32 and in
bfloat16 autocast, all timed in the same run (a variant that fails to compile here is recorded as failed).
Each group's steps are built first, warmed up (the first call compiles), then timed in rounds that rotate
through them, so a load change on a shared machine hits all of them alike; the per-step time is the median
over rounds. Also measured in the same run: each framework's float32 / bfloat16 matmul peak (MFU denominators
and the peak-normalised ratio), compile time, and each framework's peak resident memory in a process of its
own (memory.py). Runs unchanged on a GPU (the device is recorded).
Writes results.json, meta.json, RESULTS.md and plots to --out (default: next to this file).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import numpy as np

from experiments.benchmarks.cases import COMPILERS, DTYPES, case_name, synthetic_batch, variant_name
from experiments.benchmarks.comparison import score
from experiments.benchmarks.machine import describe_cpu, device_name
from experiments.benchmarks.timing import measure

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


def run_group(model: str, strategy: str, batch: int, seq_len: int, dtypes, args, torch_device: str,
              peaks: dict, memory: bool = True) -> list[dict]:
    """sft_jax in each of `dtypes` and every PyTorch variant of those dtypes, timed in one rotation; one
    record per sft_jax dtype. `memory`: also each framework's peak RSS, in separate processes."""
    import torch

    from experiments.benchmarks.baseline import TorchStep, TorchVariant
    from experiments.benchmarks.ours import OursStep

    model_dir = args.model_dirs.get(model)
    steps, ours = {}, {}
    for dtype in dtypes:
        ours[dtype] = steps[f"ours-{dtype}"] = OursStep(model, strategy, dtype, batch, seq_len, model_dir=model_dir)
    torch_step = TorchStep(model, strategy, synthetic_batch(model, batch, seq_len), torch_device,
                           os.path.join(HERE, "workdirs"), model_dir=model_dir)
    variants = {variant_name(c, d): TorchVariant(torch_step, c, d) for d in dtypes for c in args.torch_variants}
    steps.update(variants)
    m = measure(steps, args.rounds, args.steps, args.warmup, may_fail=set(variants))
    torch_variants = {name: variant_times(m[name], v, batch * seq_len) for name, v in variants.items()}
    records = [ours_record(model, strategy, dtype, batch, seq_len, step, m[f"ours-{dtype}"], torch_variants, peaks)
               for dtype, step in ours.items()]
    del steps, ours, variants, torch_step
    torch._dynamo.reset()  # this group's compiled graphs: later groups' models would hit the recompile limit
    gc.collect()
    if memory:  # after this process let go of the group's models (the machine's memory is shared)
        for rec in records:
            add_peak_memory(rec, args)
    return records


def variant_times(t: dict, variant, tokens: int) -> dict:
    """A PyTorch variant's entry in a record's `torch_variants`: its times, or its one-line error."""
    head = {"compiler": variant.compiler, "dtype": variant.dtype}
    if "error" in t:
        return head | {"error": t["error"]}
    return head | {"step_s": t["step_s"], "tokens_per_s": tokens / t["step_s"], "cpu_s_per_step": t["cpu_s"],
                   "step_times_s": t["times"], "first_step_s": t["first_step_s"]}


def ours_record(model: str, strategy: str, dtype: str, batch: int, seq_len: int, step, t: dict,
                torch_variants: dict, peaks: dict) -> dict:
    """One results.json row: sft_jax's times in `dtype` against the fastest PyTorch variant of that dtype."""
    tokens = batch * seq_len
    rec = {"case": case_name(model, strategy, dtype, batch, seq_len), "model": model, "strategy": strategy,
           "dtype": dtype, "batch": batch, "seq_len": seq_len, "device": peaks["device"],
           "ours_tokens_per_s": tokens / t["step_s"], "ours_step_s": t["step_s"],
           # CPU seconds (all threads) per step: less sensitive than wall time to other jobs' load
           "ours_cpu_s_per_step": t["cpu_s"], "ours_step_times_s": t["times"],
           "compile_s": max(t["first_step_s"] - t["step_s"], 0.0), "flops_per_step": step.flops_per_step(seq_len),
           "trainable_params": int(sum(np.prod(step.shapes[n]) for n in step.trainable)),
           "torch_variants": torch_variants, "load_avg_1m": os.getloadavg()[0]}
    score(rec, peaks)
    peer = (f"{rec['baseline']} {rec['baseline_tokens_per_s']:9.1f} tok/s  ratio {rec['ratio']:.2f} "
            f"(peak-normalised {rec['ratio_peak_normalised']:.2f})" if rec["baseline"] else "no PyTorch variant ran")
    print(f"{rec['case']:<40} ours {rec['ours_tokens_per_s']:9.1f} tok/s  {peer}  mfu {rec['mfu']:.2f}"
          f"  compile {rec['compile_s']:.1f}s", flush=True)
    return rec


def add_peak_memory(rec: dict, args) -> None:
    """Each framework's peak RSS for rec's case, each in a process of its own; PyTorch's in the variant the
    row is compared with (eager where none ran)."""
    from experiments.benchmarks.memory import peak_memory

    variant = rec["torch_variants"][rec["baseline"]]["compiler"] if rec["baseline"] else "eager"
    common = dict(steps=args.memory_steps, threads=args.threads_used, model_dirs=args.model_dir)
    for key, framework, kw in (("ours", "jax", {}), ("torch", "torch", {"variant": variant})):
        got = peak_memory(rec["case"], framework, **common, **kw)
        if "error" in got:
            rec[f"{key}_memory_error"] = got["error"]
            print(f"{rec['case']}: {got['error']}", flush=True)
        rec[f"{key}_peak_rss_mb"] = got.get("peak_rss_mb")
        rec[f"{key}_memory_process_loaded"] = got.get("frameworks_loaded")
        if "device_peak_mb" in got:
            rec[f"{key}_device_peak_mb"] = got["device_peak_mb"]
    rec["torch_peak_rss_variant"], rec["memory_steps"] = variant, args.memory_steps


def run_unit(unit: str, sweeps: dict, records: list, args, torch_device: str, peaks: dict, save) -> None:
    """One main group (MODEL-STRATEGY, float32 and bfloat16) or one sweep, appended to `records`."""
    if unit in sweeps:
        model, strategy, points = sweeps[unit]
        for batch, seq_len in points:
            # no memory processes per sweep point: the sweep tables show step times
            for rec in run_group(model, strategy, batch, seq_len, ("float32",), args, torch_device, peaks,
                                 memory=False):
                records.append({**rec, "case": f"{unit}:{rec['case']}", "sweep": unit})
            save()
        return
    model, strategy = unit.split("-")
    batch, seq_len = args.batch or MAIN[model][0], args.seq_len or MAIN[model][1]
    # SmolLM2's float32 and bfloat16 states are not held at once (memory): one group per dtype, each with
    # its own PyTorch variants of that dtype.
    for dtypes in (("float32",), ("bfloat16",)) if model == "smollm2" else (DTYPES,):
        records.extend(run_group(model, strategy, batch, seq_len, dtypes, args, torch_device, peaks))
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
    p.add_argument("--torch_variants", default=",".join(COMPILERS),
                   help=f"PyTorch variants timed in each dtype (comma list of {', '.join(COMPILERS)})")
    p.add_argument("--batch", type=int, help="the main cases' batch size (default: 32 MiniLM, 4 SmolLM2)")
    p.add_argument("--seq_len", type=int, help="the main cases' sequence length (default: 128 MiniLM, 256 SmolLM2)")
    p.add_argument("--model_dir", default="",
                   help="MODEL=DIR,...: the same architecture from another directory (both frameworks; the smoke "
                        "test's tiny random BERT)")
    p.add_argument("--matmul_n", type=int, help="matmul peak size (default: 2048 on CPU, 8192 on GPU)")
    p.add_argument("--memory_steps", type=int, default=3, help="steps each peak-memory process runs")
    p.add_argument("--memory_only", "--memory-only", metavar="CASE",
                   help="measure only the peak memory of CASE (MODEL-STRATEGY-DTYPE-bB-tT) for --framework, in "
                        "this process, and print it as JSON (what the benchmark runs per case)")
    p.add_argument("--framework", choices=("jax", "torch"), help="with --memory_only")
    p.add_argument("--variant", default="eager", choices=tuple(COMPILERS), help="with --memory_only, for torch")
    p.add_argument("--out", default=HERE, help="where results.json, RESULTS.md and plots go")
    p.add_argument("--report_only", action="store_true",
                   help="rewrite RESULTS.md from the results.json and meta.json in --out (no measuring)")
    args = p.parse_args(argv)
    if args.report_only:
        from experiments.benchmarks.report import write_report

        with open(os.path.join(args.out, "results.json")) as f, open(os.path.join(args.out, "meta.json")) as g:
            write_report(json.load(f), json.load(g), args.out)
        return
    args.model_dirs = dict(kv.split("=", 1) for kv in args.model_dir.split(",") if kv)
    args.torch_variants = [v for v in args.torch_variants.split(",") if v]
    if unknown := [v for v in args.torch_variants if v not in COMPILERS]:
        p.error(f"--torch_variants: unknown {unknown}; expected some of {', '.join(COMPILERS)}")
    if args.threads:  # both XLA's and torch's thread pools size themselves from the affinity mask
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    args.threads_used = threads = len(os.sched_getaffinity(0))

    from sft_jax import host_malloc, platform

    platform.configure_cpu()  # before JAX and torch: the malloc settings must precede any thread's first malloc
    if args.memory_only:
        if not args.framework:
            p.error("--memory_only needs --framework=jax|torch")
        from experiments.benchmarks.memory import measure_here

        print(json.dumps(measure_here(args.memory_only, args.framework, args.variant, args.memory_steps,
                                      args.model_dirs.get(args.memory_only.split("-")[0]))), flush=True)
        return
    os.makedirs(args.out, exist_ok=True)
    args.steps = args.steps or (1 if args.quick else 3)
    args.rounds = args.rounds or (2 if args.quick else 5)
    # 2 even with --quick: after a group's steps are built, the second step is the first on a settled heap
    args.warmup = args.warmup or 2
    import jax
    import torch

    torch.set_num_threads(threads)
    from experiments.benchmarks.baseline import torch_matmul_peak
    from experiments.benchmarks.ours import matmul_peak

    torch_device = "cuda" if torch.cuda.is_available() and jax.devices()[0].platform == "gpu" else "cpu"
    on_cpu = jax.devices()[0].platform == "cpu"
    n = args.matmul_n or (2048 if on_cpu else 8192)
    load_start = os.getloadavg()
    peaks = {"device": device_name(), "threads": threads, "matmul_n": n}

    # On CPU the JAX peak is the best of the matmul libraries the steps compile with (XLA's own and oneDNN's,
    # `config.cpu_matmuls`): the MiniLM steps run their dots in oneDNN, which reaches a higher 2048^3 rate.
    jax_libs = ("xla", "onednn") if on_cpu else ("xla",)

    def measure_peaks(when: str) -> None:  # at start and end; the best counts (a loaded machine only lowers it)
        for dtype in DTYPES:
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
                "host_malloc": host_malloc.applied(),
                # the machine beside every figure; threads: both frameworks' pools (affinity mask, set_num_threads)
                "cpu": describe_cpu() if on_cpu else None,
                "threads": {"jax": threads, "torch": torch.get_num_threads()},
                "torch_variants": args.torch_variants, "torch_attention": "sdpa", "memory_steps": args.memory_steps}
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
    for r in records:  # MFU and the peak-normalised ratio against the final (best) peaks
        score(r, peaks)
    save(final=True)


if __name__ == "__main__":
    main()
