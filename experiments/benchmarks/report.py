"""RESULTS.md (tables, targets, plots) from the benchmark's records; the folder's notes.md (the analysis) is
appended."""

from __future__ import annotations

import os

from experiments.common import markdown_table

HERE = os.path.dirname(os.path.abspath(__file__))


def _find(records, model, strategy, dtype):
    return next((r for r in records if r["model"] == model and r["strategy"] == strategy and r["dtype"] == dtype
                 and "sweep" not in r), None)


def targets(records) -> list[list]:
    """(target, measured, met) for each target of the issue that this run measured."""
    rows = []
    for model in ("minilm", "smollm2"):
        r = _find(records, model, "full", "float32")
        if r:
            rows.append([f"{model} full float32 >= 1.0x PyTorch", f"{r['ratio']:.2f}x", r["ratio"] >= 1.0])
    for r in records:
        if r["dtype"] == "bfloat16" and "sweep" not in r:
            rows.append([f"{r['model']} {r['strategy']} bfloat16 >= 1.5x PyTorch float32", f"{r['ratio']:.2f}x",
                         r["ratio"] >= 1.5])
    head, full = _find(records, "minilm", "head", "float32"), _find(records, "minilm", "full", "float32")
    if head and full:
        x = full["ours_step_s"] / head["ours_step_s"]
        cpu = full["ours_cpu_s_per_step"] / head["ours_cpu_s_per_step"]
        rows.append(["minilm head >= 3x minilm full (float32)", f"{x:.2f}x ({cpu:.2f}x in CPU s)", x >= 3.0])
    if full:
        # An MFU above 100% anywhere means the peak (measured under other jobs' load) is understated.
        ok = "unreliable" if any(r["mfu"] > 1.0 for r in records) else full["mfu"] >= 0.7
        rows.append(["minilm full float32 MFU >= 70% of the float32 matmul peak", f"{full['mfu']:.0%}", ok])
    return [[t, m, ok if isinstance(ok, str) else "yes" if ok else "**no**"] for t, m, ok in rows]


def _plot(records, out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = []
    for sweep, axis in (("seq-minilm", "seq_len"), ("seq-smollm2", "seq_len"), ("batch-minilm", "batch")):
        rs = sorted((r for r in records if r.get("sweep") == sweep), key=lambda r: r[axis])
        if not rs:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        xs = [r[axis] for r in rs]
        ax.plot(xs, [r["ours_step_s"] for r in rs], "o-", label="sft_jax float32")
        ax.plot(xs, [r["baseline_step_s"] for r in rs], "s--", label="PyTorch float32")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(axis)
        ax.set_ylabel("seconds per train step")
        ax.set_title(f"{rs[0]['model']} {rs[0]['strategy']}, " +
                     (f"batch {rs[0]['batch']}" if axis == "seq_len" else f"seq_len {rs[0]['seq_len']}"))
        ax.legend()
        fig.tight_layout()
        name = f"{sweep}.png"
        fig.savefig(os.path.join(out, name), dpi=100)
        plt.close(fig)
        lines += [f"![{sweep}]({name})", ""]
    return lines


def _quiet(meta: dict) -> bool:
    """No other jobs: the 1-minute load average stayed near the benchmark's own (at most one per thread + 1)."""
    limit = meta["peaks_flops"].get("threads", 1) + 1
    return max(meta["load_avg_start"][0], meta["load_avg_end"][0]) <= limit


def _by_library(peaks: dict) -> str:
    """" (XLA float32 ..., oneDNN float32 ...)": the JAX peak is the best of the CPU matmul libraries measured
    (runs before stop 19 measured XLA's only)."""
    names = {"xla": "XLA", "onednn": "oneDNN"}
    parts = [f"{names[lib]} {dtype} {peaks[f'jax-{dtype}-{lib}'] / 1e9:.1f}" for dtype in ("float32", "bfloat16")
             for lib in names if f"jax-{dtype}-{lib}" in peaks]
    return f" (best of: {', '.join(parts)})" if parts else ""


def write_report(records: list[dict], meta: dict, out: str) -> None:
    peaks = meta["peaks_flops"]
    lines = ["# Train-step throughput: sft_jax vs PyTorch + transformers", "",
             "Made by (the numbers below are that run's):", "", "```", meta["command"], "```", "",
             f"- device: {peaks['device']}; both frameworks on the same {peaks['threads']} threads "
             f"(affinity mask; `torch.set_num_threads`); jax {meta['jax']}, torch {meta['torch']}",
             f"- matmul peak ({peaks['matmul_n']}^3, measured in this run, the best at start and end): JAX float32 "
             f"{peaks['jax-float32'] / 1e9:.1f} GFLOP/s, JAX bfloat16 {peaks['jax-bfloat16'] / 1e9:.1f} GFLOP/s"
             + _by_library(peaks) + f"; PyTorch float32 {peaks['torch-float32'] / 1e9:.1f}, bfloat16 "
             f"{peaks['torch-bfloat16'] / 1e9:.1f}",
             f"- machine load average (1, 5, 15 min) at start {tuple(round(x, 1) for x in meta['load_avg_start'])},"
             f" at end {tuple(round(x, 1) for x in meta['load_avg_end'])} ("
             + ("no other jobs on this machine; it is a virtual machine, though, whose speed still drifted by "
                "+-15% between runs" if _quiet(meta) else "a shared machine: other jobs ran alongside")
             + "; variants are timed in rotating rounds so they see the same conditions)",
             f"- timing: {meta['warmup']} warm-up steps (the first compiles), then {meta['rounds']} rounds of "
             f"{meta['steps_per_round']} step(s) per variant; median per-step time; wall {meta['wall_s']:.0f} s",
             "- baseline: PyTorch eager float32 (transformers `BertModel` / `LlamaForCausalLM`, sdpa attention), "
             "the same weights, batch, strategy (frozen parameters `requires_grad=False`), AdamW (weight decay "
             "0.01) and gradient clipping; LoRA rank 8 on q/k/v/o/gate/up/down in both. `ratio` = baseline step "
             "time / ours (wall clock); `ratio (CPU s)` the same with CPU seconds per step (all threads), which other "
             "jobs' load disturbs less; bfloat16 rows compare sft_jax bfloat16 with PyTorch float32",
             "- MFU = model FLOPs per step / step time / the JAX matmul peak of the same dtype. Model FLOPs: per "
             "token 2N forward for every matmul weight of N entries, 2N for its input gradient where backprop "
             "passes through it, 2N for its weight gradient where it trains (6N for `full`); attention "
             "4 * seq_len * width per layer forward (half when causal), x3 where backprop passes; embedding "
             "lookups free (a tied LM head counted as a matmul)", ""]
    main = [r for r in records if "sweep" not in r]
    if main:
        autocast = any("baseline_bf16_autocast_tokens_per_s" in r for r in main)
        header = ["model", "strategy", "dtype", "batch x seq", "sft_jax tok/s", "PyTorch fp32 tok/s", "ratio",
                  "ratio (CPU s)"] + (["PyTorch bf16 autocast tok/s"] if autocast else []) + [
                  "MFU", "compile s", "peak RSS MB ours / torch", "trainable"]
        rows = [[r["model"], r["strategy"], r["dtype"], f"{r['batch']}x{r['seq_len']}",
                 f"{r['ours_tokens_per_s']:.0f}", f"{r['baseline_tokens_per_s']:.0f}", f"{r['ratio']:.2f}",
                 f"{r['baseline_cpu_s_per_step'] / r['ours_cpu_s_per_step']:.2f}"]
                + ([f"{r['baseline_bf16_autocast_tokens_per_s']:.0f}" if "baseline_bf16_autocast_tokens_per_s" in r
                    else "-"] if autocast else [])
                + [f"{r['mfu']:.0%}", f"{r['compile_s']:.1f}",
                   f"{r['ours_peak_rss_mb']:.0f} / {r['baseline_peak_rss_mb']:.0f}", f"{r['trainable_params']:,}"]
                for r in main]
        lines += ["## Main cases", ""] + markdown_table(header, rows) + [
            "", "MiniLM `lora`: not run, sft_jax implements LoRA for decoders only (classification rejects it).",
            "Peak RSS is the whole process's high-water mark while that variant stepped (it includes the other "
            "models of the group held in memory), so compare it within a row, not as an absolute footprint.", ""]
        caveat = ("`met` reads this run's ratios as measured, on a machine with no other jobs (both frameworks "
                  "had both cores)." if _quiet(meta) else "`met` reads this run's ratios as measured. On a loaded "
                  "machine (see the load average above) these favour sft_jax; check them against a one-thread run "
                  "(Analysis) before trusting a `yes`.")
        lines += ["## Targets", "", caveat, ""] + markdown_table(["target", "measured", "met"], targets(records)) + [""]
    sweeps = [r for r in records if "sweep" in r]
    if sweeps:
        header = ["sweep", "batch", "seq_len", "sft_jax s/step", "PyTorch s/step", "ratio", "ratio (CPU s)", "MFU"]
        rows = [[r["sweep"], r["batch"], r["seq_len"], f"{r['ours_step_s']:.3f}", f"{r['baseline_step_s']:.3f}",
                 f"{r['ratio']:.2f}", f"{r['baseline_cpu_s_per_step'] / r['ours_cpu_s_per_step']:.2f}",
                 f"{r['mfu']:.0%}"] for r in sweeps]
        lines += ["## Step time against sequence length and batch (float32)", ""] + markdown_table(header, rows)
        lines += [""] + _plot(records, out)
    notes = os.path.join(out, "notes.md")  # each results folder's own analysis
    if os.path.exists(notes):
        lines += [open(notes).read()]
    with open(os.path.join(out, "RESULTS.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
