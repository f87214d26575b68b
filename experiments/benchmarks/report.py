"""RESULTS.md (tables, targets, plots) from the benchmark's records; the folder's notes.md (the analysis) is
appended. Reads runs of every format so far: before issue 27 a row's baseline was PyTorch float32 eager only
and memory one shared process's peak; those runs recorded no CPU family or flags."""

from __future__ import annotations

import os

from experiments.benchmarks.machine import cpu_line
from experiments.common import markdown_table

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET_RATIO = 1.3  # issue 27: against the fastest PyTorch variant of the same dtype


def _find(records, model, strategy, dtype):
    return next((r for r in records if r["model"] == model and r["strategy"] == strategy and r["dtype"] == dtype
                 and "sweep" not in r), None)


def _x(value, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def targets(records) -> list[list]:
    """(target, measured, met, the MFU sft_jax would need) for each of issue 27's targets that this run
    measured; none for a run made before rows were compared within their dtype. The needed MFU is the row's MFU
    scaled by the speed-up the target asks for: near or above 100%, a target is out of reach on this machine
    whatever sft_jax does (the peer's matmul library is the faster one there)."""
    rows = []
    for r in records:
        if "torch_variants" in r and "sweep" not in r and r["strategy"] in ("full", "lora"):
            measured = f"{r['ratio']:.2f}x vs {r['baseline']}" if r["baseline"] else "no PyTorch variant ran"
            needed = f"{r['mfu'] * TARGET_RATIO / r['ratio']:.0%}" if r["ratio"] else "-"
            rows.append([f"{r['model']} {r['strategy']} {r['dtype']} >= {TARGET_RATIO}x the fastest PyTorch "
                         f"variant of the same dtype", measured, r["ratio"] is not None and r["ratio"] >= TARGET_RATIO,
                         needed])
    full = _find(records, "minilm", "full", "float32")
    if full and "torch_variants" in full:
        # An MFU above 100% anywhere means the peak (measured under other jobs' load) is understated.
        ok = "unreliable" if any(r["mfu"] > 1.0 for r in records) else full["mfu"] >= 0.7
        rows.append(["minilm full float32 MFU >= 70% of the float32 matmul peak", f"{full['mfu']:.0%}", ok, "70%"])
    return [[t, m, ok if isinstance(ok, str) else "yes" if ok else "**no**", need] for t, m, ok, need in rows]


def _plot(records, out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = []
    for sweep, axis in (("seq-minilm", "seq_len"), ("seq-smollm2", "seq_len"), ("batch-minilm", "batch")):
        rs = sorted((r for r in records if r.get("sweep") == sweep and r.get("baseline_step_s")),
                    key=lambda r: r[axis])
        if not rs:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        xs = [r[axis] for r in rs]
        ax.plot(xs, [r["ours_step_s"] for r in rs], "o-", label="sft_jax float32")
        peer = "PyTorch float32 (fastest variant)" if "torch_variants" in rs[0] else "PyTorch float32 eager"
        ax.plot(xs, [r["baseline_step_s"] for r in rs], "s--", label=peer)
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


def machine_line(meta: dict) -> str:
    """The machine and both frameworks' matmul peaks, as written beside every table."""
    p = meta["peaks_flops"]
    cpu = (f"CPU {cpu_line(meta['cpu'])}" if meta.get("cpu") else
           f"{p['device']} (this run recorded no CPU family, model or flags)" if p["device"].startswith("cpu")
           else p["device"])
    return (f"Machine: {cpu}. Matmul peaks ({p['matmul_n']}^3, GFLOP/s): JAX float32 {p['jax-float32'] / 1e9:.1f}, "
            f"bfloat16 {p['jax-bfloat16'] / 1e9:.1f}; PyTorch float32 {p['torch-float32'] / 1e9:.1f}, bfloat16 "
            f"{p['torch-bfloat16'] / 1e9:.1f}.")


def _baseline_text(meta: dict) -> str:
    if "torch_variants" not in meta:
        return ("- baseline (this run predates issue 27): PyTorch eager float32 only; `ratio` = its step time / "
                "ours, and the bfloat16 rows too compare sft_jax bfloat16 with PyTorch float32 eager")
    return ("- baseline: PyTorch + transformers (`BertModel` / `LlamaForCausalLM`, sdpa attention), the same "
            "weights, batch, strategy (frozen parameters `requires_grad=False`), AdamW (weight decay 0.01) and "
            "gradient clipping; LoRA rank 8 on q/k/v/o/gate/up/down in both. Variants timed in this run, in the same "
            f"rotation as sft_jax: {', '.join(meta['torch_variants'])} (`compile`: `torch.compile(model)`, "
            "`max-autotune`: its mode of that name; the model's forward and backward compiled, clipping and AdamW "
            "eager), each in float32 and in bfloat16 autocast (float32 master weights). Every sft_jax row is "
            "compared with the fastest variant of its own dtype (float32 with float32, bfloat16 with bfloat16 "
            "autocast), named in the table. `ratio` = that variant's step time / ours (wall clock); `ratio (CPU s)` "
            "the same with CPU seconds per step (all threads), which other jobs' load disturbs less; `ratio / "
            "peak` = (sft_jax tokens/s / JAX's matmul peak of that dtype) / (PyTorch tokens/s / PyTorch's peak "
            "of that dtype), the ratio with each framework's own GEMM speed on this CPU divided out")


def _header(meta: dict) -> list[str]:
    peaks = meta["peaks_flops"]
    threads = meta.get("threads") or {"jax": peaks["threads"], "torch": peaks["threads"]}
    load = ("no other jobs on this machine; a virtual machine's speed still drifts between runs" if _quiet(meta)
            else "a shared machine: other jobs ran alongside")
    return ["# Train-step throughput: sft_jax vs PyTorch + transformers", "",
            "Made by (the numbers below are that run's):", "", "```", meta["command"], "```", "",
            f"- {machine_line(meta)} Peaks measured in this run, the best at start and end"
            + _by_library(peaks) + ".",
            f"- threads: sft_jax {threads['jax']} (affinity mask), PyTorch {threads['torch']} "
            f"(`torch.set_num_threads`); jax {meta['jax']}, torch {meta['torch']}",
            f"- machine load average (1, 5, 15 min) at start {tuple(round(x, 1) for x in meta['load_avg_start'])},"
            f" at end {tuple(round(x, 1) for x in meta['load_avg_end'])} ({load}; variants are timed in rotating "
            "rounds so they see the same conditions)",
            f"- timing: {meta['warmup']} warm-up step(s) (the first compiles), then {meta['rounds']} rounds of "
            f"{meta['steps_per_round']} step(s) per variant; median per-step time; wall {meta['wall_s']:.0f} s",
            _baseline_text(meta),
            "- MFU = model FLOPs per step / step time / the JAX matmul peak of the same dtype; `PyTorch MFU` the "
            "same FLOPs over the PyTorch variant's time and PyTorch's own peak. Model FLOPs: per token 2N forward "
            "for every matmul weight of N entries, 2N for its input gradient where backprop passes through it, 2N "
            "for its weight gradient where it trains (6N for `full`); attention 4 * seq_len * width per layer "
            "forward (half when causal), x3 where backprop passes; embedding lookups free (a tied LM head counted "
            "as a matmul)", ""]


def _memory(r: dict) -> str:
    if "torch_peak_rss_mb" in r:  # one process per framework, each running only its own step
        return f"{_x(r.get('ours_peak_rss_mb'), '.0f')} / {_x(r['torch_peak_rss_mb'], '.0f')}"
    return f"{r['ours_peak_rss_mb']:.0f} / {r['baseline_peak_rss_mb']:.0f} (one process)"


def _main_table(main: list[dict], meta: dict) -> list[str]:
    header = ["model", "strategy", "dtype", "batch x seq", "sft_jax tok/s", "fastest PyTorch variant",
              "PyTorch tok/s", "ratio", "ratio (CPU s)", "ratio / peak", "MFU", "PyTorch MFU", "compile s",
              "peak RSS MB sft_jax / PyTorch", "trainable"]
    rows = [[r["model"], r["strategy"], r["dtype"], f"{r['batch']}x{r['seq_len']}", f"{r['ours_tokens_per_s']:.0f}",
             r["baseline"] if "torch_variants" in r else "torch-eager-float32 (the only one run)",
             _x(r["baseline_tokens_per_s"], ".0f"),
             _x(r["ratio"]), _x(r["baseline_cpu_s_per_step"] and r["baseline_cpu_s_per_step"]
                                / r["ours_cpu_s_per_step"]),
             _x(r.get("ratio_peak_normalised")), f"{r['mfu']:.0%}", _x(r.get("baseline_mfu"), ".0%"),
             f"{r['compile_s']:.1f}", _memory(r), f"{r['trainable_params']:,}"] for r in main]
    lines = ["## Main cases", "", machine_line(meta), ""] + markdown_table(header, rows) + [
        "", "MiniLM `lora`: not run, sft_jax implements LoRA for decoders only (classification rejects it)."]
    if any("torch_peak_rss_mb" in r for r in main):
        lines.append(f"Peak RSS: each framework's step alone in a process of its own ({meta.get('memory_steps')} "
                     "steps, Linux VmHWM, compilation included), PyTorch in the variant of the row. The PyTorch "
                     "process never loads JAX; sft_jax's maps torch's libraries where torch is installed "
                     "(transformers imports it to load the tokenizer, as a training run does), but holds no torch "
                     "model.")
    else:
        lines.append("Peak RSS (this run): the one shared process's high-water mark while that variant stepped (it "
                     "includes both frameworks and every model of the group), so compare it within a row only.")
    return lines + [""]


def _variants_table(main: list[dict], meta: dict) -> list[str]:
    """Every PyTorch variant's tokens/s, one row per (model, strategy, shape): the variants of all its records (a
    run may time each dtype's variants in a group of its own)."""
    groups: dict[tuple, dict] = {}
    for r in main:
        if "torch_variants" in r:
            groups.setdefault((r["model"], r["strategy"], r["batch"], r["seq_len"]), {}).update(r["torch_variants"])
    if not groups:
        return []
    names = list(dict.fromkeys(n for v in groups.values() for n in v))
    rows, errors = [], {}
    for (model, strategy, batch, seq_len), variants in groups.items():
        cells = []
        for n in names:
            v = variants.get(n)
            if v and "error" in v:
                errors.setdefault(v["error"], []).append(f"{model} {strategy} {n}")
            cells.append("" if v is None else "failed" if "error" in v else f"{v['tokens_per_s']:.0f}")
        rows.append([model, strategy, f"{batch}x{seq_len}"] + cells)
    lines = ["## Every PyTorch variant (tokens/s)", "", machine_line(meta), ""]
    lines += markdown_table(["model", "strategy", "batch x seq"] + names, rows) + [""]
    lines += [f"Failed: {', '.join(where)}: `{err}`" for err, where in errors.items()]
    return lines + ([""] if errors else [])


def write_report(records: list[dict], meta: dict, out: str) -> None:
    lines = _header(meta)
    main = [r for r in records if "sweep" not in r]
    if main:
        lines += _main_table(main, meta) + _variants_table(main, meta)
        if any("torch_variants" in r for r in main):
            caveat = ("`met` reads this run's ratios as measured, on a machine with no other jobs." if _quiet(meta)
                      else "`met` reads this run's ratios as measured. On a loaded machine (see the load average "
                      "above) these favour sft_jax; check them against a one-thread run before trusting a `yes`.")
            lines += ["## Targets", "", caveat + " `MFU needed`: the MFU (against JAX's peak of the dtype) at which "
                      "sft_jax would meet the target, from this row's own figures.", ""]
            lines += markdown_table(["target", "measured", "met", "MFU needed"], targets(records)) + [""]
        else:
            lines += ["## Targets", "", "Not read from this run: its ratios are against PyTorch float32 eager only "
                      "(bfloat16 rows included), not against the fastest PyTorch variant of the same dtype.", ""]
    sweeps = [r for r in records if "sweep" in r]
    if sweeps:
        header = ["sweep", "batch", "seq_len", "sft_jax s/step", "PyTorch s/step", "PyTorch variant", "ratio",
                  "ratio (CPU s)", "MFU"]
        rows = [[r["sweep"], r["batch"], r["seq_len"], f"{r['ours_step_s']:.3f}", _x(r["baseline_step_s"], ".3f"),
                 r["baseline"] if "torch_variants" in r else "torch-eager-float32", _x(r["ratio"]),
                 _x(r["baseline_cpu_s_per_step"] and r["baseline_cpu_s_per_step"] / r["ours_cpu_s_per_step"]),
                 f"{r['mfu']:.0%}"] for r in sweeps]
        lines += ["## Step time against sequence length and batch (float32)", "", machine_line(meta), ""]
        lines += markdown_table(header, rows) + [""] + _plot(records, out)
    notes = os.path.join(out, "notes.md")  # each results folder's own analysis
    if os.path.exists(notes):
        lines += [open(notes).read()]
    with open(os.path.join(out, "RESULTS.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
