"""bfloat16 compute against float32: SST-2 dev accuracy of full fine-tuning of all-MiniLM-L6-v2 (issue 6's
"bfloat16 ... with SST-2 accuracy within 0.5 points of float32"), under the experiment protocol.

    PYTHONPATH=. python -m experiments.mixed_precision.run [--steps=400] [--seeds=0,1,2,3,4]
    PYTHONPATH=. python -m experiments.mixed_precision.run --report

Each (dtype, seed) is one ordinary CLI run of configs/sst2.py:full with `--config.dtype=...`: parameters, AdamW
state, layer norms, softmax and the loss stay float32 in both; bfloat16 changes the matmul inputs (accumulated
in float32, sft_jax/models/mixed.py). Same steps, batch, schedule, data order and dropout per seed; nothing is
selected (one evaluation, of the final model). Five seeds: the effect in question is under a point. The
difference is taken seed by seed (paired), with its t-interval. Workdirs: workdirs/DTYPE_sSEED (ignored by
git); each run's config, results and metrics are kept with the code version under runs/DTYPE/seed_SEED, and
RESULTS.md is made from those files only.
"""

from __future__ import annotations

import argparse
import os

from experiments import protocol
from experiments.common import markdown_table, run_cli

HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = ("float32", "bfloat16")
TARGET_POINTS = 0.5
METRICS = (("eval/accuracy", "SST-2 dev accuracy (%)", 100, 2), ("eval/loss", "dev loss", 1, 4),
           ("forgetting/stsb_spearman/drop", "STS-B drop", 1, 4))


def report(runs: list[dict]) -> str:
    steps = {r["config"]["max_steps"] for r in runs}
    protocol.check_equal_budget({f"{r['arm']}_{r['seed']}": r["config"] for r in runs})
    lines = ["# bfloat16 vs float32: SST-2 accuracy", "",
             "Made by `python -m experiments.mixed_precision.run` from the kept runs in runs/ only. Full "
             f"fine-tuning of all-MiniLM-L6-v2 on SST-2 (configs/sst2.py:full), {steps.pop()} steps of 32, the "
             "final model evaluated once on the 872 dev sentences (nothing selected), float32 and bfloat16 "
             "compute on the same seeds. Cells: mean ± half-width of the 95% t-interval [interval] (n).", "",
             protocol.provenance_line(runs), ""]
    rows = [[dtype] + [protocol.summarize([r["results"][key] for r in runs if r["arm"] == dtype]).format(
        scale=scale, digits=digits) for key, _, scale, digits in METRICS] for dtype in DTYPES]
    lines += markdown_table(["dtype"] + [name for _, name, _, _ in METRICS], rows) + [""]
    acc = protocol.by_arm(runs, "eval/accuracy")
    if all(d in acc for d in DTYPES):
        diff = protocol.paired(acc["bfloat16"], acc["float32"])
        inside = -TARGET_POINTS <= 100 * diff.low and 100 * diff.high <= TARGET_POINTS
        lines += [f"bfloat16 - float32, seed by seed: {diff.format(scale=100, digits=2)} points. The whole "
                  f"interval {'lies' if inside else 'does not lie'} within ±{TARGET_POINTS} points"
                  + ("." if inside else ": these runs cannot show the target is met (nor that it is missed, "
                     "unless the interval lies outside it)."), ""]
    lines += ["One dev sentence is 0.11 points. Per seed (dev accuracy %):", ""]
    seeds = sorted({r["seed"] for r in runs})
    lines += markdown_table(["seed"] + list(DTYPES), [[s] + [
        f"{100 * acc.get(d, {}).get(s, float('nan')):.2f}" for d in DTYPES] for s in seeds]) + [""]
    lines += ["Commands (seed 0):", ""] + [f"    {r['provenance']['command']}" for r in runs if r["seed"] == 0]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--report", action="store_true")
    args = p.parse_args()
    if not args.report:
        for seed in (int(s) for s in args.seeds.split(",")):
            for dtype in DTYPES:
                workdir = os.path.join(HERE, "workdirs", f"{dtype}_s{seed}")
                results = run_cli("configs/sst2.py:full", workdir, {
                    "dtype": dtype, "seed": seed, "max_steps": args.steps, "warmup_steps": args.steps // 10,
                    "eval_every": args.steps, "checkpoint_every": args.steps, "early_stopping.patience": 0,
                    "log_every": 50})
                protocol.keep_run(workdir, HERE, dtype, seed, results["command"])
    protocol.write_results(HERE, report)


if __name__ == "__main__":
    main()
