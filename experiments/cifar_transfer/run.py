"""CIFAR-10 transfer: pre-train a small ViT on five classes, fine-tune it on the five others with head /
partial / full at several label budgets, against the same ViT trained from scratch; forgetting of the source
classes with the base's own head. Under the experiment protocol.

    PYTHONPATH=. python -m experiments.cifar_transfer.run [--budgets=10,50,200] [--strategies=head,partial,full]
        [--seeds=0,1,2]
    PYTHONPATH=. python -m experiments.cifar_transfer.run --report

One pre-training run (configs/cifar_pretrain.py, workdirs/base) is the base of every fine-tuning run; each
(strategy, budget, seed) is one run of configs/cifar_transfer.py:STRATEGY,BUDGET in workdirs/ARM_sSEED (ignored
by git). A budget's training images are its first N per class in every seed: the seed changes the head's
initialisation (scratch: every weight's), the batches and the augmentation. The final model is scored once on
the held-out images (nothing selected). Each run's config, results and metrics are kept with the code version
under runs/ARM/seed_SEED (the base's under runs/base), and RESULTS.md and transfer.png are made from those files
only.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from experiments import protocol
from experiments.common import markdown_table, run_cli

HERE = os.path.dirname(os.path.abspath(__file__))
WORKDIRS = os.path.join(HERE, "workdirs")
TARGET, SOURCE = "eval/accuracy", "forgetting/source_accuracy/after"
# The base's seed lies outside every fine-tuning seed. A fresh head is drawn from nnx.Rngs(seed) exactly as the
# base's own head was at its start, so a fine-tuning run at the base's seed starts its new head at the base head's
# initial weights: the new classes are then learnt along the source classes' logit directions, and the forgetting
# probe (the base's head on the moved backbone) collapses for that seed alone (notes.md, stop 39).
BASE_SEED = 1000


def arm_of(strategy: str, per_class: int) -> str:
    return f"{strategy}_{per_class}"


def parse_arm(arm: str) -> tuple[str, int]:
    strategy, per_class = arm.rsplit("_", 1)
    return strategy, int(per_class)


def report(runs: list[dict]) -> str:
    base_run = next(r for r in runs if r["arm"] == "base")
    base = base_run["results"]
    tuned = [r for r in runs if r["arm"] != "base"]
    arms = {parse_arm(r["arm"]) for r in tuned}
    budgets = sorted({b for _, b in arms})
    strategies = [s for s in ("head", "partial", "full", "scratch") if any(s == a for a, _ in arms)]
    for b in budgets:
        protocol.check_equal_budget({r["arm"]: r["config"] for r in tuned if parse_arm(r["arm"])[1] == b})

    def cell(strategy, budget, key, **fmt):
        values = [r["results"][key] for r in tuned if r["arm"] == arm_of(strategy, budget) and key in r["results"]]
        return protocol.summarize(values).format(**fmt) if values else "-"

    target = [[s] + [cell(s, b, TARGET, scale=100, digits=1) for b in budgets] for s in strategies]
    acc = protocol.by_arm(tuned, TARGET)
    gains = [[f"{s} - scratch"] + [protocol.paired(acc[arm_of(s, b)], acc[arm_of("scratch", b)]).format(
        scale=100, digits=1) if arm_of(s, b) in acc and arm_of("scratch", b) in acc else "-" for b in budgets]
        for s in strategies if s != "scratch"]
    source = [[s] + [cell(s, b, SOURCE, scale=100, digits=1) for b in budgets] for s in strategies if s != "scratch"]
    before = next((r["results"]["forgetting/source_accuracy/before"] for r in tuned
                   if "forgetting/source_accuracy/before" in r["results"]), float("nan"))
    schedules = sorted({(parse_arm(r["arm"])[1], r["config"]["batch_size"], r["config"]["max_steps"]) for r in tuned})
    lines = ["# CIFAR-10 transfer: a ViT pre-trained on five classes, fine-tuned on the five others", "",
             "Made by `python -m experiments.cifar_transfer.run` from the kept runs in runs/ only. Cells: mean ± "
             "half-width of the 95% t-interval over seeds [interval] (n).", "", protocol.provenance_line(runs), "",
             f"Base: a ViT (8x8 patches on 32x32 images, width 128, 4 blocks, 4 heads, MLP 256, mean pooling; "
             f"{base['total_params']:,} parameters) trained from scratch (`configs/cifar_pretrain.py`, one run, "
             f"seed {base_run['seed']}, a seed no fine-tuning run uses) on "
             "airplane, automobile, bird, cat, deer: 800 images per class from `../shared/data/cifar10/test`, "
             f"{base['step']} steps of 128 with crops and flips; held-out accuracy on the other 200 images per "
             f"class: {100 * base['eval/accuracy']:.1f}%.", "",
             "Transfer (`configs/cifar_transfer.py:STRATEGY,PER_CLASS`): dog, frog, horse, ship, truck, the first "
             "N images per class to train on, the final model scored on the 200 held-out images per new class. "
             "`head`: a fresh linear head on the frozen base; `partial`: patch embedding and blocks 0-1 frozen; "
             "`full`: everything; `scratch`: the same ViT from random weights (the baseline). Forgetting: "
             "accuracy on the 1,000 held-out source images with the base's own head on the run's backbone "
             f"(before: {100 * before:.1f}%). Schedules (per class, batch, steps): "
             + ", ".join(f"({b}, {bs}, {st})" for b, bs, st in schedules)
             + "; every strategy of a budget has the same steps.", "",
             "## Target accuracy (%), 5 new classes", ""]
    lines += markdown_table(["strategy"] + [f"{b} / class" for b in budgets], target) + [""]
    lines += ["Paired differences from scratch (same seed; points):", ""]
    lines += markdown_table(["arms"] + [f"{b} / class" for b in budgets], gains) + [""]
    lines += ["## Source accuracy with the original head after fine-tuning (%)", ""]
    lines += markdown_table(["strategy"] + [f"{b} / class" for b in budgets], source) + [""]
    lines += ["![target and source accuracy](transfer.png)", "", "Commands (seed 0):", ""]
    lines += [f"    {r['provenance']['command']}" for r in runs if r["arm"] == "base" or r["seed"] == 0]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tuned = [r for r in runs if r["arm"] != "base"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    budgets = sorted({parse_arm(r["arm"])[1] for r in tuned})
    for strategy in dict.fromkeys(parse_arm(r["arm"])[0] for r in tuned):
        for ax, key in ((left, TARGET), (right, SOURCE)):
            if strategy == "scratch" and key == SOURCE:
                continue
            points = [(b, [100 * r["results"][key] for r in tuned if r["arm"] == arm_of(strategy, b)])
                      for b in budgets]
            points = [(b, v) for b, v in points if v]
            ax.errorbar([b for b, _ in points], [np.mean(v) for _, v in points],
                        yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for _, v in points], marker="o", capsize=3,
                        ls="--" if strategy == "scratch" else "-", label=strategy)
    right.axhline(20, color="black", linestyle=":", linewidth=0.8, label="chance (5 classes)")
    for ax, title in ((left, "target: 5 new classes"), (right, "source: 5 pre-training classes, original head")):
        ax.set_xscale("log")
        ax.set_xticks(budgets, labels=[str(b) for b in budgets])
        ax.set(xlabel="training images per new class", ylabel="held-out accuracy (%; mean ± SD over seeds)",
               title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="10,50,200", help="training images per new class")
    p.add_argument("--strategies", default="head,partial,full")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--report", action="store_true")
    args = p.parse_args()
    if not args.report:
        seeds = [int(s) for s in args.seeds.split(",")]
        if BASE_SEED in seeds:
            p.error(f"--seeds: {BASE_SEED} is the base's seed (BASE_SEED); fine-tuning seeds must differ from it")
        base_dir = os.path.join(WORKDIRS, "base")
        results = run_cli("configs/cifar_pretrain.py", base_dir, {"seed": BASE_SEED})
        protocol.keep_run(base_dir, HERE, "base", BASE_SEED, results["command"])
        for seed in seeds:
            for strategy in args.strategies.split(",") + ["scratch"]:
                for per_class in (int(b) for b in args.budgets.split(",")):
                    arm = arm_of(strategy, per_class)
                    workdir = os.path.join(WORKDIRS, f"{arm}_s{seed}")
                    results = run_cli(f"configs/cifar_transfer.py:{strategy},{per_class}", workdir,
                                      {"seed": seed, **({} if strategy == "scratch" else {"model": base_dir})})
                    protocol.keep_run(workdir, HERE, arm, seed, results["command"])
    protocol.write_results(HERE, report, plot, "transfer.png")


if __name__ == "__main__":
    main()
