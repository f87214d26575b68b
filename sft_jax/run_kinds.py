"""Which command serves a run's workdir: `sft_jax.predict` classifies with text and image classification
runs, `sft_jax.generate` completes prompts with language-model runs. A workdir given to the wrong one (or
texts given for an image run) is refused in one line that says what the workdir holds and what to run."""

from __future__ import annotations

from typing import Any

from sft_jax.rundir import RunDir

# task -> (what its workdir holds, the command that uses it; {w} is the workdir).
KINDS = {
    "text_classification": ("a text classifier", "python -m sft_jax.predict --workdir={w} --text=TEXT"),
    "image_classification": ("an image classifier", "python -m sft_jax.predict --workdir={w} --image=FILE"),
    "sft": ("a language model", "python -m sft_jax.generate --workdir={w} --prompt=TEXT"),
    "language_modeling": ("a language model", "python -m sft_jax.generate --workdir={w} --prompt=TEXT"),
}


def require_task(workdir: str, tasks: tuple[str, ...], doing: str) -> dict[str, Any]:
    """The run config of `workdir` when its task is one of `tasks`; else ValueError naming its task and the
    command for it. `doing` says what was asked ("classify texts")."""
    run = RunDir(workdir).read_config()
    task = run.get("task", "text_classification")  # the default task; early workdirs did not record it
    if task in tasks:
        return run
    holds, command = KINDS.get(task, (f"a {task!r} model", ""))
    use = f"; use {command.format(w=workdir)}" if command else ""
    raise ValueError(f"{workdir}: this workdir holds {holds} (task={task}), which cannot {doing}{use}")
