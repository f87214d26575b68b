"""The forgetting summary (probes before and after fine-tuning) and the WiSE-FT sweep built on it."""

from __future__ import annotations

import re

import jax
import tqdm

from sft_jax import regularizers
from sft_jax.tasks.base import Task


def summarise(task: Task, before: dict[str, float], after: dict[str, float], prefix: str = "") -> dict[str, float]:
    """`{prefix}forgetting/NAME/after` and `/drop` (for probes where higher is better) or `/rise` (lower is
    better): how much worse each probe got, positive when the model forgot."""
    out = {}
    for name, value in after.items():
        higher_is_better = task.higher_is_better.get(name)
        summary = "change" if higher_is_better is None else ("drop" if higher_is_better else "rise")
        sign = -1.0 if higher_is_better else 1.0
        out[f"{prefix}forgetting/{name}/after"] = value
        out[f"{prefix}forgetting/{name}/{summary}"] = sign * (value - before[name]) + 0.0  # + 0.0: no "-0.0"
    return out


def wise_ft_sweep(task: Task, alphas, eval_fn, pretrained: dict, finetuned: dict, p_shard: dict,
                  before: dict[str, float]) -> dict[str, float]:
    """Task metrics (and, with a validation split, the reported split's as test/...) and forgetting of the
    WiSE-FT interpolation at each of `alphas` (a fresh head stays as fine-tuned: it has no pre-trained value)."""
    fresh = re.compile("^" + task.layout.fresh) if task.layout.fresh else None
    keep = [k for k in finetuned if fresh and fresh.search(k)]
    out = {}
    for alpha in alphas:
        mixed = regularizers.wise_ft(pretrained, finetuned, float(alpha), keep)
        mixed = {k: jax.device_put(v, p_shard[k]) for k, v in mixed.items()}
        prefix = f"wise_ft/{float(alpha):g}/"
        out.update({prefix + k: v for k, v in task.evaluate(eval_fn, mixed).items()})
        # With a validation split, alpha is chosen on eval/ (validation) and reported on test/ (data.eval).
        out.update({prefix + k: v for k, v in task.evaluate_reported(eval_fn, mixed).items()})
        out.update(summarise(task, before, task.probes(mixed), prefix))
        tqdm.tqdm.write(f"WiSE-FT alpha={float(alpha):g}: " + ", ".join(
            f"{k[len(prefix):]}={v:.4f}" for k, v in out.items() if k.startswith(prefix)))
    return out
