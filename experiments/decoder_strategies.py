"""One decoder task, several fine-tuning strategies, under the experiment protocol (experiments/protocol.py): what
gsm8k/ and xsum_summarization/ share.

Every strategy trains for the same optimizer steps (STEPS, WARMUP of them warm-up: 300 past it) with the same
batch and seeds. VALIDATION of the training records is held out (drawn with the seed); evaluations on it pick the
best checkpoint by loss, and the task's reported split (data.eval) is scored once, on that checkpoint, with its
generation metric (test/...). `base` is the untouched model through the same evaluation (one step at learning
rate 0; greedy decoding, so one run). WikiText-2 perplexity before and after is the shared probe. Workdirs:
EXPERIMENT/workdirs/ARM_sSEED (ignored by git); each run's config, results and metrics are kept with the code
version under EXPERIMENT/runs/ARM/seed_SEED, and RESULTS.md and the plot are made from those files only.
"""

from __future__ import annotations

import dataclasses
import os

from experiments import protocol
from experiments.common import markdown_table, run_kept

STEPS = 330
WARMUP = 30
VALIDATION = 0.05
EVALUATIONS = 3  # validation evaluations per run (the best checkpoint is one of them)
RISE = "forgetting/wikitext2_ppl/rise"


@dataclasses.dataclass(frozen=True)
class Task:
    """What differs between the decoder experiments.

    Attributes:
      title: RESULTS.md's heading.
      here: the experiment's folder.
      config: the config file; `:STRATEGY` is appended.
      metric: the generation metric's key after test/ (e.g. "rougeL").
      metric_name: its column heading.
      overrides: config values every arm shares (budget-fitting sizes, the evaluation's size).
      description: what the runs train on and how they are scored, for RESULTS.md.
    """

    title: str
    here: str
    config: str
    metric: str
    metric_name: str
    overrides: dict
    description: str


def run_overrides(task: Task, seed: int, steps: int, base: bool = False) -> dict:
    common = {"data.validation_fraction": VALIDATION, **task.overrides, "seed": seed, "early_stopping.patience": 0}
    if base:
        return {**common, "learning_rate": 0.0, "max_steps": 1, "warmup_steps": 0, "eval_every": 1,
                "checkpoint_every": 1}
    every = max(steps // EVALUATIONS, 1)
    return {**common, "max_steps": steps, "warmup_steps": min(WARMUP, max(steps // 10, 1)), "eval_every": every,
            "checkpoint_every": every}


def run(task: Task, strategies: list[str], seeds: list[int], steps: int) -> None:
    """`base`, then every (seed, strategy), seeds outermost (a cut-short run has every arm of its seeds); each
    run kept. A run kept already (`common.run_kept`) or a finished workdir is read back, not retrained."""
    jobs = [("base", "full", seeds[0], True)] + [(s, s, seed, False) for seed in seeds for s in strategies]
    for arm, strategy, seed, base in jobs:
        workdir = os.path.join(task.here, "workdirs", f"{arm}_s{seed}")
        run_kept(f"{task.config}:{strategy}", workdir, run_overrides(task, seed, steps, base), task.here, arm, seed)


def report(task: Task, runs: list[dict]) -> str:
    trained = [r for r in runs if r["arm"] != "base"]
    protocol.check_equal_budget({f"{r['arm']}_{r['seed']}": r["config"] for r in trained})
    c = trained[0]["config"]
    lines = [f"# {task.title}", "",
             f"Made by `python -m {os.path.relpath(task.here, protocol.ROOT).replace(os.sep, '.')}.run` from the "
             f"kept runs in runs/ only. Every strategy: {c['max_steps']} steps of {c['batch_size']} "
             f"({c['warmup_steps']} of them warm-up, then {c['schedule']}; {c['dtype']} matmuls), "
             f"{100 * c['data']['validation_fraction']:g}% of the training records held out to pick the best "
             "checkpoint by loss; the reported split is scored once, on that checkpoint. `base`: the untouched "
             f"model through the same evaluation. {task.description} Cells: mean ± half-width of the 95% "
             "t-interval [interval] (n).", "", protocol.decoder_line(runs), "", protocol.provenance_line(runs), ""]
    keys = [(f"test/{task.metric}", task.metric_name, 2), ("test/loss", "test loss", 4),
            ("forgetting/wikitext2_ppl/after", "WikiText-2 ppl after", 2), (RISE, "ppl rise", 2)]
    arms = ["base"] + sorted({r["arm"] for r in trained}, key=lambda a: ("lora", "partial", "full").index(a)
                             if a in ("lora", "partial", "full") else 9)
    rows = []
    for arm in arms:
        mine = [r["results"] for r in runs if r["arm"] == arm]
        if mine:
            params = f"{mine[0]['trainable_params']:,}" if arm != "base" else "0"
            rows.append([arm, params] + [protocol.summarize([m[k] for m in mine]).format(digits=d)
                                         for k, _, d in keys])
    before = protocol.summarize([r["results"]["forgetting/wikitext2_ppl/before"] for r in runs]).mean
    lines += markdown_table(["strategy", "trainable params"] + [name for _, name, _ in keys], rows)
    lines += ["", f"WikiText-2 perplexity before fine-tuning: {before:.2f}.", ""]
    metric, rise = protocol.by_arm(trained, f"test/{task.metric}"), protocol.by_arm(trained, RISE)
    pairs = [(a, b) for a, b in (("full", "lora"), ("full", "partial"), ("partial", "lora"))
             if a in metric and b in metric]
    if pairs:
        lines += ["Paired differences (same seed):", ""]
        lines += markdown_table(["strategies", task.metric_name, "ppl rise"], [
            [f"{a} - {b}", protocol.paired(metric[a], metric[b]).format(digits=2),
             protocol.paired(rise[a], rise[b]).format(digits=2)] for a, b in pairs]) + [""]
    lines += [f"![{task.metric_name} vs forgetting](metric_vs_forgetting.png)", "", "Commands (seed 0):", ""]
    lines += [f"    {r['provenance']['command']}" for r in runs if r["seed"] == 0]
    return "\n".join(lines) + "\n"


def plot(task: Task, runs: list[dict], path: str) -> None:
    """The task metric against the perplexity rise, one point per run, each strategy's mean marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for arm in sorted({r["arm"] for r in runs}):
        mine = [r["results"] for r in runs if r["arm"] == arm]
        x, y = [m[RISE] for m in mine], [m[f"test/{task.metric}"] for m in mine]
        points = ax.scatter(x, y, s=20, alpha=0.5)
        ax.scatter([np.mean(x)], [np.mean(y)], s=80, color=points.get_facecolor()[0], label=arm)
    ax.set_xlabel("WikiText-2 perplexity rise (after - before)")
    ax.set_ylabel(task.metric_name)
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title(task.title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(task: Task, argv=None, strategies: str = "lora,full") -> None:
    import argparse

    p = argparse.ArgumentParser(description=task.title)
    p.add_argument("--strategies", default=strategies)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--report", action="store_true")
    args = p.parse_args(argv)
    if not args.report:
        run(task, args.strategies.split(","), [int(s) for s in args.seeds.split(",")], args.steps)
    protocol.write_results(task.here, lambda runs: report(task, runs), lambda runs, path: plot(task, runs, path),
                           "metric_vs_forgetting.png")
