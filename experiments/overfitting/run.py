"""Where full fine-tuning starts to overfit and to forget: learning rate x epochs on SST-2 (all-MiniLM-L6-v2).

    python -m experiments.overfitting.run [--lrs=1e-5,5e-5,2e-4] [--train_examples=640] [--epochs=4] \
        [--evals_per_epoch=1]

One long run per learning rate on a seeded subsample of SST-2 train (so several epochs fit the budget), a
constant learning rate after a short warmup, evaluation on the SST-2 dev set and the STS-B probe
`--evals_per_epoch` times per epoch (`forgetting.every_eval`), no early stopping during the run: the curves
show the whole trajectory, and early stopping is read off them (the best dev-accuracy evaluation, which is what
the run's best checkpoint keeps). Workdirs: workdirs/lr<LR>. Writes results.json, RESULTS.md and curves.png
next to this file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

from experiments.common import markdown_table, run_cli_cached

HERE = os.path.dirname(os.path.abspath(__file__))

BATCH = 32
FORGET_THRESHOLD = 0.02  # an STS-B Spearman drop above this counts as forgetting having begun


def read_curves(workdir: str) -> dict[str, list]:
    train, evals = [], []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            if "train/loss" in m:
                train.append((m["step"], m["train/loss"], m["train/accuracy"]))
            if "eval/accuracy" in m:
                evals.append((m["step"], m["eval/accuracy"], m["eval/loss"], m.get("forgetting/stsb_spearman")))
    return {"train": train, "eval": evals}


def analyse(curves: dict, before: float, steps_per_epoch: float) -> dict:
    """Best evaluation (what early stopping keeps), eval-loss minimum (overfitting onset), forgetting onset."""
    ev = curves["eval"]
    best = max(ev, key=lambda e: e[1])  # first of the maxima
    loss_min = min(ev, key=lambda e: e[2])
    forget = next((e for e in ev if before - e[3] > FORGET_THRESHOLD), None)
    last = ev[-1]
    return {"best_step": best[0], "best_epoch": best[0] / steps_per_epoch, "best_accuracy": best[1],
            "best_stsb": best[3], "eval_loss_min_step": loss_min[0],
            "eval_loss_min_epoch": loss_min[0] / steps_per_epoch,
            "forgetting_onset_epoch": forget[0] / steps_per_epoch if forget else None,
            "final_accuracy": last[1], "final_eval_loss": last[2], "final_stsb": last[3],
            "final_train_loss": float(np.mean([t[1] for t in curves["train"][-4:]]))}


def plot(runs: list[dict], steps_per_epoch: float, before: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in runs:
        c = r["curves"]
        tr = np.array([t[:2] for t in c["train"]])
        ev = np.array([[e[0], e[1], e[2], e[3]] for e in c["eval"]], dtype=float)
        line, = axes[0].plot(tr[:, 0] / steps_per_epoch, tr[:, 1], alpha=0.5, lw=1, label=f"train, lr {r['lr']:g}")
        axes[0].plot(ev[:, 0] / steps_per_epoch, ev[:, 2], "o-", color=line.get_color(), label=f"dev, lr {r['lr']:g}")
        axes[1].plot(ev[:, 0] / steps_per_epoch, 100 * ev[:, 1], "o-", color=line.get_color(), label=f"lr {r['lr']:g}")
        axes[1].axvline(r["best_epoch"], color=line.get_color(), ls=":", lw=1)
        axes[2].plot(ev[:, 0] / steps_per_epoch, ev[:, 3], "o-", color=line.get_color(), label=f"lr {r['lr']:g}")
    axes[2].axhline(before, color="black", ls="--", lw=1, label="pre-trained")
    axes[0].set(xlabel="epoch", ylabel="cross-entropy", title="train (per logged batch) and dev loss")
    axes[1].set(xlabel="epoch", ylabel="SST-2 dev accuracy (%)", title="dev accuracy (dotted: best = early stop)")
    axes[2].set(xlabel="epoch", ylabel="STS-B Spearman", title="forgetting probe over training")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "curves.png"), dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lrs", default="1e-5,5e-5,2e-4")
    parser.add_argument("--train_examples", type=int, default=640)
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--evals_per_epoch", type=int, default=1)
    args = parser.parse_args()
    steps_per_epoch = args.train_examples / BATCH
    steps = math.ceil(args.epochs * steps_per_epoch)
    every = max(round(steps_per_epoch / args.evals_per_epoch), 1)
    runs = []
    for lr in (float(x) for x in args.lrs.split(",")):
        workdir = os.path.join(HERE, "workdirs", f"lr{lr:g}")
        r = run_cli_cached("configs/sst2.py:full", workdir, {
            "learning_rate": lr, "data.max_train_examples": args.train_examples, "max_steps": steps,
            "schedule": "constant", "warmup_steps": max(steps // 10, 1), "eval_every": every, "checkpoint_every": steps,
            "log_every": max(every // 2, 1), "early_stopping.patience": 0, "forgetting.every_eval": True,
            "batch_size": BATCH})
        before = r["forgetting/stsb_spearman/before"]
        curves = read_curves(workdir)
        runs.append(dict(lr=lr, command=r["command"], before=before, curves=curves, wall_s=r["run_wall_s"],
                         **analyse(curves, before, steps_per_epoch)))
    with open(os.path.join(HERE, "results.json"), "w") as f:
        json.dump(runs, f, indent=1)
    before = runs[0]["before"]
    plot(runs, steps_per_epoch, before)
    command = " ".join(["python -m experiments.overfitting.run", *sys.argv[1:]])
    table = markdown_table(
        ["lr", "best dev acc (epoch)", "dev acc at end", "dev-loss minimum (epoch)", "STS-B at best", "STS-B at end",
         f"forgetting onset (drop > {FORGET_THRESHOLD})", "train loss at end", "wall (s)"],
        [[f"{r['lr']:g}", f"{100 * r['best_accuracy']:.2f}% ({r['best_epoch']:.1f})",
          f"{100 * r['final_accuracy']:.2f}%", f"{r['eval_loss_min_epoch']:.1f}", f"{r['best_stsb']:.4f}",
          f"{r['final_stsb']:.4f}",
          "-" if r["forgetting_onset_epoch"] is None else f"epoch {r['forgetting_onset_epoch']:.1f}",
          f"{r['final_train_loss']:.4f}", f"{r['wall_s']:.0f}"] for r in runs])
    lines = ["# Overfitting and forgetting over training: learning rate x epochs (SST-2, all-MiniLM-L6-v2)", "",
             f"Produced by `{command}` (STS-B Spearman of the pre-trained encoder: {before:.4f}).", "",
             f"Full fine-tuning on {args.train_examples} SST-2 train sentences (seeded subsample), batch {BATCH}, "
             f"{steps} steps ({args.epochs:g} epochs), constant learning rate after {max(steps // 10, 1)} warmup "
             "steps, dev "
             f"accuracy / loss and the STS-B probe every {every} steps; no early stopping during the run.", "",
             *table, "", "![curves](curves.png)", "", "Commands:", ""]
    lines += [f"    {r['command']}" for r in runs]
    with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
