"""config.drift.params: how far each block moved from the pre-trained weights. The metrics are the definitions
(relative Frobenius change, effective rank and top share of the change's spectrum), a LoRA change is its
adapters' product, frozen blocks read exactly 0, and a run logs them at evaluations and for its best checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sft_jax import drift, tasks
from sft_jax.models.layout import ParamLayout
from sft_jax.rundir import RunDir
from sft_jax.train import train_and_evaluate

LAYOUT = ParamLayout(embeddings=r"embed/", layer=r"layers/{i}/", head=r"head/", num_layers=2, fresh=r"head/")


def test_metrics_follow_their_definitions():
    rng = np.random.default_rng(0)
    w0, w1, emb = rng.standard_normal((6, 4)), rng.standard_normal((6, 4)), rng.standard_normal((10, 4))
    u, v = rng.standard_normal((6, 1)), rng.standard_normal((1, 4))
    before = {"embed/table": emb, "layers/0/w": w0, "layers/1/w": w1, "head/w": np.zeros((4, 2))}
    after = {"embed/table": emb, "layers/0/w": w0 + u @ v, "layers/1/w": w1 + rng.standard_normal((6, 4)),
             "head/w": np.ones((4, 2))}
    m = drift.param_drift(before, after, LAYOUT)
    assert m["drift/relative_change/embeddings"] == 0.0
    assert m["drift/relative_change/block_0"] == pytest.approx(np.linalg.norm(u @ v) / np.linalg.norm(w0), rel=1e-5)
    assert m["drift/effective_rank/block_0"] == pytest.approx(1.0, abs=1e-4)  # a rank-one change
    assert m["drift/top_share/block_0"] == pytest.approx(1.0, abs=1e-5)
    assert 1.5 < m["drift/effective_rank/block_1"] <= 4.0  # a dense change spreads
    whole = np.sqrt(np.linalg.norm(u @ v) ** 2 + np.linalg.norm(after["layers/1/w"] - w1) ** 2)
    assert m["drift/relative_change/all"] == pytest.approx(
        whole / np.sqrt(sum(np.linalg.norm(x) ** 2 for x in (emb, w0, w1))), rel=1e-5)
    assert not any("head" in k for k in m)  # a fresh head has no pre-trained value


def test_a_lora_change_is_the_adapters_product():
    rng = np.random.default_rng(1)
    kernel = rng.standard_normal((8, 5))
    a, b = rng.standard_normal((8, 2)), rng.standard_normal((2, 5))
    deltas = drift.changes({"layers/0/q/kernel": kernel}, {"layers/0/q/kernel": kernel, "layers/0/q/lora_a": a,
                                                          "layers/0/q/lora_b": b}, lora_scale=4.0)
    np.testing.assert_allclose(deltas["layers/0/q/kernel"], a @ b * 4.0, rtol=1e-5)
    m = drift.param_drift({"layers/0/q/kernel": kernel},
                          {"layers/0/q/kernel": kernel, "layers/0/q/lora_a": a, "layers/0/q/lora_b": b}, LAYOUT, 4.0)
    assert m["drift/effective_rank/block_0"] <= 2.0 + 1e-6  # at most the adapters' rank


def test_a_run_logs_drift_and_frozen_blocks_read_zero(make_tiny_config, tmp_path):
    config = make_tiny_config(tmp_path)
    config.strategy, config.frozen_layers = "partial", 1  # embeddings and block 0 frozen
    config.drift.params = True
    workdir = tmp_path / "run"
    results = train_and_evaluate(config, str(workdir))
    assert results["drift/relative_change/embeddings"] == 0.0 and results["drift/relative_change/block_0"] == 0.0
    assert results["drift/relative_change/block_1"] > 0
    evals = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in evals if "drift/relative_change/all" in m] == [2, 4]
    assert (workdir / "drift.png").stat().st_size > 0
    (tmp_path / "fresh").mkdir()
    task = tasks.get(config.task)(config, RunDir(str(tmp_path / "fresh")))
    pretrained = {k: np.asarray(v) for k, v in task.params.items()}
    best = RunDir(str(workdir)).restore_params(task.params, "best")
    again = drift.param_drift(pretrained, {k: np.asarray(v) for k, v in best.items()}, task.layout)
    for key, value in again.items():
        assert results[key] == pytest.approx(value, rel=1e-6, abs=1e-12)
