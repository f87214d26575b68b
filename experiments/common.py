"""Shared by the experiment scripts: run one CLI training run, read back what it wrote, draw tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(config: str, workdir: str, overrides: dict | None = None) -> dict:
    """`python -m sft_jax.main --config=CONFIG --workdir=WORKDIR --config.K=V ...`; returns its results.json
    plus `command` and `process_wall_s`. A finished workdir is reused (the run resumes and stops at once)."""
    cmd = _cli(config, workdir, overrides)
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    results.update(command=cli_command(config, workdir, overrides), process_wall_s=time.time() - start)
    return results


def _cli(config: str, workdir: str, overrides: dict | None) -> list[str]:
    cmd = [sys.executable, "-m", "sft_jax.main", f"--config={config}", f"--workdir={workdir}"]
    return cmd + [f"--config.{k}={v}" for k, v in (overrides or {}).items()]


def cli_command(config: str, workdir: str, overrides: dict | None = None) -> str:
    """The command `run_cli` runs, as it records it (paths relative to the repository)."""
    return "python " + " ".join(_cli(config, workdir, overrides)[1:]).replace(ROOT + "/", "")


def run_kept(config: str, workdir: str, overrides: dict, experiment_dir: str, arm: str, seed: int,
             **extra) -> dict:
    """`run_cli`, then `protocol.keep_run` (with `extra` in the provenance); returns the results. A run kept
    already by the same command is not run again: its kept results come back, so an experiment longer than a
    session goes on from its committed runs on any clone."""
    from experiments import protocol

    kept = protocol.kept_results(experiment_dir, arm, seed, cli_command(config, workdir, overrides))
    if kept is not None:
        print(f"kept already: {arm} seed {seed}", flush=True)
        return kept
    results = run_cli(config, workdir, overrides)
    protocol.keep_run(workdir, experiment_dir, arm, seed, results["command"], **extra)
    return results


def run_cli_cached(config: str, workdir: str, overrides: dict | None = None) -> dict:
    """`run_cli`, except that a workdir whose results.json exists is read back instead of re-run (its final
    evaluation and probes are not repeated), so a report can be rebuilt from finished runs at no cost.
    `process_wall_s` is then the time from config.json (written once data and model are loaded) to
    results.json, for every run alike: `run_wall_s`."""
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
        run_cli(config, workdir, overrides)
    else:
        print(f"reusing {path}", flush=True)
    with open(path) as f:
        results = json.load(f)
    results.update(command=cli_command(config, workdir, overrides),
                   run_wall_s=os.path.getmtime(path) - os.path.getmtime(os.path.join(workdir, "config.json")))
    return results


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines
