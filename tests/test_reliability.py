"""Reliability: SIGKILL and kill-during-save resume to the same result, SIGTERM checkpoints and exits 0,
non-finite steps are never applied (stop or skip), fresh runs are deterministic. Runs go through the CLI in
subprocesses, on the tiny BERT with dropout on (so the RNG must be restored too)."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import FAST_COMPILE_FLAG

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMING_KEYS = ("train/examples_per_s", "train/tokens_per_s", "train/wall_time_s")
STEPS, EVERY = 40, 8


def _comparable(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in TIMING_KEYS}


@pytest.fixture(scope="module")
def cli_config(make_tiny_config, tmp_path_factory) -> pathlib.Path:
    """A config file for `python -m sft_jax.main` holding the tiny BERT config (40 steps, checkpoint every 8)."""
    tmp = tmp_path_factory.mktemp("cli")
    c = make_tiny_config(tmp)
    c.max_steps, c.eval_every, c.checkpoint_every, c.log_every = STEPS, EVERY, EVERY, 1
    path = tmp / "tiny_config.py"
    path.write_text("import ml_collections\n\n\ndef get_config(arg=None):\n"
                    f"    return ml_collections.ConfigDict({c.to_dict()!r})\n")
    return path


def _cmd(config: pathlib.Path, workdir: pathlib.Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sft_jax.main", f"--config={config}", f"--workdir={workdir}", *extra]


def _env() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = FAST_COMPILE_FLAG  # one CPU device in the subprocesses
    return env


def _run(config, workdir, *extra) -> dict:
    subprocess.run(_cmd(config, workdir, *extra), cwd=REPO, env=_env(), check=True, capture_output=True)
    return json.loads((workdir / "results.json").read_text())


def _logged_step(workdir: pathlib.Path) -> int:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def _start_and_wait(config, workdir, min_step: int, *extra) -> subprocess.Popen:
    proc = subprocess.Popen(_cmd(config, workdir, *extra), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while _logged_step(workdir) < min_step:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.005)
    return proc


@pytest.fixture(scope="module")
def reference(cli_config, tmp_path_factory) -> dict:
    """The uninterrupted run's results.json."""
    return _run(cli_config, tmp_path_factory.mktemp("ref") / "run")


def test_same_config_and_seed_give_the_same_results(cli_config, reference, tmp_path):
    again = _run(cli_config, tmp_path / "run")
    assert _comparable(again) == _comparable(reference)


def test_resume_after_sigkill_is_bit_identical(cli_config, reference, tmp_path):
    workdir = tmp_path / "run"
    kill_at = int(np.random.default_rng().integers(EVERY + 1, STEPS - 5))  # after the first checkpoint
    proc = _start_and_wait(cli_config, workdir, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (workdir / "results.json").exists()
    resumed = _run(cli_config, workdir)
    assert resumed["params_fingerprint"] == reference["params_fingerprint"], f"killed at step >= {kill_at}"
    assert _comparable(resumed) == _comparable(reference)


def test_kill_during_a_save_keeps_the_previous_checkpoint(cli_config, reference, tmp_path):
    """The process dies while orbax is writing the step-16 checkpoint: step 8 stays the latest, resume works."""
    workdir = tmp_path / "run"
    script = ("import os, sys\n"
              "from sft_jax.checkpoint import Checkpoints\n"
              "save = Checkpoints.save_latest\n"
              "def dying_save(self, state, meta):\n"
              "    save(self, state, meta)  # starts the asynchronous write\n"
              "    if int(state.step) == 16:\n"
              "        os._exit(137)  # like SIGKILL: no cleanup, the write is cut short\n"
              "Checkpoints.save_latest = dying_save\n"
              "from sft_jax.main import run\n"
              f"sys.argv = {_cmd(cli_config, workdir)[2:]!r}\n"
              "sys.argv.insert(0, 'sft_jax.main')\n"
              "run()\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(), capture_output=True)
    assert proc.returncode == 137, proc.stderr.decode()[-2000:]
    from sft_jax.checkpoint import Checkpoints

    ckpt = Checkpoints(str(workdir))
    assert ckpt.latest.latest_step() in (8, 16)  # 16 only if the write happened to finish before the exit
    ckpt.close()
    resumed = _run(cli_config, workdir)
    assert resumed["params_fingerprint"] == reference["params_fingerprint"]


def test_kill_between_the_best_and_latest_saves_resumes(cli_config, reference, tmp_path):
    """The process dies after its first `best` checkpoint (step S) is written and before step S's `latest` one:
    the resumed run restarts from an earlier step (here: from scratch), reaches step S again and replaces the
    stale `best` step instead of failing with orbax's StepAlreadyExistsError. A SIGKILL while `latest` is
    still being written asynchronously (the random-kill test above) can leave a run in this state."""
    workdir = tmp_path / "run"
    script = ("import os, sys\n"
              "from sft_jax.checkpoint import Checkpoints\n"
              "save_best = Checkpoints.save_best\n"
              "def save_best_then_die(self, state, meta):\n"
              "    save_best(self, state, meta)\n"
              "    self.wait()  # the best write is complete; this step's latest one never starts\n"
              "    os._exit(137)\n"
              "Checkpoints.save_best = save_best_then_die\n"
              "from sft_jax.main import run\n"
              f"sys.argv = {_cmd(cli_config, workdir)[2:]!r}\n"
              "sys.argv.insert(0, 'sft_jax.main')\n"
              "run()\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(), capture_output=True)
    assert proc.returncode == 137, proc.stderr.decode()[-2000:]
    from sft_jax.checkpoint import Checkpoints

    ckpt = Checkpoints(str(workdir))
    assert ckpt.best.all_steps() == [EVERY] and ckpt.latest.latest_step() is None
    ckpt.close()
    resumed = _run(cli_config, workdir)
    assert resumed["params_fingerprint"] == reference["params_fingerprint"]
    assert _comparable(resumed) == _comparable(reference)


def test_sigterm_saves_a_checkpoint_and_exits_zero(cli_config, reference, tmp_path):
    workdir = tmp_path / "run"
    proc = _start_and_wait(cli_config, workdir, 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    from sft_jax.checkpoint import Checkpoints

    ckpt = Checkpoints(str(workdir))
    saved = ckpt.latest.latest_step()
    ckpt.close()
    if saved == STEPS:  # the run had already finished when the signal arrived
        pytest.skip("the run finished before SIGTERM arrived")
    assert b"stopped by SIGTERM" in out and saved >= 3
    assert _run(cli_config, workdir)["params_fingerprint"] == reference["params_fingerprint"]


def _poisoned(monkeypatch, at_step: int):
    """Makes the train step see a NaN loss mask/weights on call `at_step` (1-based)."""
    from sft_jax.trainer import setup

    real = setup.make_train_step

    def make(*args, **kwargs):
        fn = real(*args, **kwargs)
        calls = {"n": 0}

        def step(state, batch):
            calls["n"] += 1
            if calls["n"] == at_step:
                batch = dict(batch, weights=batch["weights"] * np.nan)
            return fn(state, batch)

        return step

    monkeypatch.setattr(setup, "make_train_step", make)


def test_nan_step_stops_the_run_without_saving_it(tiny_config, tmp_path, monkeypatch):
    from sft_jax.checkpoint import Checkpoints
    from sft_jax.train import train_and_evaluate
    from sft_jax.trainer.guards import TrainingDiverged

    tiny_config.max_steps, tiny_config.checkpoint_every, tiny_config.eval_every = 6, 2, 2
    _poisoned(monkeypatch, 3)
    with pytest.raises(TrainingDiverged, match="non-finite loss, gradient or update at step 3"):
        train_and_evaluate(tiny_config, str(tmp_path / "run"))
    ckpt = Checkpoints(str(tmp_path / "run"))
    step = ckpt.latest.latest_step()
    assert step in (2, 4)
    import jax

    params, _ = ckpt.restore_params({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in
                                     _tiny_params(tiny_config).items()}, "latest")
    ckpt.close()
    assert all(np.isfinite(np.asarray(v)).all() for v in params.values())


def _tiny_params(config):
    from sft_jax.tasks.text import TextClassifier

    return TextClassifier(config, 2).params


def test_nan_step_is_skipped_and_counted(tiny_config, tmp_path, monkeypatch):
    from sft_jax.train import train_and_evaluate

    tiny_config.nan_policy = "skip"
    _poisoned(monkeypatch, 2)
    results = train_and_evaluate(tiny_config, str(tmp_path / "run"))
    assert results["skipped_steps"] == 1 and np.isfinite(results["eval/loss"])


def test_train_step_never_applies_a_nonfinite_update(tiny_trainer):
    import jax

    t = tiny_trainer("full")
    batch = t.batch(["good film", "bad film"], [1, 0])
    batch["weights"] = batch["weights"] * np.nan
    before = {k: np.asarray(v) for k, v in t.state.params.items()}
    opt_before = jax.tree.map(np.asarray, t.state.opt_state)
    state, metrics = t.train_fn(t.state, batch)
    assert int(metrics["nonfinite"]) == 1 and int(state.step) == 1
    for k, v in state.params.items():
        np.testing.assert_array_equal(np.asarray(v), before[k])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.opt_state), opt_before)
    # The guard is one conditional around the optimizer update (only the taken branch runs), not a select
    # over every parameter and moment; a finite batch after the skipped one is applied.
    good = t.batch(["good film", "bad film"], [1, 0])
    assert "stablehlo.case" in t.train_fn.lower(state, good).as_text()
    state, metrics = t.train_fn(state, good)
    assert int(metrics["nonfinite"]) == 0 and int(state.step) == 2
    assert any(not np.array_equal(np.asarray(v), before[k]) for k, v in state.params.items())


def test_unwritable_workdir_fails_before_training(tiny_config, tmp_path):
    from sft_jax.train import train_and_evaluate

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="cannot write the workdir"):
        train_and_evaluate(tiny_config, str(blocker / "run"))


def test_resume_allows_compatible_and_refuses_incompatible_changes(tiny_config, tmp_path):
    from sft_jax.train import train_and_evaluate

    workdir = str(tmp_path / "run")
    tiny_config.max_steps, tiny_config.eval_every, tiny_config.checkpoint_every = 2, 2, 2
    assert train_and_evaluate(tiny_config, workdir)["step"] == 2
    tiny_config.max_steps, tiny_config.eval_every = 4, 1  # more steps, other eval frequency: fine
    assert train_and_evaluate(tiny_config, workdir)["step"] == 4
    tiny_config.strategy = "head"
    with pytest.raises(ValueError, match=r"config changed incompatibly \(strategy: 'full' -> 'head'\)"):
        train_and_evaluate(tiny_config, workdir)
