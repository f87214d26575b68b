"""config.stages for decoders: sft stages in one command, each starting from the previous stage's best model
(a HF folder, LoRA folded in), scored after every stage by next-token accuracy and loss on every stage's data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import lm_config, write_jsonl

from sft_jax.train import train_and_evaluate


def _sequence(tiny_llama_dir, tmp_path):
    """Stage 0 (full): "N plus 1?" -> "It is N+1."; stage 1 (LoRA): "N times 2?" -> "It is 2N."."""
    plus = [{"input": f"{i} plus 1?", "output": f"It is {i + 1}."} for i in range(12)]
    times = [{"input": f"{i} times 2?", "output": f"It is {2 * i}."} for i in range(12)]
    c = lm_config(tiny_llama_dir, tmp_path, "full")
    c.task = "sft"
    c.max_length, c.buckets = 16, (16,)
    c.stages = ({"data.train": str(write_jsonl(tmp_path / "plus.jsonl", plus[4:])),
                 "data.eval": str(write_jsonl(tmp_path / "plus_eval.jsonl", plus[:4]))},
                {"data.train": str(write_jsonl(tmp_path / "times.jsonl", times[4:])),
                 "data.eval": str(write_jsonl(tmp_path / "times_eval.jsonl", times[:4])), "strategy": "lora"})
    return c


def test_sft_stages_chain_through_exported_models(tiny_llama_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    c = _sequence(tiny_llama_dir, tmp_path)
    results = train_and_evaluate(c, str(tmp_path / "run"))
    stages = [tmp_path / "run" / "stages" / str(i) for i in (0, 1)]
    own = [json.loads((d / "results.json").read_text()) for d in stages]
    assert json.loads((stages[1] / "config.json").read_text())["model"] == str(stages[0] / "model")
    assert not (stages[1] / "model").exists()  # the last stage's model stays a workdir
    transformers.AutoModelForCausalLM.from_pretrained(stages[0] / "model")  # a plain HF folder
    r, loss = results["continual/accuracy_matrix"], results["continual/loss_matrix"]
    assert results["continual/metric"] == "eval/accuracy" and [len(row) for row in r] == [2, 2]
    # The diagonal rescored from the exported folder: stage 0 (full, float32) exactly as its run scored it;
    # stage 1's adapters folded into the kernels change only the rounding.
    assert r[0][0] == own[0]["eval/accuracy"]
    assert loss[0][0] == pytest.approx(own[0]["eval/loss"], rel=1e-6)
    assert loss[1][1] == pytest.approx(own[1]["eval/loss"], rel=1e-4)
    assert loss[1][0] != loss[0][0]  # stage 1 moved the model stage 0 left
    assert results["continual/bwt"] == pytest.approx(r[1][0] - r[0][0])
    b = results["continual/initial_accuracy"]
    assert results["continual/fwt"] == pytest.approx(r[0][1] - b[1])
    assert np.all(np.isfinite(results["continual/initial_loss"]))
    again = train_and_evaluate(_sequence(tiny_llama_dir, tmp_path), str(tmp_path / "run"))
    assert again == results  # read back, nothing trained or exported again


def test_lm_stages_refuse_the_class_scenario(tiny_llama_dir, tmp_path):
    c = _sequence(tiny_llama_dir, tmp_path)
    c.stages_scenario = "class"
    with pytest.raises(ValueError, match="stages_scenario='class'.*sft stages are scored task by task"):
        train_and_evaluate(c, str(tmp_path / "run"))
