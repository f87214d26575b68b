"""How far fine-tuning moved the weights from the pre-trained ones, per part of the model (`config.drift.params`).

For each unit of the layout (embeddings, block i, head) and for the whole model:
  drift/relative_change/UNIT   ||theta - theta0|| / ||theta0|| over the unit's pre-trained tensors (Frobenius)
  drift/effective_rank/UNIT    mean over the unit's weight matrices of the effective rank of their change
                               delta W: exp of the entropy of its normalised squared singular values (Roy and
                               Vetterli 2007): 1 when the change is one direction, up to min(in, out) when spread
  drift/top_share/UNIT         mean share of the change's energy in its top singular value, sigma_1^2 / sum sigma^2

A LoRA run's change of an adapted matrix is its adapters' product, lora_a @ lora_b * alpha / rank, so its
effective rank is at most the rank: the spectrum that separates LoRA from full fine-tuning. Freshly initialised
parameters (a new head) have no pre-trained value and are left out. Scanned or quantised storage is not
unpacked: those tensors count in relative change only when they are plain float arrays.
Everything is computed on the host in float32 (NumPy's SVD): cheap for small models, minutes for billions of
parameters, hence opt-in.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from sft_jax.models.layout import ParamLayout

WHOLE = "all"


def unit_of(name: str, layout: ParamLayout) -> str:
    """"embeddings", "block_I" or "head" (anything else) for a parameter path."""
    if re.search(layout.embeddings, name):
        return "embeddings"
    m = re.search(layout.layer.replace("{i}", r"(\d+)"), name)
    return f"block_{int(m.group(1))}" if m else "head"


def _spectrum(delta: np.ndarray) -> np.ndarray:
    return np.linalg.svd(delta.astype(np.float32), compute_uv=False)


def effective_rank(singular_values: np.ndarray) -> float:
    energy = np.square(singular_values.astype(np.float64))
    total = energy.sum()
    if total <= 0:
        return 0.0
    p = energy[energy > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def changes(pretrained: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray],
            lora_scale: float | None = None) -> dict[str, np.ndarray]:
    """{name of a pre-trained tensor: its change}, a LoRA-adapted kernel's being its adapters' product."""
    out = {}
    for name, before in pretrained.items():
        if name not in params or not np.issubdtype(np.asarray(before).dtype, np.floating):
            continue
        delta = np.asarray(params[name], np.float32) - np.asarray(before, np.float32)
        base = name[: -len("kernel")] if name.endswith("kernel") else None
        if base is not None and base + "lora_a" in params and lora_scale is not None:
            a, b = (np.asarray(params[base + k], np.float32) for k in ("lora_a", "lora_b"))
            delta = delta + (a @ b) * lora_scale
        out[name] = delta
    return out


def param_drift(pretrained: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray], layout: ParamLayout,
                lora_scale: float | None = None) -> dict[str, float]:
    """The drift/... metrics of `params` against `pretrained` (host arrays by parameter path)."""
    fresh = re.compile("^" + layout.fresh) if layout.fresh else None
    pretrained = {k: v for k, v in pretrained.items() if not (fresh and fresh.search(k))}
    deltas = changes(pretrained, params, lora_scale)
    moved: dict[str, float] = {}
    norm: dict[str, float] = {}
    ranks: dict[str, list[float]] = {}
    shares: dict[str, list[float]] = {}
    for name, delta in deltas.items():
        before = np.asarray(pretrained[name], np.float32)
        for unit in (unit_of(name, layout), WHOLE):
            moved[unit] = moved.get(unit, 0.0) + float(np.square(delta, dtype=np.float64).sum())
            norm[unit] = norm.get(unit, 0.0) + float(np.square(before, dtype=np.float64).sum())
        if delta.ndim == 2 and min(delta.shape) > 1 and not re.search(layout.embeddings, name):
            s = _spectrum(delta)
            energy = float(np.square(s, dtype=np.float64).sum())
            for unit in (unit_of(name, layout), WHOLE):
                ranks.setdefault(unit, []).append(effective_rank(s))
                shares.setdefault(unit, []).append(float(s[0] ** 2 / energy) if energy > 0 else 0.0)
    out = {}
    for unit in sorted(moved, key=_unit_order):
        out[f"drift/relative_change/{unit}"] = float(np.sqrt(moved[unit] / norm[unit])) if norm[unit] else 0.0
    for unit in sorted(ranks, key=_unit_order):
        out[f"drift/effective_rank/{unit}"] = float(np.mean(ranks[unit]))
        out[f"drift/top_share/{unit}"] = float(np.mean(shares[unit]))
    return out


def _unit_order(unit: str) -> tuple:
    if unit.startswith("block_"):
        return (1, int(unit[len("block_"):]))
    return ({"embeddings": 0, "head": 2, WHOLE: 3}[unit], 0)


# The per-block families drift.png shows, where a run logged them: (metric prefix, y-axis label).
_PANELS = (("drift/relative_change/", "||theta - theta0|| / ||theta0||"),
           ("drift/effective_rank/", "effective rank of the change"),
           ("drift/cka/", "CKA with the pre-trained model"))


def plot(metrics: Mapping[str, float], path: str) -> None:
    """Per block, side by side: relative change and effective rank of the change (`drift.params`), and the
    CKA of the block's representations with the pre-trained model's (`drift.cka`) (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(prefix, label) for prefix, label in _PANELS if any(k.startswith(prefix + "block_") for k in metrics)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (prefix, label) in zip(axes[0], panels):
        blocks = sorted((k[len(prefix):] for k in metrics if k.startswith(prefix + "block_")), key=_unit_order)
        x = [int(b[len("block_"):]) for b in blocks]
        ax.bar(x, [metrics[prefix + b] for b in blocks])
        ax.set_xticks(x)
        ax.set_ylabel(label)
        ax.set_xlabel("block")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
