"""config.data.validation_fraction: selection (evaluations, early stopping, the best checkpoint) happens on examples
carved from train, never on data.eval, which is evaluated once, on the selected checkpoint, as test/...: the
carving is deterministic and disjoint, and test/... is exactly the best checkpoint's metrics on data.eval."""

from __future__ import annotations

import json

import pytest
from conftest import lm_config

from sft_jax import tasks
from sft_jax.config_defaults import validate
from sft_jax.data.batching import carve_validation
from sft_jax.data.errors import DataError
from sft_jax.rundir import RunDir
from sft_jax.train import train_and_evaluate
from sft_jax.train_step import make_eval_step


def test_carving_is_deterministic_disjoint_and_ordered():
    records = list(range(40))
    train, held = carve_validation(records, 0.25, seed=3)
    assert len(held) == 10 and sorted(train + held) == records
    assert train == sorted(train) and held == sorted(held)  # each in the original order
    assert carve_validation(records, 0.25, seed=3) == (train, held)
    assert carve_validation(records, 0.25, seed=4)[1] != held
    assert carve_validation(records, 0.0, seed=3) == (records, [])
    assert len(carve_validation(records, 0.001, seed=0)[1]) == 1  # at least one
    with pytest.raises(DataError, match=r"validation_fraction=0.99: 40 of 40 training examples held out"):
        carve_validation(records, 0.99, seed=0)


def test_selection_on_validation_and_the_reported_split_evaluated_once(make_tiny_config, tmp_path):
    config = make_tiny_config(tmp_path)
    config.data.validation_fraction = 0.25
    workdir = tmp_path / "run"
    results = train_and_evaluate(config, str(workdir))
    assert (results["train_examples"], results["eval_examples"], results["test_examples"]) == (48, 16, 16)
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert not any(k.startswith("test/") for m in lines for k in m)  # never seen during training

    # The same carving again, and the best checkpoint evaluated on data.eval: test/... exactly.
    (tmp_path / "fresh").mkdir()
    task = tasks.get(config.task)(config, RunDir(str(tmp_path / "fresh")))
    assert all(w.startswith(config.data.train) for w in task.eval_ds.where)  # validation rows come from train
    assert set(task.eval_ds.where).isdisjoint(task.train_ds.where)
    assert all(w.startswith(config.data.eval) for w in task.test_data["eval_ds"].where)
    best = RunDir(str(workdir)).restore_params(task.params, "best")
    reported = task.evaluate_reported(make_eval_step(task.model_def, task.loss_fn), best)
    assert set(reported) == {"test/accuracy", "test/f1", "test/loss"}
    for key, value in reported.items():
        assert results[key] == pytest.approx(value, rel=1e-6)
    assert task.eval_ds.where[0].startswith(config.data.train)  # evaluate_reported put the validation set back


def test_language_model_documents_select_on_held_out_documents(tiny_llama_dir, tmp_path):
    config = lm_config(tiny_llama_dir, tmp_path, "full")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"document {i} says {'word ' * (i % 5)}"}) + "\n"
                             for i in range(20)))
    config.data.train, config.data.eval = str(jsonl), str(jsonl)
    config.data.validation_fraction = 0.2
    results = train_and_evaluate(config, str(tmp_path / "run"))
    assert {"test/loss", "test/perplexity", "test/accuracy"} <= set(results)
    assert results["eval_examples"] < results["test_examples"]  # 4 held-out documents' blocks, against all 20


@pytest.mark.parametrize("changes, message", [
    ({"validation_fraction": 1.0}, r"config.data.validation_fraction: must be in \[0, 1\), got 1.0"),
    ({"validation_fraction": -0.1}, r"config.data.validation_fraction: must be in \[0, 1\)"),
    ({"validation_fraction": 0.1, "streaming": True}, r"config.data.validation_fraction: not with data.streaming"),
])
def test_bad_validation_options_are_one_line(tiny_config, changes, message):
    for key, value in changes.items():
        tiny_config.data[key] = value
    with pytest.raises(ValueError, match=message):
        validate(tiny_config)
