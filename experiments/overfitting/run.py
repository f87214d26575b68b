"""Where full fine-tuning starts to overfit and to forget: learning rate x epochs on SST-2 (all-MiniLM-L6-v2),
under the experiment protocol.

    PYTHONPATH=. python -m experiments.overfitting.run [--lrs=1e-5,5e-5,2e-4] [--seeds=0,1,2]
        [--train_examples=640] [--epochs=4] [--evals_per_epoch=4]
    PYTHONPATH=. python -m experiments.overfitting.run --report

One run per (learning rate, seed) on a seeded subsample of SST-2 train (so several epochs fit the budget), a
constant learning rate after a short warm-up, no early stop. Evaluations (`--evals_per_epoch` per epoch) score a
validation set carved from the training split (VALIDATION_FRACTION, drawn with the seed, about as large as
dev) and run the STS-B probe (`forgetting.every_eval`): the curves are those. The run's best checkpoint (best
validation accuracy: where early stopping would stop) is the one scored on SST-2 dev, once (test/accuracy).
Workdirs: workdirs/lrLR_sSEED (ignored by git); each run's config, results and metrics are kept with the code
version under runs/lrLR/seed_SEED, and RESULTS.md and curves.png are made from those files only.
"""

from __future__ import annotations

import argparse
import math
import os

import numpy as np

from experiments import protocol
from experiments.common import markdown_table, run_cli

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH = 32
VALIDATION_FRACTION = 0.013  # of SST-2's 67,349 training sentences: about 875, dev's size (872)
FORGET_THRESHOLD = 0.02  # an STS-B Spearman drop above this counts as forgetting having begun


def curves(run: dict) -> dict[str, np.ndarray]:
    """[step, value] rows of the kept metrics: train loss, validation accuracy and loss, STS-B Spearman."""
    m = run["metrics"]
    return {"train_loss": np.array([[r["step"], r["train/loss"]] for r in m if "train/loss" in r]),
            "accuracy": np.array([[r["step"], r["eval/accuracy"]] for r in m if "eval/accuracy" in r]),
            "loss": np.array([[r["step"], r["eval/loss"]] for r in m if "eval/loss" in r]),
            "stsb": np.array([[r["step"], r["forgetting/stsb_spearman"]] for r in m
                              if "forgetting/stsb_spearman" in r])}


def analyse(run: dict) -> dict[str, float]:
    """Epochs of the best validation accuracy (early stopping's point), of the validation-loss minimum
    (overfitting's onset) and of the first STS-B drop above FORGET_THRESHOLD (nan: none); the dev accuracy of
    the best checkpoint; STS-B there and at the end."""
    c, r = curves(run), run["results"]
    per_epoch = run["config"]["data"]["max_train_examples"] / BATCH
    before = r["forgetting/stsb_spearman/before"]
    forgot = [step for step, value in c["stsb"] if before - value > FORGET_THRESHOLD]
    best = c["accuracy"][np.argmax(c["accuracy"][:, 1])]
    return {"dev accuracy (%)": 100 * r["test/accuracy"], "best epoch": best[0] / per_epoch,
            "val-loss minimum epoch": c["loss"][np.argmin(c["loss"][:, 1]), 0] / per_epoch,
            "forgetting onset epoch": forgot[0] / per_epoch if forgot else float("nan"),
            "STS-B at best": r["forgetting/stsb_spearman/after"], "STS-B at end": c["stsb"][-1, 1]}


def cell(values: list[float], digits: int) -> str:
    defined = [v for v in values if not math.isnan(v)]
    if not defined:
        return f"none in {len(values)}"
    text = protocol.summarize(defined).format(digits=digits)
    return text if len(defined) == len(values) else f"{text}; none in {len(values) - len(defined)}"


def report(runs: list[dict]) -> str:
    c = runs[0]["config"]
    protocol.check_equal_budget({f"{r['arm']}_{r['seed']}": r["config"] for r in runs})
    per_epoch = c["data"]["max_train_examples"] / BATCH
    arms = sorted({r["arm"] for r in runs}, key=lambda a: float(a[2:]))
    figures = {arm: [analyse(r) for r in runs if r["arm"] == arm] for arm in arms}
    keys = list(next(iter(figures.values()))[0])
    rows = [[arm[2:], str(len(figures[arm]))] + [cell([f[k] for f in figures[arm]], 2 if "epoch" in k or "%" in k
                                                      else 4) for k in keys] for arm in arms]
    lines = ["# Overfitting and forgetting over training: learning rate x epochs (SST-2, all-MiniLM-L6-v2)", "",
             "Made by `python -m experiments.overfitting.run` from the kept runs in runs/ only. Full fine-tuning "
             f"on {c['data']['max_train_examples']} SST-2 training sentences (a subsample drawn with the seed), "
             f"batch {BATCH}, {c['max_steps']} steps ({c['max_steps'] / per_epoch:g} epochs), constant learning "
             f"rate after {c['warmup_steps']} warm-up steps, no early stop. Every {c['eval_every']} steps "
             f"({per_epoch / c['eval_every']:g} per epoch): accuracy and loss on a validation set carved from the "
             f"training split ({c['data']['validation_fraction']:.1%}, drawn with the seed) and the STS-B probe. "
             "The best checkpoint on validation is scored once on SST-2 dev. Cells: mean ± half-width of the 95% "
             f"t-interval [interval] (n); forgetting onset: the first evaluation whose STS-B Spearman is more "
             f"than {FORGET_THRESHOLD} below the pre-trained encoder's ('none in k': k runs never got there).", "",
             protocol.provenance_line(runs), ""]
    lines += markdown_table(["lr", "runs"] + keys, rows)
    lines += ["", "![curves](curves.png)", "", "Commands (seed 0):", ""]
    lines += [f"    {r['provenance']['command']}" for r in runs if r["seed"] == 0]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = {}
    for r in runs:
        c = curves(r)
        per_epoch = r["config"]["data"]["max_train_examples"] / BATCH
        first = r["arm"] not in colors
        label = f"lr {r['arm'][2:]}" if first else None
        line, = axes[0].plot(c["loss"][:, 0] / per_epoch, c["loss"][:, 1], "o-", ms=2, lw=1, alpha=0.7,
                             color=colors.get(r["arm"]), label=label)
        colors[r["arm"]] = line.get_color()
        axes[1].plot(c["accuracy"][:, 0] / per_epoch, 100 * c["accuracy"][:, 1], "o-", ms=2, lw=1, alpha=0.7,
                     color=line.get_color(), label=label)
        axes[2].plot(c["stsb"][:, 0] / per_epoch, c["stsb"][:, 1], "o-", ms=2, lw=1, alpha=0.7,
                     color=line.get_color(), label=label)
    axes[2].axhline(runs[0]["results"]["forgetting/stsb_spearman/before"], color="black", ls="--", lw=1,
                    label="pre-trained")
    axes[0].set(xlabel="epoch", ylabel="cross-entropy", title="validation loss (one line per seed)")
    axes[1].set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy")
    axes[2].set(xlabel="epoch", ylabel="STS-B Spearman", title="forgetting probe over training")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lrs", default="1e-5,5e-5,2e-4")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--train_examples", type=int, default=640)
    p.add_argument("--epochs", type=float, default=4)
    p.add_argument("--evals_per_epoch", type=int, default=4)
    p.add_argument("--report", action="store_true")
    args = p.parse_args()
    if not args.report:
        per_epoch = args.train_examples / BATCH
        steps = math.ceil(args.epochs * per_epoch)
        every = max(round(per_epoch / args.evals_per_epoch), 1)
        for seed in (int(s) for s in args.seeds.split(",")):
            for lr in (float(x) for x in args.lrs.split(",")):
                arm = f"lr{lr:g}"
                workdir = os.path.join(HERE, "workdirs", f"{arm}_s{seed}")
                results = run_cli("configs/sst2.py:full", workdir, {
                    "seed": seed, "learning_rate": lr, "data.max_train_examples": args.train_examples,
                    "data.validation_fraction": VALIDATION_FRACTION, "max_steps": steps, "schedule": "constant",
                    "warmup_steps": max(steps // 10, 1), "eval_every": every, "checkpoint_every": steps,
                    "log_every": max(every // 2, 1), "early_stopping.patience": 0, "forgetting.every_eval": True,
                    "batch_size": BATCH})
                protocol.keep_run(workdir, HERE, arm, seed, results["command"])
    protocol.write_results(HERE, report, plot, "curves.png")


if __name__ == "__main__":
    main()
