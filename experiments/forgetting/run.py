"""Task gain vs forgetting for fine-tuning methods that forget less, under the experiment protocol: equal
optimizer steps, several seeds, penalty weights and WiSE-FT's alpha chosen on a validation split.

    PYTHONPATH=. python -m experiments.forgetting.run --task=sst2 [--steps=1200] [--seeds=0,1,2] [--methods=...]
    PYTHONPATH=. python -m experiments.forgetting.run --task=xsum [--steps=340] [--seeds=0,1,2]
    PYTHONPATH=. python -m experiments.forgetting.run --report

sst2: all-MiniLM-L6-v2 on SST-2 (configs/sst2.py; dev accuracy) with the STS-B probe (Spearman drop). xsum:
SmolLM2-135M-Instruct on XSum (configs/xsum_smollm2.py; held-out loss) with the WikiText-2 perplexity rise
(its first 16k tokens, the probe every decoder experiment uses). Every run evaluates on a validation set carved
from the training data and keeps its best checkpoint there; the reported split (data.eval) is scored once, on
that checkpoint. Before the reported seeds, `tune` picks each penalty's weight on the tuning seed
(TUNING_SEED, reported nowhere): the largest weight of WEIGHTS whose best validation figure is within
TOLERANCE of plain full fine-tuning's on that seed (the most protection that costs the task little), a rule
fixed before the runs. WiSE-FT's alpha is chosen per run on validation (the best validation figure). LP-FT's
head phase is half the steps; the head-only arm's validation curve shows whether a probe has converged by
then (RESULTS.md says). Workdirs: workdirs/TASK/ARM_sSEED (ignored by git); every run's config, results and
metrics are kept with the code version under runs/TASK_ARM/seed_SEED, and RESULTS.md and the plots are made
from those files only.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from configs.common import shared_data
from experiments import protocol
from experiments.common import markdown_table, run_kept

HERE = os.path.dirname(os.path.abspath(__file__))
TUNING_SEED = 100
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)  # WiSE-FT, between the pre-trained (0) and fine-tuned (1) weights
TASKS = {
    "sst2": dict(
        config="configs/sst2.py", steps=1200, metric="accuracy", higher=True, scale=100, unit="%",
        metric_name="SST-2 dev accuracy", forget="forgetting/stsb_spearman/drop", forget_name="STS-B Spearman drop",
        weights={"l2sp": (0.01, 0.1, 1.0, 10.0), "ewc": (0.1, 1.0, 10.0, 100.0)}, tolerance=0.01,
        tolerance_text="1 point of accuracy",
        methods=("head", "partial", "full", "lp_ft", "l2sp", "ewc", "llrd", "gradual_unfreeze"),
        common={"data.validation_fraction": 0.013, "eval_every": 200, "log_every": 50},
        fisher={"regularizer.fisher_data": shared_data("wikitext2_raw", "wiki.test.raw"),
                "regularizer.fisher_batches": 16, "regularizer.fisher_batch_size": 16},
        head_lr=2e-3, llrd=0.7, blocks=1, stages=7),
    "xsum": dict(
        config="configs/xsum_smollm2.py", steps=340, metric="loss", higher=False, scale=1, unit="",
        metric_name="XSum held-out loss", forget="forgetting/wikitext2_ppl/rise",
        forget_name="WikiText-2 perplexity rise", weights={"l2sp": (0.01, 0.1, 1.0)}, tolerance=0.02,
        tolerance_text="0.02 nats of loss",
        methods=("lora", "full", "l2sp"),
        # bfloat16 matmuls and 256-token articles: the budget of 340 steps (300 past warm-up) fits the CPU.
        common={"data.validation_fraction": 0.1, "eval_every": 85, "log_every": 10, "dtype": "bfloat16",
                "batch_size": 4, "max_length": 256, "buckets": "(256,)", "data.max_eval_examples": 100,
                "eval_generation.metrics": "()", "learning_rate": 1e-4},
        fisher={"regularizer.fisher_data": shared_data("tinyshakespeare", "input.txt"),
                "regularizer.fisher_batches": 16, "regularizer.fisher_batch_size": 4},
        head_lr=1e-4, llrd=0.9, blocks=5, stages=6),
}


def method_overrides(task: str, method: str, steps: int, weight: float | None = None) -> tuple[str, dict]:
    """(strategy, overrides) of a method; everything but the plain strategies is `full` plus its option."""
    t = TASKS[task]
    if method in ("head", "partial", "lora"):
        return method, ({"learning_rate": 5e-4} if method == "lora" else {})
    return "full", {
        "full": {"wise_ft.alphas": "(" + ",".join(str(a) for a in ALPHAS) + ")"},
        "lp_ft": {"lp_ft.head_steps": steps // 2, "lp_ft.head_learning_rate": t["head_lr"]},
        "l2sp": {"regularizer.l2sp": weight},
        "ewc": {"regularizer.ewc": weight, **t["fisher"]},
        "llrd": {"llrd": t["llrd"]},
        "gradual_unfreeze": {"gradual_unfreeze.every": steps // (t["stages"] + 1),
                             "gradual_unfreeze.blocks": t["blocks"]},
    }[method]


def train(task: str, arm: str, method: str, seed: int, steps: int, weight: float | None = None) -> dict:
    """One run (or its finished workdir), kept under runs/TASK_ARM/seed_SEED; returns its results."""
    t = TASKS[task]
    strategy, overrides = method_overrides(task, method, steps, weight)
    workdir = os.path.join(HERE, "workdirs", task, f"{arm}_s{seed}")
    config = f"{t['config']}:{strategy}"
    overrides = {**t["common"], "seed": seed, "max_steps": steps, "warmup_steps": max(steps // 10, 1),
                 "checkpoint_every": t["common"]["eval_every"], "early_stopping.patience": 0, **overrides}
    return run_kept(config, workdir, overrides, HERE, f"{task}_{arm}", seed, method=method, weight=weight)


def best_validation(results: dict, task: str) -> float:
    """The run's figure on its validation set at the kept (best) checkpoint, higher = better."""
    value = results[f"eval/{TASKS[task]['metric']}"]
    return value if TASKS[task]["higher"] else -value


def tune(task: str, steps: int) -> dict[str, float]:
    """{penalty: weight} by the rule of the module docstring, on TUNING_SEED."""
    t = TASKS[task]
    full = best_validation(train(task, "tune_full", "full", TUNING_SEED, steps), task)
    chosen = {}
    for penalty, weights in t["weights"].items():
        ok = [w for w in weights if best_validation(
            train(task, f"tune_{penalty}_{w:g}", penalty, TUNING_SEED, steps, w), task) >= full - t["tolerance"]]
        chosen[penalty] = max(ok) if ok else min(weights)
    return chosen


def tuned_weights(runs: list[dict], task: str) -> dict[str, float]:
    """The rule of `tune` applied to the kept tuning runs (what the report states)."""
    t = TASKS[task]
    mine = {r["arm"][len(task) + 1:]: r["results"] for r in runs if r["arm"].startswith(f"{task}_tune_")}
    if "tune_full" not in mine:
        return {}
    full = best_validation(mine["tune_full"], task)
    out = {}
    for penalty, weights in t["weights"].items():
        done = [w for w in weights if f"tune_{penalty}_{w:g}" in mine]
        ok = [w for w in done if best_validation(mine[f"tune_{penalty}_{w:g}"], task) >= full - t["tolerance"]]
        if done:
            out[penalty] = max(ok) if ok else min(done)
    return out


def wise_ft_points(results: dict, task: str) -> tuple[float, float, float]:
    """(alpha chosen on validation, its reported-split figure, its forgetting) of a `full` run's sweep."""
    t = TASKS[task]
    sign = 1 if t["higher"] else -1
    alpha = max(ALPHAS, key=lambda a: sign * results[f"wise_ft/{a:g}/eval/{t['metric']}"])
    return alpha, results[f"wise_ft/{alpha:g}/test/{t['metric']}"], results[f"wise_ft/{alpha:g}/{t['forget']}"]


def figures(runs: list[dict], task: str) -> dict[str, dict[int, tuple[float, float]]]:
    """{arm: {seed: (reported figure, forgetting)}} of the reported seeds, WiSE-FT as an arm of its own."""
    t = TASKS[task]
    out: dict[str, dict[int, tuple[float, float]]] = {}
    for r in runs:
        if not r["arm"].startswith(f"{task}_") or "_tune_" in r["arm"]:
            continue
        arm, res = r["arm"][len(task) + 1:], r["results"]
        out.setdefault(arm, {})[r["seed"]] = (res[f"test/{t['metric']}"], res[t["forget"]])
        if arm == "full":
            _, value, forget = wise_ft_points(res, task)
            out.setdefault("wise_ft", {})[r["seed"]] = (value, forget)
    return out


def task_report(runs: list[dict], task: str) -> list[str]:
    t = TASKS[task]
    mine = [r for r in runs if r["arm"].startswith(f"{task}_") and "_tune_" not in r["arm"]]
    if not mine:
        return []
    protocol.check_equal_budget({f"{r['arm']}_{r['seed']}": r["config"] for r in mine})
    by_arm = figures(runs, task)
    steps = mine[0]["config"]["max_steps"]
    lines = [f"## {task}: {steps} steps per method", ""]
    if task == "xsum":
        lines += [protocol.decoder_line(mine), ""]
    weights = tuned_weights(runs, task)
    if weights:
        lines += [f"Penalty weights chosen on the tuning seed's validation split (the largest within "
                  f"{t['tolerance_text']} of full's): "
                  + ", ".join(f"{k} {v:g}" for k, v in weights.items()) + ".", ""]
    rows = []
    for arm, seeds in by_arm.items():
        values = list(seeds.values())
        rows.append([arm, protocol.summarize([v for v, _ in values]).format(scale=t["scale"], digits=2),
                     protocol.summarize([f for _, f in values]).format(digits=4)])
    lines += markdown_table(["method", t["metric_name"] + (f" ({t['unit']})" if t["unit"] else ""),
                             t["forget_name"]], rows) + [""]
    if "full" in by_arm:
        paired = []
        for arm in by_arm:
            if arm == "full":
                continue
            a = {s: v for s, (v, _) in by_arm[arm].items()}
            b = {s: v for s, (v, _) in by_arm["full"].items()}
            fa = {s: f for s, (_, f) in by_arm[arm].items()}
            fb = {s: f for s, (_, f) in by_arm["full"].items()}
            paired.append([f"{arm} - full", protocol.paired(a, b).format(scale=t["scale"], digits=2),
                           protocol.paired(fa, fb).format(digits=4)])
        lines += ["Paired differences from full fine-tuning (same seed):", ""]
        lines += markdown_table(["methods", t["metric_name"], t["forget_name"]], paired) + [""]
    if task == "sst2" and "full" in by_arm:
        mean = np.mean([v for v, _ in by_arm["full"].values()])
        lines += [f"Full fine-tuning's mean dev accuracy at this budget: {100 * mean:.2f}% "
                  f"({'at least' if mean >= 0.88 else 'below'} the 88% the protocol asks this experiment to reach).",
                  ""]
    head = [r for r in mine if r["arm"] == f"{task}_head"]
    if head and task == "sst2":
        half = steps // 2
        at_half = [max((m["eval/accuracy"] for m in r["metrics"] if "eval/accuracy" in m and m["step"] <= half),
                       default=float("nan")) for r in head]
        best = [r["results"]["eval/accuracy"] for r in head]
        lines += [f"LP-FT's probe phase is {half} steps. The head-only runs' best validation accuracy by step "
                  f"{half}: {100 * np.mean(at_half):.2f}%, against {100 * np.mean(best):.2f}% over all {steps} "
                  "steps (mean over seeds): the closer the two, the nearer the probe had converged.", ""]
    lines += [f"![task vs forgetting](pareto_{task}.png)", "", "Commands (seed 0 of each arm):", ""]
    lines += [f"    {r['provenance']['command']}" for r in mine if r["seed"] == 0]
    return lines + [""]


def plot(runs: list[dict], task: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = TASKS[task]
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for arm, seeds in figures(runs, task).items():
        v = np.array([x for x, _ in seeds.values()]) * t["scale"]
        f = np.array([y for _, y in seeds.values()])
        ax.errorbar(f.mean(), v.mean(), xerr=f.std(ddof=1) if len(f) > 1 else None,
                    yerr=v.std(ddof=1) if len(v) > 1 else None, fmt="o", ms=6, capsize=2)
        ax.annotate(arm, (f.mean(), v.mean()), textcoords="offset points", xytext=(5, 3), fontsize=8)
    ax.set_xlabel(t["forget_name"] + " (lower: forgets less)")
    ax.set_ylabel(t["metric_name"] + (f" ({t['unit']})" if t["unit"] else ""))
    ax.set_title(f"{task}: mean ± SD over seeds", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


INTRO = """# Fine-tuning that forgets less: task gain vs forgetting

Made by `python -m experiments.forgetting.run` from the kept runs in runs/ only (the protocol and the
methods: that file's docstring). Every method of a task trains for the same optimizer steps from the same
pre-trained model; its best checkpoint on a validation split carved from the training data is scored once on
the reported split. Cells: mean ± half-width of the 95% t-interval over seeds [interval] (n).

Methods (all but the plain strategies are `full` plus one option; README "Forgetting less"): `lp_ft` (the head
alone for the first half of the steps, then everything), `l2sp` / `ewc` (penalty weights tuned as described),
`llrd` (layer-wise learning-rate decay), `gradual_unfreeze` (head first, then blocks top-down), `wise_ft` (the
`full` run's weights interpolated with the pre-trained ones, alpha chosen on validation; no extra training).
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="sst2", choices=sorted(TASKS))
    p.add_argument("--steps", type=int, default=0, help="default: the task's (TASKS)")
    p.add_argument("--methods", default="", help="default: the task's")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--report", action="store_true")
    args = p.parse_args()
    if not args.report:
        t = TASKS[args.task]
        steps = args.steps or t["steps"]
        methods = args.methods.split(",") if args.methods else list(t["methods"])
        weights = tune(args.task, steps) if any(m in t["weights"] for m in methods) else {}
        for seed in (int(s) for s in args.seeds.split(",")):
            for method in methods:
                train(args.task, method, method, seed, steps, weights.get(method))
    runs = protocol.load_runs(HERE)
    if not runs:
        raise SystemExit("no kept runs in runs/: nothing to report")
    lines = [INTRO, protocol.provenance_line(runs), ""]
    for task in TASKS:
        section = task_report(runs, task)
        if section:
            plot(runs, task, os.path.join(HERE, f"pareto_{task}.png"))
        lines += section
    with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {os.path.join(HERE, 'RESULTS.md')}")


if __name__ == "__main__":
    main()
