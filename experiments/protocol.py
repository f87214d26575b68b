"""The protocol every experiment follows, in one place: equal budgets, several seeds, intervals, provenance.

- **Budgets**: arms compared in one table train for the same optimizer steps, unless the question is compute,
  in which case they train for the same measured time and the table says so (`check_equal_budget`).
- **Seeds and intervals**: at least 3 seeds per arm (5 where the effect is under a point); a table cell is the
  mean, the sample SD and a 95% t-interval of the runs (`summarize`); arms run with the same seeds are compared
  by their paired differences, with the interval of those (`paired`).
- **Selection on validation**: early stopping, the best checkpoint and WiSE-FT's alpha are chosen on data the
  table does not report (sft_jax's `config.data.validation_fraction` carves it from the training data).
- **Provenance**: every run's resolved config, results.json, metrics.jsonl and code version (git commit and
  whether the tree had uncommitted changes) are kept under the experiment (`keep_run`), and tables are made from
  those files only (`load_runs`): a table can be recomputed, and an arm rerun from its recorded config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterable, Mapping

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_SEEDS = 3
RUN_FILES = ("config.json", "results.json", "metrics.jsonl")


@dataclasses.dataclass(frozen=True)
class Summary:
    """n runs' mean, sample SD and two-sided t-interval (nan where n < 2)."""

    n: int
    mean: float
    sd: float
    low: float
    high: float
    confidence: float = 0.95

    def format(self, scale: float = 1.0, digits: int = 2) -> str:
        """"mean ± half-width [low, high] (n=N)", values times `scale` (100 for percentages)."""
        if self.n < 2:
            return f"{self.mean * scale:.{digits}f} (n={self.n}, no interval)"
        half = (self.high - self.mean) * scale
        return (f"{self.mean * scale:.{digits}f} ± {half:.{digits}f} "
                f"[{self.low * scale:.{digits}f}, {self.high * scale:.{digits}f}] (n={self.n})")


def summarize(values: Iterable[float], confidence: float = 0.95) -> Summary:
    """Mean, sample SD (n - 1) and the t-interval of the mean at `confidence`."""
    from scipy import stats

    values = [float(v) for v in values]
    if not values:
        raise ValueError("summarize: no values")
    n, mean = len(values), statistics.fmean(values)
    if n < 2:
        return Summary(n, mean, math.nan, math.nan, math.nan, confidence)
    sd = statistics.stdev(values)
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)
    return Summary(n, mean, sd, mean - half, mean + half, confidence)


def paired(a: Mapping[int, float], b: Mapping[int, float], confidence: float = 0.95) -> Summary:
    """The summary of a[seed] - b[seed] over the seeds both arms ran."""
    shared = sorted(set(a) & set(b))
    if not shared:
        raise ValueError("paired: the arms share no seed")
    return summarize([a[s] - b[s] for s in shared], confidence)


def check_seeds(runs_by_arm: Mapping[str, Iterable[int]], minimum: int = MIN_SEEDS) -> None:
    """Raises ValueError naming an arm with fewer than `minimum` seeds."""
    for arm, seeds in runs_by_arm.items():
        if len(set(seeds)) < minimum:
            raise ValueError(f"arm {arm!r}: {len(set(seeds))} seeds, the protocol asks for at least {minimum}")


def check_equal_budget(configs: Mapping[str, Mapping], key: str = "max_steps") -> None:
    """Raises ValueError unless every arm's config has the same `key` (max_steps; max_train_seconds when the
    question is compute)."""
    budgets = {arm: config.get(key) for arm, config in configs.items()}
    if len(set(map(json.dumps, budgets.values()))) > 1:
        raise ValueError(f"unequal budgets ({key}): {budgets}")


def code_version(root: str = ROOT) -> dict:
    """{"commit": HEAD's hash, "dirty": whether tracked files differ from it}; None values outside a git tree."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def run_dir(experiment_dir: str, arm: str, seed: int) -> str:
    """Where a run's kept files live: EXPERIMENT/runs/ARM/seed_SEED."""
    return os.path.join(experiment_dir, "runs", arm, f"seed_{seed}")


def keep_run(workdir: str, experiment_dir: str, arm: str, seed: int, command: str = "", files=RUN_FILES,
             **extra) -> str:
    """Copies a finished run's `files` (config.json, results.json and metrics.jsonl; paths relative to the
    workdir) from `workdir` to `run_dir` and writes provenance.json (arm, seed, command, code version, time,
    `extra`); returns that folder."""
    dest = run_dir(experiment_dir, arm, seed)
    os.makedirs(dest, exist_ok=True)
    for name in files:
        src = os.path.join(workdir, name)
        if not os.path.exists(src):
            raise FileNotFoundError(f"{src}: a kept run needs its {name} (did the run finish?)")
        os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
        shutil.copyfile(src, os.path.join(dest, name))
    provenance = {"arm": arm, "seed": seed, "command": command, **code_version(),
                  "kept_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}
    with open(os.path.join(dest, "provenance.json"), "w") as f:
        json.dump(provenance, f, indent=1)
    return dest


def kept_results(experiment_dir: str, arm: str, seed: int, command: str) -> dict | None:
    """The results.json of the run `keep_run` kept for (arm, seed), when it was made by `command`; None when
    none was kept. An experiment longer than a session goes on from the runs it kept, on any clone, without
    their workdirs. A run kept from another command is an error, not a silent reuse: the recipe changed."""
    path = run_dir(experiment_dir, arm, seed)
    if not os.path.exists(os.path.join(path, "results.json")):
        return None
    with open(os.path.join(path, "provenance.json")) as f:
        kept = json.load(f)["command"]
    if kept != command:
        raise ValueError(f"{path}: kept from another command (remove it to rerun):\n  kept: {kept}\n  now:  {command}")
    with open(os.path.join(path, "results.json")) as f:
        return {**json.load(f), "command": command}


def load_runs(experiment_dir: str) -> list[dict]:
    """Every kept run of an experiment: {"arm", "seed", "config", "results", "provenance", "metrics"}, sorted by
    arm and seed."""
    root = os.path.join(experiment_dir, "runs")
    runs = []
    for arm in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        for seed_dir in sorted(os.listdir(os.path.join(root, arm))):
            path = os.path.join(root, arm, seed_dir)
            with open(os.path.join(path, "provenance.json")) as f:
                provenance = json.load(f)
            with open(os.path.join(path, "config.json")) as f:
                config = json.load(f)
            with open(os.path.join(path, "results.json")) as f:
                results = json.load(f)
            metrics = []  # a kept sequence of stages has them per stage instead
            if os.path.exists(os.path.join(path, "metrics.jsonl")):
                with open(os.path.join(path, "metrics.jsonl")) as f:
                    metrics = [json.loads(line) for line in f if line.strip()]
            runs.append({"arm": arm, "seed": int(provenance["seed"]), "config": config, "results": results,
                         "provenance": provenance, "metrics": metrics})
    return sorted(runs, key=lambda r: (r["arm"], r["seed"]))


def write_results(experiment_dir: str, report, plot=None, plot_file: str = "") -> list[dict]:
    """RESULTS.md from `report(runs)` (and `plot(runs, path)` to `plot_file`) of an experiment's kept runs only;
    returns the runs. No kept run: SystemExit, nothing written."""
    runs = load_runs(experiment_dir)
    if not runs:
        raise SystemExit(f"no kept runs in {os.path.join(experiment_dir, 'runs')}: nothing to report")
    with open(os.path.join(experiment_dir, "RESULTS.md"), "w") as f:
        f.write(report(runs))
    if plot is not None:
        plot(runs, os.path.join(experiment_dir, plot_file))
    print(f"wrote {os.path.join(experiment_dir, 'RESULTS.md')}")
    return runs


def by_arm(runs: Iterable[dict], metric: str) -> dict[str, dict[int, float]]:
    """{arm: {seed: results[metric]}} of kept runs (runs without the metric left out)."""
    out: dict[str, dict[int, float]] = {}
    for r in runs:
        if metric in r["results"]:
            out.setdefault(r["arm"], {})[r["seed"]] = float(r["results"][metric])
    return out


def provenance_line(runs: Iterable[dict]) -> str:
    """One line for a RESULTS.md: the code versions the runs were made with, and whether any tree was dirty."""
    runs = list(runs)
    commits = sorted({(r["provenance"].get("commit") or "unknown")[:10] for r in runs})
    dirty = sum(bool(r["provenance"].get("dirty")) for r in runs)
    return (f"{len(runs)} runs, code version{'s' if len(commits) > 1 else ''} {', '.join(commits)}"
            + (f"; {dirty} made with uncommitted changes" if dirty else "; all from committed code"))


def decoder_line(runs: Iterable[dict]) -> str:
    """One line every decoder RESULTS.md carries: where the weights came from (a packaged GGUF is dequantised,
    so these are the 4-bit file's weights, not the original release's) and the WikiText-2 probe, read from the
    runs' configs. Runs that used different models or probes: ValueError (their perplexities are not one scale)."""
    from sft_jax.models.registry import SHORT_NAMES

    runs = list(runs)
    models = sorted({r["config"]["model"] for r in runs})
    probes = {tuple(r["config"]["forgetting"].get(k) for k in ("wikitext2_max_tokens", "wikitext2_max_length",
                                                                "wikitext2_stride")) for r in runs}
    if len(probes) != 1:
        raise ValueError(f"the runs used {len(probes)} different WikiText-2 probes {sorted(probes)}; "
                         "rerun them with configs.common.WIKITEXT2_PROBE")
    (tokens, length, stride), = probes
    origins = []
    for model in models:
        source = SHORT_NAMES.get(model)
        origins.append(f"{model} (weights dequantised from the packaged GGUF `{source.gguf_file}`)"
                       if source and source.gguf_file else model)
    extent = f"its first {tokens:,} tokens (the model's tokenizer)" if tokens else "all of it"
    return (f"Model: {', '.join(origins)}. WikiText-2 probe: the raw test split, {extent}, in windows of {length} "
            f"tokens with stride {stride}.")
