"""Paired forks: config.keep_checkpoints_at keeps whole train states of chosen steps for good, and
config.fork_from="WORKDIR@STEP" starts a new run from one; with nothing changed the fork continues bit-identically
to its parent's later checkpoints, with a change it departs from the shared prefix; bad forks are one line."""

from __future__ import annotations

import json

import pytest

from sft_jax import tasks
from sft_jax.checkpoint import Checkpoints
from sft_jax.config_defaults import validate
from sft_jax.rundir import RunDir
from sft_jax.state import params_fingerprint
from sft_jax.train import train_and_evaluate
from sft_jax.trainer import setup


@pytest.fixture(scope="module")
def parent(make_tiny_config, tmp_path_factory):
    """A 6-step run keeping steps 2 and 4 (latest/ holds 6)."""
    tmp = tmp_path_factory.mktemp("fork")
    config = make_tiny_config(tmp)
    config.max_steps, config.eval_every, config.checkpoint_every = 6, 3, 6
    config.keep_checkpoints_at = (2, 4)
    workdir = tmp / "parent"
    return config, workdir, train_and_evaluate(config, str(workdir))


def _kept_fingerprint(config, workdir, step, tmp_path):
    """The parameters' fingerprint of `workdir`'s kept step, restored as a run of `config` would."""
    (tmp_path / "probe").mkdir(exist_ok=True)
    task = tasks.get(config.task)(config, RunDir(str(tmp_path / "probe")))
    target = setup.prepare(config, task, Checkpoints(str(tmp_path / "probe_ckpt")), str(tmp_path / "probe")).state
    checkpoints = Checkpoints(str(workdir))
    state, _ = checkpoints.restore_step(target, step)
    checkpoints.close()
    return params_fingerprint(state.params)


def test_kept_steps_stay_and_an_unchanged_fork_continues_bit_identically(parent, tmp_path):
    config, workdir, results = parent
    assert Checkpoints(str(workdir)).steps("kept") == [2, 4]  # beside latest/'s 6: none removed
    fork = config.copy_and_resolve_references()
    fork.keep_checkpoints_at = (4,)
    fork.fork_from = f"{workdir}@2"
    fork_dir = tmp_path / "fork"
    forked = train_and_evaluate(fork, str(fork_dir))
    assert forked["forked_from"] == f"{workdir}@2" and forked["step"] == 6
    assert forked["params_fingerprint"] == results["params_fingerprint"]  # step 6, as the parent
    assert _kept_fingerprint(config, fork_dir, 4, tmp_path) == _kept_fingerprint(config, workdir, 4, tmp_path)
    train_lines = [json.loads(line) for line in (fork_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in train_lines if "train/loss" in m] == [3, 4, 5, 6]  # from the fork point on


def test_a_changed_fork_departs_from_the_shared_prefix(parent, tmp_path):
    config, workdir, results = parent
    fork = config.copy_and_resolve_references()
    fork.fork_from, fork.learning_rate = f"{workdir}@4", config.learning_rate * 10
    forked = train_and_evaluate(fork, str(tmp_path / "fork"))
    assert forked["step"] == 6 and forked["params_fingerprint"] != results["params_fingerprint"]


def test_bad_forks_are_one_line(parent, tmp_path, tiny_config):
    _, workdir, _ = parent
    tiny_config.fork_from = f"{workdir}@3"
    with pytest.raises(ValueError, match=r"config.fork_from: .*: no checkpoint of step 3 \(kept: \[2, 4\]; "
                                         r"latest: \[6\]\)"):
        train_and_evaluate(tiny_config, str(tmp_path / "fork"))
    assert not (tmp_path / "fork").exists()  # a run failing in set-up leaves nothing behind
    for spec in ("nowhere", f"{workdir}@0", f"{workdir}@x"):
        tiny_config.fork_from = spec
        with pytest.raises(ValueError, match=r"config.fork_from: expected WORKDIR@STEP"):
            validate(tiny_config)
    tiny_config.fork_from = f"{tmp_path}/missing@2"
    with pytest.raises(ValueError, match=r"config.fork_from: .*/missing: no such workdir"):
        train_and_evaluate(tiny_config, str(tmp_path / "fork2"))
    tiny_config.fork_from, tiny_config.keep_checkpoints_at = "", (0,)
    with pytest.raises(ValueError, match=r"config.keep_checkpoints_at: expected steps >= 1"):
        validate(tiny_config)


def test_fork_experiment_pairs_settings_fork_by_fork(parent, tmp_path):
    """experiments/forks.py: fork 0 of an empty setting is the parent's continuation; the paired differences
    are those of the forks' own results, with a t- and a bootstrap interval."""
    from experiments import forks

    config, workdir, results = parent
    out = tmp_path / "forks"
    settings = {"same": {}, "faster": {"learning_rate": config.learning_rate * 10}}
    table = forks.run_forks(str(workdir), 4, settings, k=2, out=str(out), metric="eval/loss")
    fork0 = json.loads((out / "same" / "fork_0" / "results.json").read_text())
    assert fork0["params_fingerprint"] == results["params_fingerprint"]
    own = {name: [json.loads((out / name / f"fork_{i}" / "results.json").read_text())["eval/loss"] for i in (0, 1)]
           for name in settings}
    assert table["scores"] == own and own["same"][0] != own["same"][1]  # fork 1 draws other batches
    diffs = [own["faster"][i] - own["same"][i] for i in (0, 1)]
    paired = table["paired"]["faster"]
    assert paired["mean"] == pytest.approx(sum(diffs) / 2)
    assert (paired["bootstrap_low"], paired["bootstrap_high"]) == pytest.approx((min(diffs), max(diffs)))
    assert paired["low"] < paired["mean"] < paired["high"]
    assert json.loads((out / "forks.json").read_text())["paired"] == table["paired"]
    assert "| faster |" in (out / "FORKS.md").read_text()
    again = forks.run_forks(str(workdir), 4, settings, k=2, out=str(out), metric="eval/loss",
                            train=lambda *a: pytest.fail("a finished fork is trained again"))
    assert again["scores"] == table["scores"]
    with pytest.raises(ValueError, match="setting key 'learning_rat'"):
        forks.run_forks(str(workdir), 4, {"typo": {"learning_rat": 1.0}}, k=2, out=str(tmp_path / "bad"),
                        metric="eval/loss")
