"""experiments/rerun.py: a kept run rerun from its recorded command lands on the kept result (same seed, CPU:
bit-identical parameters) and inside the arm's interval; a result outside the interval fails; commands it cannot
rerun here are refused with one line naming why."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from conftest import FAST_COMPILE_FLAG

from experiments import protocol, rerun

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kept_experiment(make_tiny_config, tmp_path_factory) -> pathlib.Path:
    """An experiment folder with arm "full" kept at seeds 0-2: seed 0 is a real tiny run made from its command;
    seeds 1 and 2 are copies whose eval/accuracy is moved to either side, so the arm has an interval."""
    tmp = tmp_path_factory.mktemp("rerun")
    c = make_tiny_config(tmp)
    config = tmp / "tiny_config.py"
    config.write_text("import ml_collections\n\n\ndef get_config(arg=None):\n"
                      f"    return ml_collections.ConfigDict({c.to_dict()!r})\n")
    experiment, workdir = tmp / "experiment", tmp / "experiment" / "workdirs" / "full_s0"
    cmd = ["-m", "sft_jax.main", f"--config={config}", f"--workdir={workdir}", "--config.seed=0"]
    subprocess.run([sys.executable, *cmd], cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "XLA_FLAGS": FAST_COMPILE_FLAG})
    protocol.keep_run(str(workdir), str(experiment), "full", 0, command="python " + " ".join(cmd))
    accuracy = json.loads((workdir / "results.json").read_text())["eval/accuracy"]
    for seed, shift in ((1, -0.1), (2, 0.1)):
        dest = pathlib.Path(protocol.keep_run(str(workdir), str(experiment), "full", seed, command="unused"))
        results = json.loads((dest / "results.json").read_text())
        results["eval/accuracy"] = accuracy + shift
        (dest / "results.json").write_text(json.dumps(results))
    return experiment


def test_rerun_of_a_kept_seed_reproduces_it_and_lands_inside(kept_experiment, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE_FLAG)
    code = rerun.main([str(kept_experiment), "full", "0", f"--workdir={tmp_path / 'again'}"])
    out = capsys.readouterr().out
    assert code == 0, out
    kept = json.loads((kept_experiment / "runs/full/seed_0/results.json").read_text())
    again = json.loads((tmp_path / "again/results.json").read_text())
    assert again["eval/accuracy"] == kept["eval/accuracy"]
    assert "final parameters' fingerprint: identical" in out
    assert "| eval/accuracy |" in out and "| yes |" in out


def test_a_value_outside_the_interval_fails(kept_experiment):
    """The arm's interval decides: the real value against the kept arm passes, against the arm moved up by 0.5
    (an interval that excludes it) fails."""
    arm = [r for r in protocol.load_runs(str(kept_experiment)) if r["arm"] == "full"]
    real = arm[0]["results"]["eval/accuracy"]
    shifted = [{**r, "results": {**r["results"], "eval/accuracy": r["results"]["eval/accuracy"] + 0.5}}
               for r in arm]
    rows, inside = rerun.compare(shifted[0], {"eval/accuracy": real}, shifted, ["eval/accuracy"])
    assert not inside and rows[0][-1] == "**no**"
    rows, inside = rerun.compare(arm[0], {"eval/accuracy": real}, arm, ["eval/accuracy"])
    assert inside and rows[0][-1] == "yes"


def test_commands_it_cannot_rerun_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="is not `python -m sft_jax.main"):
        rerun.rerun_command("python -m experiments.sst2_strategies.peer_torch --seed=0", str(tmp_path))
    missing = "experiments/nowhere/workdirs/base"
    with pytest.raises(SystemExit, match=f"reads {missing}, which is not here"):
        rerun.rerun_command(f"python -m sft_jax.main --config=c.py --workdir=w --config.model={missing}",
                            str(tmp_path))
    cmd = rerun.rerun_command("python -m sft_jax.main --config=c.py --workdir=old --config.seed=3", "/new")
    assert cmd[1:] == ["-m", "sft_jax.main", "--config=c.py", "--workdir=/new", "--config.seed=3"]


def test_unknown_arm_or_seed_is_one_line(kept_experiment):
    with pytest.raises(SystemExit, match="no kept runs of arm 'partial'"):
        rerun.main([str(kept_experiment), "partial", "0"])
    with pytest.raises(SystemExit, match=r"has no kept seed 7 \(kept: \[0, 1, 2\]\)"):
        rerun.main([str(kept_experiment), "full", "7"])
