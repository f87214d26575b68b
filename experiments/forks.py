"""Paired forks: k forks per setting from one parent run's step, and the paired differences between settings.

    PYTHONPATH=. python -m experiments.forks --parent=WORKDIR --step=N --k=5 --out=DIR \
        --settings='{"lr 1e-4": {"learning_rate": 1e-4}, "lr 3e-5": {"learning_rate": 3e-5}}' [--metric=eval/accuracy]

The parent must have kept step N (`config.keep_checkpoints_at`) or still hold it in latest/. Fork i of every
setting starts from the parent's train state at step N (`config.fork_from`) with `seed = parent seed + i`,
which draws the batches after the fork (dropout continues from the parent's key), and trains to the parent's
max_steps: forks i of two settings share their prefix and their data, so their difference is paired. Fork 0
with an empty setting continues the parent bit-identically. Each fork's workdir is DIR/SETTING/fork_I; the
table (DIR/FORKS.md, from DIR/forks.json) gives each setting's mean with its t-interval and, against the first
setting, the mean paired difference with a t-interval and a percentile bootstrap interval of that mean.
"""

from __future__ import annotations

import argparse
import json
import os
import re

import ml_collections
import numpy as np

from experiments import protocol

BOOTSTRAP_RESAMPLES = 10_000


def bootstrap_interval(values, confidence: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampled with replacement, seeded)."""
    values = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "setting"


def fork_config(parent: str, step: int, setting: dict, i: int) -> ml_collections.ConfigDict:
    """The parent's resolved config with `setting`'s keys (dotted paths), forked from its step, seed + i."""
    from sft_jax.config_defaults import defaults

    with open(os.path.join(parent, "config.json")) as f:
        saved = json.load(f)
    known = defaults()  # config.json also records the command line, which is no config key
    config = ml_collections.ConfigDict({k: v for k, v in saved.items() if k in known})
    for key, value in setting.items():
        *groups, leaf = key.split(".")
        node = config
        for g in groups:
            node = node[g]
        if leaf not in node:
            raise ValueError(f"setting key {key!r}: not a key of {parent}/config.json")
        node[leaf] = value
    config.fork_from = f"{os.path.abspath(parent)}@{step}"
    config.seed = int(config.seed) + i
    config.keep_checkpoints_at = ()
    return config


def run_forks(parent: str, step: int, settings: dict[str, dict], k: int, out: str, metric: str,
              train=None) -> dict:
    """Trains the k forks of each setting (a fork whose results.json exists is read back), writes
    OUT/forks.json and OUT/FORKS.md and returns what forks.json holds."""
    if train is None:
        from sft_jax.train import train_and_evaluate as train
    if k < 2:
        raise ValueError(f"--k: paired intervals need at least 2 forks per setting, got {k}")
    scores: dict[str, dict[int, float]] = {}
    for name, setting in settings.items():
        scores[name] = {}
        for i in range(k):
            workdir = os.path.join(out, _slug(name), f"fork_{i}")
            done = os.path.join(workdir, "results.json")
            if os.path.isfile(done):
                with open(done) as f:
                    results = json.load(f)
            else:
                print(f"{name}: fork {i + 1} of {k} -> {workdir}", flush=True)
                results = train(fork_config(parent, step, setting, i), workdir)
            if metric not in results:
                raise ValueError(f"{done}: no {metric!r} in the results")
            scores[name][i] = float(results[metric])
    reference = next(iter(settings))
    table = {"parent": os.path.abspath(parent), "step": step, "k": k, "metric": metric, "reference": reference,
             "settings": settings, "scores": {n: [s[i] for i in range(k)] for n, s in scores.items()},
             "code": protocol.code_version()}
    table["summary"] = {n: _cell(protocol.summarize(s.values())) for n, s in scores.items()}
    table["paired"] = {}
    for name in settings:
        if name != reference:
            diffs = [scores[name][i] - scores[reference][i] for i in range(k)]
            low, high = bootstrap_interval(diffs)
            table["paired"][name] = {**_cell(protocol.paired(scores[name], scores[reference])),
                                     "bootstrap_low": low, "bootstrap_high": high}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "forks.json"), "w") as f:
        json.dump(table, f, indent=1)
    with open(os.path.join(out, "FORKS.md"), "w") as f:
        f.write(report(table))
    return table


def _cell(s: protocol.Summary) -> dict:
    return {"n": s.n, "mean": s.mean, "sd": s.sd, "low": s.low, "high": s.high}


def report(table: dict) -> str:
    """FORKS.md: made from forks.json alone."""
    m, ref = table["metric"], table["reference"]
    lines = [f"# Paired forks of {table['parent']} at step {table['step']}", "",
             f"{table['k']} forks per setting (fork i: seed + i after the fork); {m}; code {table['code']}.", "",
             f"| setting | {m}: mean [95% t-interval] | minus {ref}: mean | 95% t-interval | 95% bootstrap |",
             "|---|---|---|---|---|"]
    for name, cell in table["summary"].items():
        d = table["paired"].get(name)
        paired = (f"{d['mean']:+.4f} | [{d['low']:+.4f}, {d['high']:+.4f}] | "
                  f"[{d['bootstrap_low']:+.4f}, {d['bootstrap_high']:+.4f}]") if d else "(reference) | |"
        lines.append(f"| {name} | {cell['mean']:.4f} [{cell['low']:.4f}, {cell['high']:.4f}] | {paired} |")
    lines += ["", "Bootstrap intervals of fewer than 10 forks are rough; the protocol reads the t-interval then.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parent", required=True)
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--settings", required=True, help="JSON: {name: {config key: value}}; the first is the reference")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--out", required=True)
    p.add_argument("--metric", default="eval/accuracy")
    args = p.parse_args()
    from sft_jax import platform

    platform.configure_cpu()
    table = run_forks(args.parent, args.step, json.loads(args.settings), args.k, args.out, args.metric)
    print(report(table))


if __name__ == "__main__":
    main()
