"""The README.md written into every export: what the model is, what it was trained on and how, how well it
did, and the command that made it, from the run's config.json and results.json."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from sft_jax.rundir import RunDir

_FIGURES = ("eval/", "forgetting/", "best_step", "step", "trainable_params", "total_params")


def _metrics(workdir: str) -> dict[str, Any]:
    """The headline figures of results.json (all its scalars when none of those), {} without one."""
    path = RunDir(workdir).file("results.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            results = json.load(f)
    except ValueError:
        return {}
    scalars = {k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    chosen = {k: v for k, v in scalars.items() if k.startswith(_FIGURES)}
    return chosen or scalars


def _value(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write(out: str | os.PathLike, workdir: str, *, what: str, usage: str) -> pathlib.Path:
    """Writes `out`/README.md for the run in `workdir`; `what` says what the folder holds and `usage` is a
    Python snippet that loads it."""
    run = RunDir(workdir).read_config()
    data = run.get("data", {})
    command = run.get("command") or "(not recorded: the run predates config.json's `command`)"
    lines = [
        "---", "library_name: transformers", "tags: [sft_jax]", "---", "",
        f"# {pathlib.Path(os.path.abspath(workdir)).name}", "",
        f"{what}, fine-tuned with sft_jax from the run in `{os.path.abspath(workdir)}`.", "",
        "| | |", "|---|---|",
        f"| base model | `{run.get('model')}` |",
        f"| task | {run.get('task', 'text_classification')} |",
        f"| training data | `{data.get('train')}` |",
        f"| evaluation data | `{data.get('eval')}` |",
        f"| strategy | {run.get('strategy')} |",
    ]
    for key in ("pooling", "learning_rate", "max_steps", "batch_size", "max_length", "seed"):
        if key in run and not (key == "pooling" and run.get("task") in ("sft", "language_modeling")):
            lines.append(f"| {key} | {run[key]} |")
    metrics = _metrics(workdir)
    lines += ["", "## Metrics", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_value(v)} |" for k, v in metrics.items()]
    else:
        lines.append("No results.json in the workdir (the run had not finished when this was exported).")
    lines += ["", "## The command that made the run", "", "```", command, "```", "",
              "## Use", "", "```python", usage.strip(), "```", ""]
    path = pathlib.Path(out) / "README.md"
    path.write_text("\n".join(lines))
    return path
