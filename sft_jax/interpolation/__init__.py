"""Interpolation sweeps of a finished run's weights: from the pre-trained model to the fine-tuned one (WiSE-FT,
generalised to any alphas after training), or from another run's weights to this run's (two seeds, two methods).

    sweep(workdir, alphas)                 # theta(alpha) = (1 - alpha) * pre-trained + alpha * fine-tuned
    sweep(workdir, alphas, other=WORKDIR)  # theta(alpha) = (1 - alpha) * other run's + alpha * this run's

At each alpha the task's evaluation and its forgetting probes are scored (`task.evaluate`, `task.probes`). From
the pre-trained model, a freshly initialised head has no pre-trained value and stays as fine-tuned (as in
WiSE-FT); between two runs every parameter is interpolated, so they must be runs of one model and strategy.
The loss barrier is the largest rise of the evaluation loss above the straight line between the two ends,
max over alpha of L(alpha) - ((1 - alpha) L(0) + alpha L(1)): about 0 when the runs lie in one basin.
`write` saves the sweep as JSON and plots the gain-against-forgetting path and the loss along alpha.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

import ml_collections
import numpy as np

from sft_jax import regularizers, tasks
from sft_jax.config_defaults import defaults
from sft_jax.rundir import RunDir
from sft_jax.train_step import make_eval_step
from sft_jax.trainer import forgetting, setup


def _run_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run recorded (config.json), over today's defaults for keys it predates."""
    config = defaults()
    config.update(ml_collections.ConfigDict(RunDir(workdir).read_config()))
    return config


def sweep(workdir: str, alphas: Sequence[float], other: str | None = None) -> dict:
    """{"alphas", "points": [{"alpha", metrics...}], "loss_barrier", "from", "to"} of `workdir`'s best
    checkpoint interpolated from the pre-trained weights or from `other`'s best checkpoint."""
    config = _run_config(workdir)
    rundir = RunDir(workdir)
    task = tasks.get(config.task)(config, rundir)
    task.params = setup.in_storage_dtype(task.params, config.param_dtype, task.layout)
    task.model_def = setup.with_model_options(task.model_def, task.params, config)
    pretrained = dict(task.params)
    finetuned = rundir.restore_params(pretrained, "best")
    if other is None:
        start, keep = pretrained, _fresh_names(task, finetuned)
    else:
        theirs = _run_config(other)
        for key in ("task", "model", "strategy"):
            if theirs[key] != config[key]:
                raise ValueError(f"--other={other}: its {key} is {theirs[key]!r}, this run's {config[key]!r}; "
                                 "interpolating needs runs of one model and strategy")
        start, keep = RunDir(other).restore_params(pretrained, "best"), []
    eval_fn = make_eval_step(task.model_def, task.loss_fn)
    before = task.probes(pretrained)
    points = []
    for alpha in alphas:
        params = regularizers.wise_ft(start, finetuned, float(alpha), keep)
        point = {"alpha": float(alpha), **task.evaluate(eval_fn, params)}
        point.update(forgetting.summarise(task, before, task.probes(params)))
        points.append(point)
        print(f"alpha={float(alpha):g}: " + ", ".join(f"{k}={v:.4f}" for k, v in point.items() if k != "alpha"),
              flush=True)
    return {"from": other or "pre-trained", "to": os.path.abspath(workdir), "alphas": [float(a) for a in alphas],
            "points": points, "loss_barrier": loss_barrier(points)}


def _fresh_names(task, params: dict) -> list[str]:
    fresh = re.compile("^" + task.layout.fresh) if task.layout.fresh else None
    return [k for k in params if fresh and fresh.search(k)]


def loss_barrier(points: Sequence[dict], key: str = "eval/loss") -> float | None:
    """max over alpha of loss(alpha) minus the straight line between the sweep's two ends; None without both
    alpha = 0 and alpha = 1 (the line needs them)."""
    by_alpha = {p["alpha"]: p[key] for p in points if key in p}
    if 0.0 not in by_alpha or 1.0 not in by_alpha:
        return None
    start, end = by_alpha[0.0], by_alpha[1.0]
    return max(loss - ((1 - a) * start + a * end) for a, loss in by_alpha.items())


def write(result: dict, out: str) -> tuple[str, str]:
    """OUT.json and OUT.png (task metric against forgetting along alpha; evaluation loss against alpha)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    points = result["points"]
    alphas = np.array([p["alpha"] for p in points])
    metric = next((k for k in ("eval/accuracy", "eval/rougeL", "eval/perplexity") if k in points[0]), None)
    change = next((k for k in points[0] if k.startswith("forgetting/") and not k.endswith("/after")), None)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if metric and change:
        axes[0].plot([p[change] for p in points], [p[metric] for p in points], marker="o")
        for p in points:
            axes[0].annotate(f"{p['alpha']:g}", (p[change], p[metric]), fontsize=8)
        axes[0].set_xlabel(change)
        axes[0].set_ylabel(metric)
        axes[0].set_title("gain against forgetting along alpha")
    else:
        axes[0].set_axis_off()
        axes[0].text(0.5, 0.5, "no forgetting probe configured", ha="center")
    axes[1].plot(alphas, [p.get("eval/loss", np.nan) for p in points], marker="o")
    axes[1].set_xlabel(f"alpha (0: {result['from']}, 1: this run)")
    axes[1].set_ylabel("eval/loss")
    barrier = result.get("loss_barrier")
    axes[1].set_title("loss along alpha" + (f" (barrier {barrier:.4f})" if barrier is not None else ""))
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=100)
    plt.close(fig)
    return out + ".json", out + ".png"

