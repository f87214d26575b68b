"""What carries over between a sequence's stages beyond the weights: a replay memory of earlier classes
(`stages_replay`, `data.replay_*`) and online EWC (each stage's Fisher added to the earlier stages')."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_images import _write_folder

from sft_jax.config_defaults import defaults, validate
from sft_jax.data.batching import replay_memory
from sft_jax.data.images import ImageRecord
from sft_jax.regularizers import add_fisher_prior, save_fisher
from sft_jax.train import train_and_evaluate

PALETTE = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (220, 220, 30),
           "cyan": (30, 220, 220), "magenta": (220, 30, 220)}


def _records(counts: dict[str, int]) -> list[ImageRecord]:
    return [ImageRecord(f"{label}/{i}.png", label, f"{label}/{i}.png") for label, n in counts.items()
            for i in range(n)]


def test_replay_memory_draws_per_class_and_keeps_a_class_memory_fixed():
    records = _records({"red": 10, "green": 10, "blue": 2})
    memory = replay_memory(records, 3, seed=0)
    assert [sum(r.label == label for r in memory) for label in ("red", "green", "blue")] == [3, 3, 2]
    assert memory == [r for r in records if r in memory]  # the original order
    red_alone = replay_memory(_records({"red": 10}), 3, seed=0)
    assert [r for r in memory if r.label == "red"] == red_alone  # whatever else is replayed with it
    assert replay_memory(records, 3, seed=0) == memory
    assert [r.where for r in replay_memory(records, 3, seed=1)] != [r.where for r in memory]


def test_fisher_prior_adds_and_names_a_mismatch(tmp_path):
    fisher = {"a": np.ones((2, 3), np.float32), "b": np.full(4, 2.0, np.float32)}
    path = str(tmp_path / "fisher.npz")
    save_fisher(path, fisher)
    total = add_fisher_prior({"a": np.full((2, 3), 0.5, np.float32), "b": np.zeros(4, np.float32)}, path)
    np.testing.assert_array_equal(total["a"], np.full((2, 3), 1.5))
    np.testing.assert_array_equal(total["b"], fisher["b"])
    with pytest.raises(ValueError, match=r"fisher.npz: its Fisher covers other parameters .*"
                                         r"missing: \['c'\]; not penalised here: \['b'\]"):
        add_fisher_prior({"a": fisher["a"], "c": fisher["b"]}, path)
    with pytest.raises(ValueError, match=r"fisher.npz: a has shape \(2, 3\), this run's parameter \(3, 2\)"):
        add_fisher_prior({"a": np.ones((3, 2)), "b": fisher["b"]}, path)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz: not a readable .npz"):
        add_fisher_prior(fisher, str(tmp_path / "bad.npz"))
    with pytest.raises(FileNotFoundError, match="fisher_prior: .*missing.npz: file not found"):
        add_fisher_prior(fisher, str(tmp_path / "missing.npz"))


@pytest.mark.parametrize("change, message", [
    ({"data.replay_classes": ("red",)}, "set both"),
    ({"data.replay_per_class": -1}, "must be >= 0"),
    ({"task": "text_classification", "data.replay_classes": ("red",), "data.replay_per_class": 2},
     "for image_classification, not 'text_classification'"),
    ({"stages_replay": 2}, "stages_replay: .* needs config.stages with stages_scenario='class'"),
    ({"regularizer.keep_fisher": True}, "only EWC"),
])
def test_bad_memory_options_are_refused(change, message):
    c = defaults()
    c.task, c.data.train = "image_classification", "train"
    for key, value in change.items():
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    with pytest.raises(ValueError, match=message):
        validate(c)


def test_class_incremental_replay_and_online_ewc(image_config, tmp_path):
    """Three class-incremental stages: stage 0 plain, stages 1-2 with EWC and a memory of 2 images per earlier
    class. Each EWC stage's Fisher is its own estimate (normalised to mean 1) plus the previous EWC stage's; the
    memory is in each later stage's training set, drawn from the earlier classes' training images."""
    _write_folder(tmp_path / "train", 6, labels=PALETTE)
    _write_folder(tmp_path / "test", 4, seed=1, labels=PALETTE)
    c = image_config(str(tmp_path / "train"), str(tmp_path / "test"))
    c.stages_scenario, c.stages_replay = "class", 2
    c.max_steps = c.eval_every = c.checkpoint_every = 2
    c.regularizer.fisher_data, c.regularizer.fisher_batches, c.regularizer.fisher_batch_size = (
        str(tmp_path / "train"), 2, 4)
    ewc = {"regularizer.ewc": 10.0}
    c.stages = ({"data.classes": ("red", "green")}, {"data.classes": ("blue", "yellow"), **ewc},
                {"data.classes": ("cyan", "magenta"), **ewc})
    results = train_and_evaluate(c, str(tmp_path / "run"))
    stages = [tmp_path / "run" / "stages" / str(i) for i in range(3)]
    summaries = [json.loads((d / "results.json").read_text()) for d in stages]
    assert "replay_examples" not in summaries[0]
    assert [s.get("replay_examples") for s in summaries[1:]] == [4, 8]  # 2 images of each earlier class
    assert [s["train_examples"] for s in summaries] == [12, 16, 20]
    configs = [json.loads((d / "config.json").read_text()) for d in stages]
    assert configs[2]["data"]["replay_classes"] == ["green", "red", "blue", "yellow"]
    assert not (stages[0] / "fisher.npz").exists()
    assert configs[1]["regularizer"]["fisher_prior"] == "" and configs[2]["regularizer"]["fisher_prior"] == str(
        stages[1] / "fisher.npz")
    first, second = (np.load(d / "fisher.npz") for d in stages[1:])
    assert set(first.files) == set(second.files) and not any(k.startswith("head/") for k in first.files)
    size = sum(first[k].size for k in first.files)
    assert sum(float(first[k].sum()) for k in first.files) / size == pytest.approx(1.0, rel=1e-5)
    assert sum(float(second[k].sum()) for k in second.files) / size == pytest.approx(2.0, rel=1e-5)
    assert all((second[k] >= first[k]).all() for k in first.files)
    assert len(results["continual/accuracy_matrix"]) == 3
