"""Memory per device of 8B-9B fine-tuning, planned (`sft_jax.plan`), with scanned layers.

    python -m experiments.memory_plan.run            # the whole grid (about 30 CPU-minutes), resumable
    python -m experiments.memory_plan.run --report   # RESULTS.md from results.json

Grid: Llama-3.1-8B, Qwen3-8B and Gemma-2-9B shapes (`shapes/`, their config.json values) x {full, LoRA, QLoRA}
x remat {none, full} x sequence {2048, 8192} x {1, 8} devices with FSDP, one sequence per device; plus a
Llama-3.1-70B QLoRA row on one device. Every run: bfloat16 compute, scanned layers, chunked LM loss (256
positions). Full fine-tuning keeps float32 parameters and AdamW moments (mixed precision); LoRA (rank 8, every
projection) stores the base in bfloat16; QLoRA in NF4. Each plan compiles the real train step for N simulated
CPU devices and reads XLA's memory analysis (see sft_jax/plan). Writes results.json (one row per plan, with its
config) and RESULTS.md.
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
RESULTS = HERE / "results.json"
MODELS = ("llama-3.1-8b", "qwen3-8b", "gemma-2-9b")
METHODS = ("full", "lora", "qlora")
DEVICE_GB = 80.0
# torchtune's published single-device figures for Llama-3.1-8B (its recipes' README, 24 GB card; activation
# checkpointing, chunked cross-entropy; full fine-tuning with bfloat16 weights and an 8-bit paged optimizer).
TORCHTUNE = {("llama-3.1-8b", "full"): 18.9, ("llama-3.1-8b", "qlora"): 7.4}


def overrides(model: str, method: str, remat: str, length: int, devices: int) -> dict:
    # full_bf16: torchtune's low-memory full fine-tuning storage (bfloat16 weights, 8-bit AdamW moments).
    return {"model": str(HERE / "shapes" / f"{model}.json"), "strategy": "lora" if "lora" in method else "full",
            "quantize_base": "nf4" if method == "qlora" else "none",
            "param_dtype": "float32" if method == "full" else "bfloat16",
            "optimizer_state_dtype": "int8" if method == "full_bf16" else "float32", "remat": remat,
            "max_length": length, "buckets": (length,), "batch_size": devices,
            "mesh": {"data": 1, "fsdp": devices, "tensor": 1}}


def grid() -> list[dict]:
    rows = [dict(model=m, method=k, remat=r, length=n, devices=d) for m in MODELS for k in METHODS
            for r in ("none", "full") for n in (2048, 8192) for d in (1, 8)]
    rows.append(dict(model="llama-3.1-70b", method="qlora", remat="full", length=2048, devices=1))
    rows.append(dict(model="llama-3.1-8b", method="full_bf16", remat="full", length=2048, devices=1))
    return rows


def key(row: dict) -> str:
    return "/".join(str(row[k]) for k in ("model", "method", "remat", "length", "devices"))


def plan_one(row: dict) -> dict:
    """One plan, in this process (which must have 8 simulated devices)."""
    import jax

    from sft_jax.config_defaults import defaults
    from sft_jax.plan import plan

    c = defaults()
    c.task, c.data.train, c.data.eval = "language_modeling", "never-read.txt", "never-read.txt"
    c.dtype, c.scan_layers, c.lm_loss_chunk = "bfloat16", True, 256
    for name, value in overrides(**row).items():
        c[name] = value
    t = time.time()
    p = plan(c, device_memory_gb=DEVICE_GB, devices=jax.devices()[: row["devices"]])
    return {**row, **p.to_json(), "gb": p.total / 1e9, "plan_seconds": time.time() - t, "config": c.to_dict()}


def run_grid(lengths: tuple[int, ...] = (2048, 8192)) -> None:
    done = {key(r): r for r in json.loads(RESULTS.read_text())} if RESULTS.exists() else {}
    todo = [row for row in grid() if key(row) not in done and row["length"] in lengths]
    todo.sort(key=lambda row: row["remat"] != "full")  # the settings a long sequence is run with, first
    print(f"{len(done)} plans done, {len(todo)} to go", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    for i, row in enumerate(todo, 1):
        result = plan_one(row)
        result["code_version"] = commit
        done[key(row)] = result
        RESULTS.write_text(json.dumps(list(done.values()), indent=1))
        print(f"[{i}/{len(todo)}] {key(row)}: {result['gb']:.1f} GB per device "
              f"({'fits' if result['fits'] else 'does not fit'}; {result['plan_seconds']:.0f} s)", flush=True)


def report() -> None:
    rows = {key(r): r for r in json.loads(RESULTS.read_text())}
    lines = ["# Memory per device of 8B-9B fine-tuning, planned", "",
             "Made by `python -m experiments.memory_plan.run` (the planner, `sft_jax.plan`, on simulated CPU "
             "devices; code version in results.json). GB = 1e9 bytes per device; * = does not fit in 80 GB. "
             "One sequence per device, bfloat16 compute, scanned layers, LM loss in chunks of 256 positions. "
             "full: float32 parameters and AdamW moments; LoRA: rank 8 on every projection, base stored in "
             "bfloat16; QLoRA: the base in NF4. Attention is the blocked XLA path of the CPU (a fused GPU kernel "
             "needs less), so these are upper bounds for a GPU. XLA:CPU's float32 copies of bfloat16 weights, "
             "which a GPU or TPU does not make, are left out (`cpu_upcasts` in results.json). A blank cell is a plan "
             "not made yet (`--length 8192` plans the rest; about 2-4 CPU-minutes each at 8192 tokens).", ""]
    for model in MODELS:
        lines += [f"## {model}", "", "| method | remat | 1 device, 2048 | 8 devices, 2048 | 1 device, 8192 | "
                  "8 devices, 8192 |", "|---|---|---|---|---|---|"]
        for method in METHODS:
            for remat in ("none", "full"):
                cells = []
                for length, devices in ((2048, 1), (2048, 8), (8192, 1), (8192, 8)):
                    r = rows.get(key(dict(model=model, method=method, remat=remat, length=length, devices=devices)))
                    cells.append("" if r is None else f"{r['gb']:.1f}{'' if r['fits'] else ' *'}")
                lines.append(f"| {method} | {remat} | " + " | ".join(cells) + " |")
        lines.append("")
    seventy = rows.get(key(dict(model="llama-3.1-70b", method="qlora", remat="full", length=2048, devices=1)))
    if seventy:
        lines += [f"Llama-3.1-70B, QLoRA, remat full, 2048 tokens, one device: {seventy['gb']:.1f} GB per device "
                  f"({'fits' if seventy['fits'] else 'does not fit'} in 80 GB). The QLoRA paper fine-tuned a 65B "
                  "model on one 48 GB card.", ""]
    lines += ["torchtune's published Llama-3.1-8B figures on one device, beside ours at remat full and 2048 "
              "tokens: QLoRA 7.4 GiB (ours: {q}); full 18.9 GiB with bfloat16 weights and an 8-bit optimizer "
              "(ours with the same storage, `param_dtype=bfloat16 optimizer_state_dtype=int8`: {b}; the table's "
              "full rows keep float32 weights and moments: {f}). torchtune also steps the optimizer inside the "
              "backward pass, so no whole gradient is alive at once; ours holds the gradient of every trained "
              "parameter. Their batch size and sequence length differ from ours, so the figures compare in order "
              "of magnitude only.".format(q=_gb(rows, "qlora"), f=_gb(rows, "full"), b=_gb(rows, "full_bf16"))]
    (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {HERE / 'RESULTS.md'}")


def _gb(rows, method):
    r = rows.get(key(dict(model="llama-3.1-8b", method=method, remat="full", length=2048, devices=1)))
    return "n/a" if r is None else f"{r['gb']:.1f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", action="store_true", help="only write RESULTS.md from results.json")
    parser.add_argument("--length", type=int, action="append", help="plan only these sequence lengths")
    args = parser.parse_args()
    if not args.report:
        run_grid(tuple(args.length or (2048, 8192)))
    report()


if __name__ == "__main__":
    if "--xla_force_host_platform_device_count=8" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.execv(sys.executable, [sys.executable, "-m", "experiments.memory_plan.run", *sys.argv[1:]])
    main()
