"""Nothing non-finite is ever applied, saved, kept as best or reported: non-finite hyper-parameters are refused
up front; a step whose update (parameters or optimizer state) would be non-finite is not applied even when its
loss and gradient are finite; nan_policy=stop names a checkpoint from before the bad step; nan_policy=skip
cannot end in a run that claims success without a finite model."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# A finite float32 learning rate whose AdamW update overflows: lr * (1 + weight_decay * |p|) > float32 max.
HUGE_LR = float(np.finfo(np.float32).max)


@pytest.mark.parametrize("key, value", [("learning_rate", float("nan")), ("learning_rate", float("inf")),
                                        ("weight_decay", float("nan")), ("clip_norm", float("inf")),
                                        ("learning_rate", 1e39), ("lp_ft.head_learning_rate", float("nan")),
                                        ("regularizer.l2sp", float("nan")), ("wise_ft.alphas", (0.5, float("nan")))])
def test_non_finite_hyper_parameters_are_refused(tiny_config, key, value):
    from sft_jax.config_defaults import validate

    tiny_config.update_from_flattened_dict({key: value})
    with pytest.raises(ValueError, match=rf"^config\.{key}: must be a finite number") as e:
        validate(tiny_config)
    assert "\n" not in str(e.value)


def test_nan_learning_rate_is_one_line_on_the_command_line(tiny_config, tmp_path):
    config = tmp_path / "config.py"
    config.write_text("import ml_collections\n\n\ndef get_config(arg=None):\n"
                      f"    return ml_collections.ConfigDict({tiny_config.to_dict()!r})\n")
    proc = subprocess.run([sys.executable, "-m", "sft_jax.main", f"--config={config}", f"--workdir={tmp_path / 'run'}",
                           "--config.learning_rate=nan"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]
    assert lines == ["error: config.learning_rate: must be a finite number, got nan"], proc.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def _poison_state_transform():
    """An optimizer stage that passes updates through but writes inf into its own state: the loss, gradient and
    updated parameters are finite, only the optimizer state is not."""
    import jax.numpy as jnp
    import optax

    return optax.GradientTransformation(lambda params: {"acc": jnp.zeros((), jnp.float32)},
                                        lambda updates, state, params=None: (updates, {"acc": state["acc"] + jnp.inf}))


@pytest.mark.parametrize("poison", ["huge_learning_rate", "optimizer_state"])
def test_a_step_with_a_non_finite_update_is_not_applied(tiny_trainer, poison):
    import jax
    import optax

    from sft_jax import optim, strategies

    if poison == "huge_learning_rate":
        t = tiny_trainer("full", learning_rate=HUGE_LR)
    else:
        t = tiny_trainer("full", make_tx=lambda labels, layout: optax.chain(
            strategies.partition(labels, optim.adamw(optax.constant_schedule(1e-3))), _poison_state_transform()))
    batch = t.batch(["good film", "bad film"], [1, 0])
    before = {k: np.array(v) for k, v in t.state.params.items()}
    opt_before = jax.tree.map(np.array, t.state.opt_state)
    state, metrics = t.train_fn(t.state, batch)
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert int(metrics["nonfinite"]) == 1 and int(state.step) == 1
    for k, v in state.params.items():
        np.testing.assert_array_equal(np.asarray(v), before[k])  # bit-identical: the update was not applied
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.opt_state), opt_before)


def _poison_updates_from(monkeypatch, first_bad: int) -> None:
    """Training runs whose optimizer makes every update from the `first_bad`-th applied one on infinite (the
    loss and gradient stay finite)."""
    import jax
    import jax.numpy as jnp
    import optax

    from sft_jax.trainer import setup

    real = setup.make_optimizer

    def poisoned():
        def update(updates, state, params=None):
            scale = jnp.where(state["n"] >= first_bad - 1, jnp.inf, 1.0)
            return jax.tree.map(lambda u: u * scale, updates), {"n": state["n"] + 1}

        return optax.GradientTransformation(lambda params: {"n": jnp.zeros((), jnp.int32)}, update)

    monkeypatch.setattr(setup, "make_optimizer", lambda *a, **k: (lambda tx, *rest: (
        optax.chain(tx, poisoned()), *rest))(*real(*a, **k)))


def _finite_checkpoint(workdir: pathlib.Path, config, which: str) -> int:
    """The step of the `which` checkpoint, once its parameters are checked finite."""
    import jax

    from sft_jax.checkpoint import Checkpoints
    from sft_jax.tasks.text import TextClassifier

    ckpt = Checkpoints(str(workdir))
    try:
        target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in TextClassifier(config, 2).params.items()}
        manager = ckpt.latest if which == "latest" else ckpt.best
        step = manager.latest_step()
        params, _ = ckpt.restore_params(target, which)
    finally:
        ckpt.close()
    assert all(np.isfinite(np.asarray(v)).all() for v in params.values())
    return step


def test_stop_saves_nothing_after_the_bad_step_and_names_the_good_checkpoint(tiny_config, tmp_path, monkeypatch):
    from sft_jax.train import train_and_evaluate
    from sft_jax.trainer.guards import TrainingDiverged

    # Flags are checked at logging and at every save: step 3's flag is first read before step 4's save.
    tiny_config.max_steps, tiny_config.checkpoint_every, tiny_config.eval_every, tiny_config.log_every = 6, 2, 6, 5
    _poison_updates_from(monkeypatch, 3)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss, gradient or update at step 3 .*: not applied, "
                                               r"and the latest checkpoint, step 2, is from before it"):
        train_and_evaluate(tiny_config, str(tmp_path / "run"))
    assert _finite_checkpoint(tmp_path / "run", tiny_config, "latest") == 2


def test_stop_before_any_checkpoint_says_none_was_saved(tiny_config, tmp_path):
    from sft_jax.train import train_and_evaluate
    from sft_jax.trainer.guards import TrainingDiverged

    tiny_config.learning_rate = HUGE_LR
    with pytest.raises(TrainingDiverged, match="update at step 1 .*no checkpoint was saved before it"):
        train_and_evaluate(tiny_config, str(tmp_path / "run"))


def test_skip_with_every_step_skipped_is_an_error_not_a_result(tiny_config, tmp_path):
    from sft_jax.train import train_and_evaluate
    from sft_jax.trainer.guards import TrainingDiverged

    tiny_config.learning_rate, tiny_config.nan_policy = HUGE_LR, "skip"
    with pytest.raises(TrainingDiverged, match="all 4 steps had a non-finite loss, gradient or update"):
        train_and_evaluate(tiny_config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "results.json").exists()
    assert _finite_checkpoint(tmp_path / "run", tiny_config, "latest") == 4  # the untouched, finite state
    assert _finite_checkpoint(tmp_path / "run", tiny_config, "best") is not None


def _nan_metric_at(monkeypatch, bad_evals: set[int]) -> None:
    """The early-stopping metric (eval/accuracy) of the evaluations at `bad_evals` steps reads nan."""
    from sft_jax.tasks.text import TextClassification

    real = TextClassification.evaluate

    def evaluate(self, eval_fn, params, step):
        ev = real(self, eval_fn, params, step)
        return {**ev, "eval/accuracy": float("nan")} if step in bad_evals else ev

    monkeypatch.setattr(TextClassification, "evaluate", evaluate)


def test_a_non_finite_evaluation_is_never_best(tiny_config, tmp_path, monkeypatch):
    from sft_jax.train import train_and_evaluate

    tiny_config.nan_policy = "skip"
    _nan_metric_at(monkeypatch, {2})
    results = train_and_evaluate(tiny_config, str(tmp_path / "run"))
    assert results["best_step"] == 4 and np.isfinite(results["eval/accuracy"])


def test_skip_without_a_finite_evaluation_is_an_error(tiny_config, tmp_path, monkeypatch):
    from sft_jax.train import train_and_evaluate
    from sft_jax.trainer.guards import TrainingDiverged

    tiny_config.nan_policy = "skip"
    _nan_metric_at(monkeypatch, {2, 4})
    with pytest.raises(TrainingDiverged, match="no evaluation gave a finite eval/accuracy"):
        train_and_evaluate(tiny_config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_non_finite_final_result_is_an_error(tiny_config, tmp_path, monkeypatch):
    from sft_jax.tasks.text import TextClassification
    from sft_jax.train import train_and_evaluate
    from sft_jax.trainer.guards import TrainingDiverged

    real = TextClassification.evaluate
    monkeypatch.setattr(TextClassification, "evaluate", lambda self, *a: {**real(self, *a), "eval/loss": float("inf")})
    with pytest.raises(TrainingDiverged, match=r"evaluates to non-finite eval/loss=inf; no results written"):
        train_and_evaluate(tiny_config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_non_finite_state_is_never_saved(tiny_config, tmp_path, monkeypatch):
    """A pre-trained weight that is already nan: no step changes it (all are skipped), and no save writes it."""
    from sft_jax.tasks.text import TextClassifier
    from sft_jax.train import train_and_evaluate
    from sft_jax.trainer.guards import TrainingDiverged

    real = TextClassifier.__init__

    def init(self, *a, **k):
        real(self, *a, **k)
        name = next(iter(self.params))
        self.params = {**self.params, name: np.asarray(self.params[name]) * np.nan}

    monkeypatch.setattr(TextClassifier, "__init__", init)
    tiny_config.nan_policy = "skip"
    with pytest.raises(TrainingDiverged, match="hold nan or inf values that no training step wrote"):
        train_and_evaluate(tiny_config, str(tmp_path / "run"))
    from sft_jax.checkpoint import Checkpoints

    ckpt = Checkpoints(str(tmp_path / "run"))
    assert ckpt.latest.latest_step() is None and ckpt.best.latest_step() is None
    ckpt.close()
