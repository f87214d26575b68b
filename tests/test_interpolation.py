"""Interpolation sweeps (python -m sft_jax.interpolation): the ends of a sweep are the runs themselves (alpha 1
scores as the run's best checkpoint, alpha 0 between two runs as the other's), the loss barrier is the rise
above the straight line, and the command writes its JSON and plot; mismatched runs are one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sft_jax import interpolation
from sft_jax.train import train_and_evaluate


@pytest.fixture(scope="module")
def two_runs(make_tiny_config, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interp")
    out = []
    for seed in (0, 1):
        config = make_tiny_config(tmp)
        config.seed, config.max_steps, config.eval_every, config.checkpoint_every = seed, 4, 4, 4
        workdir = tmp / f"seed{seed}"
        out.append((workdir, train_and_evaluate(config, str(workdir))))
    return out


def test_sweep_ends_are_the_runs_and_the_barrier_is_above_the_line(two_runs):
    (a, results_a), (b, results_b) = two_runs
    between = interpolation.sweep(str(a), [0.0, 0.5, 1.0], other=str(b))
    ends = {p["alpha"]: p for p in between["points"]}
    for key in ("eval/accuracy", "eval/loss"):
        assert ends[1.0][key] == pytest.approx(results_a[key], rel=1e-6)
        assert ends[0.0][key] == pytest.approx(results_b[key], rel=1e-6)
    line = 0.5 * ends[0.0]["eval/loss"] + 0.5 * ends[1.0]["eval/loss"]
    assert between["loss_barrier"] == pytest.approx(max(0.0, ends[0.5]["eval/loss"] - line))
    from_base = interpolation.sweep(str(a), [0.0, 1.0])
    assert from_base["from"] == "pre-trained"
    assert from_base["points"][1]["eval/loss"] == pytest.approx(results_a["eval/loss"], rel=1e-6)
    assert from_base["points"][0]["eval/loss"] != pytest.approx(results_a["eval/loss"], rel=1e-6)


def test_loss_barrier_needs_both_ends():
    points = [{"alpha": 0.0, "eval/loss": 1.0}, {"alpha": 0.5, "eval/loss": 2.0}, {"alpha": 1.0, "eval/loss": 0.0}]
    assert interpolation.loss_barrier(points) == pytest.approx(1.5)
    assert interpolation.loss_barrier(points[:2]) is None


def test_command_writes_json_and_plot_and_refuses_mismatched_runs(two_runs, tmp_path):
    (a, _), (b, _) = two_runs
    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "sft_jax.interpolation", f"--workdir={a}", f"--other={b}",
                           "--alphas=0,1", f"--out={out}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"{out}.json"
    assert [p["alpha"] for p in json.loads((tmp_path / "sweep.json").read_text())["points"]] == [0.0, 1.0]
    assert (tmp_path / "sweep.png").stat().st_size > 0
    config = json.loads((b / "config.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, "strategy": "head"}))
    with pytest.raises(ValueError, match=r"its strategy is 'head', this run's 'full'"):
        interpolation.sweep(str(a), [0.0, 1.0], other=str(other))
