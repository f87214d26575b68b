"""A task the package does not know, written against the Task contract only (a toy regression), trains
through `train_and_evaluate` with no change to the loop: checkpoints, early stopping, resume and results."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import resumed_after_crash
from flax import nnx

from sft_jax import tasks
from sft_jax.config_defaults import defaults
from sft_jax.models.layout import ParamLayout
from sft_jax.state import ModelDef
from sft_jax.train import train_and_evaluate

TRUE_WEIGHTS = np.linspace(-1.0, 1.0, 8).astype(np.float32)


class Regressor(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs)])
        self.head = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        return self.head(self.layers[0](x))[:, 0]


def mse_loss(model, batch, rng):
    err = (model(batch["x"]) - batch["y"]) * batch["weights"]
    count = jnp.sum(batch["weights"])
    return jnp.sum(err**2) / jnp.maximum(count, 1.0), {"loss_sum": jnp.sum(err**2), "count": count}


class Batches:
    """Rows drawn by (seed, step): any step's batch is the same in a resumed run."""

    def __init__(self, seed: int, size: int):
        self.seed, self.size = seed, size

    def batch(self, step: int) -> dict[str, np.ndarray]:
        return make_rows(np.random.default_rng([self.seed, step]), self.size)


def make_rows(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    x = rng.normal(size=(n, 8)).astype(np.float32)
    return {"x": x, "y": x @ TRUE_WEIGHTS, "weights": np.ones(n, np.float32)}


@tasks.register("toy_regression")
class ToyRegression(tasks.Task):
    """y = <w, x> from synthetic rows; the whole model is new, so there is nothing to forget."""

    @classmethod
    def metric_names(cls, config):
        return ("eval/loss",)

    def __init__(self, config, rundir):
        self.config = config
        self.model_def, self.params = ModelDef.split(Regressor(nnx.Rngs(config.seed)))
        self.layout = ParamLayout(embeddings="^$", layer="layers/{i}/", head="head/", num_layers=1)
        self.loss_fn = mse_loss
        self.batches = Batches(config.seed, config.batch_size)
        self.eval_rows = make_rows(np.random.default_rng(1234), 64)
        self.summary = {"eval_examples": 64}

    def evaluate(self, eval_fn, params, step=None):
        aux = jax.device_get(eval_fn(params, self.eval_rows))
        return {"eval/loss": float(aux["loss_sum"]) / float(aux["count"])}

    def train_metrics(self, sums):
        return {}


def _config(tmp_path):
    c = defaults()
    c.task, c.model, c.strategy = "toy_regression", "none", "full"
    c.data.train = c.data.eval = "synthetic"
    c.batch_size, c.learning_rate, c.warmup_steps, c.max_steps = 16, 0.05, 0, 12
    c.eval_every = c.checkpoint_every = 4
    c.early_stopping.metric, c.early_stopping.mode = "eval/loss", "min"
    c.forgetting.wikitext2 = ""
    return c


def test_new_task_trains_through_the_loop(tmp_path, monkeypatch):
    config = _config(tmp_path)
    results = train_and_evaluate(config, str(tmp_path / "run"))
    assert results["step"] == 12 and results["best_step"] == 12
    assert results["trainable_params"] == results["total_params"] == 8 * 8 + 8 + 8 + 1
    fresh = ToyRegression(config, None)
    before = float(mse_loss(fresh.model_def.merge(fresh.params), fresh.eval_rows, None)[0])
    assert results["eval/loss"] < 0.5 * before
    # A run killed after its step-4 checkpoint resumes to the uninterrupted run's parameters, bit for bit.
    resumed = resumed_after_crash(config, tmp_path / "cut", monkeypatch, 4)
    assert resumed["params_fingerprint"] == results["params_fingerprint"]


def test_options_the_task_does_not_read_are_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(ToyRegression, "__init__", lambda *a: pytest.fail("the task was built"))
    config = _config(tmp_path)
    config.regularizer.ewc, config.regularizer.fisher_data = 1.0, "x.txt"
    with pytest.raises(ValueError, match="config.regularizer.ewc: task 'toy_regression' has no Fisher objective"):
        train_and_evaluate(config, str(tmp_path / "a"))
    config = _config(tmp_path)
    config.forgetting.images = "probe.jsonl"
    with pytest.raises(ValueError, match="config.forgetting.images: the image forgetting probe needs "
                                         "task='image_classification'"):
        train_and_evaluate(config, str(tmp_path / "b"))
    config = _config(tmp_path)
    config.strategy = "lora"
    with pytest.raises(ValueError, match="config.strategy: lora is not supported by task 'toy_regression'"):
        train_and_evaluate(config, str(tmp_path / "c"))
    config = _config(tmp_path)
    config.early_stopping.metric = "eval/accuracy"
    with pytest.raises(ValueError, match=r"config.early_stopping.metric: 'eval/accuracy' is not one of"):
        train_and_evaluate(config, str(tmp_path / "d"))


def test_registering_a_second_class_under_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        tasks.register("toy_regression")(type("Other", (ToyRegression,), {}))
    with pytest.raises(TypeError, match="not a subclass"):
        tasks.register("plain")(object)
