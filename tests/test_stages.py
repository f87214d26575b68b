"""config.stages: a sequence of image stages in one run, its accuracy matrix and transfer figures, resume
mid-stage, and the errors of a bad sequence."""

from __future__ import annotations

import json

import ml_collections
import numpy as np
import pytest
from conftest import CrashAfterSave
from test_images import _write_folder

from sft_jax import continual
from sft_jax.checkpoint import Checkpoints
from sft_jax.config_defaults import defaults
from sft_jax.train import train_and_evaluate


def test_summary_follows_lopez_paz_and_ranzato():
    r = [[0.9, 0.2, 0.1],
         [0.7, 0.8, 0.3],
         [0.6, 0.5, 0.95]]
    b = [0.5, 0.25, 0.2]
    s = continual.summary(r, b)
    assert s["continual/average_accuracy"] == pytest.approx((0.6 + 0.5 + 0.95) / 3)
    assert s["continual/bwt"] == pytest.approx(((0.6 - 0.9) + (0.5 - 0.8)) / 2)
    assert s["continual/fwt"] == pytest.approx(((0.2 - 0.25) + (0.3 - 0.2)) / 2)
    assert "continual/fwt" not in continual.summary(r)
    with pytest.raises(ValueError, match="2 x 2"):
        continual.summary([[1.0, 0.5]])


def test_stage_configs_inherit_and_name_bad_keys():
    c = defaults()
    c.learning_rate = 1e-3
    c.stages = ({"data.train": "a.jsonl", "max_steps": 5}, {"data.train": "b.jsonl", "learning_rate": 1})
    first, second = continual.stage_configs(c)
    assert (first.data.train, first.max_steps, first.learning_rate) == ("a.jsonl", 5, 1e-3)
    assert (second.data.train, second.max_steps, second.learning_rate) == ("b.jsonl", c.max_steps, 1.0)
    assert not first.stages and not second.stages and c.data.train != "a.jsonl"  # the sequence's config is left as is
    for stages, message in [
            (({"data.train": "a"},), r"config.stages: a sequence needs at least 2 stages, got 1"),
            (({"data.trian": "a"}, {}), r"config.stages\[0\].data.trian: unknown config key 'data.trian'"),
            (({}, {"model": "x"}), r"config.stages\[1\].model: set for the whole sequence"),
            (({}, {"max_steps": "ten"}), r"config.stages\[1\].max_steps: expected int, got 'ten'"),
            (({}, {"data": {"train": "a"}}), r"config.stages\[1\].data: a group of keys"),
            (({}, "data.train=a"), r"config.stages\[1\]: expected a dict of config keys, got str")]:
        c.stages = stages
        with pytest.raises(ValueError, match=message):
            continual.stage_configs(c)


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """Train and held-out class folders of red, green and blue images (disjoint files)."""
    root = tmp_path_factory.mktemp("colours")
    return str(_write_folder(root / "train", 6)), str(_write_folder(root / "test", 4, seed=1))


def _sequence(image_config, colours, second: dict) -> ml_collections.ConfigDict:
    """Stage 0: red vs green; stage 1 (`second` added): blue vs red, a head of its own."""
    train, test = colours
    c = image_config(train, test)
    c.stages = ({"data.classes": ("red", "green")}, {"data.classes": ("blue", "red"), **second})
    return c


def test_two_stages_score_every_stage_after_each(image_config, colours, tmp_path):
    """Stage 1 trains the head alone: stage 0's backbone is untouched, so under stage 0's head its score after
    stage 1 equals that after stage 0 (BWT exactly 0), and the diagonal is each stage's own final evaluation."""
    results = train_and_evaluate(_sequence(image_config, colours, {"strategy": "head"}), str(tmp_path))
    stage = [json.loads((tmp_path / "stages" / str(i) / "results.json").read_text()) for i in (0, 1)]
    second = json.loads((tmp_path / "stages" / "1" / "config.json").read_text())
    assert second["model"] == str(tmp_path / "stages" / "0")
    r = results["continual/accuracy_matrix"]
    assert [len(row) for row in r] == [2, 2]
    assert [r[0][0], r[1][1]] == [stage[0]["eval/accuracy"], stage[1]["eval/accuracy"]]
    assert r[1][0] == r[0][0] and results["continual/bwt"] == 0.0
    assert results["continual/average_accuracy"] == pytest.approx((r[1][0] + r[1][1]) / 2)
    b = results["continual/initial_accuracy"]
    assert results["continual/fwt"] == pytest.approx(r[0][1] - b[1])
    assert results["continual/stage_1/eval/accuracy"] == stage[1]["eval/accuracy"]
    assert json.loads((tmp_path / "results.json").read_text()) == results
    again = train_and_evaluate(_sequence(image_config, colours, {"strategy": "head"}), str(tmp_path))
    assert again == results  # a finished sequence is read back, not trained again
    assert json.loads((tmp_path / "config.json").read_text())["stages"][1]["strategy"] == "head"
    with pytest.raises(ValueError, match=r"cannot resume, the sequence changed \(stages\)"):
        train_and_evaluate(_sequence(image_config, colours, {"strategy": "full"}), str(tmp_path))


def test_a_sequence_killed_mid_stage_resumes_bit_identically(image_config, colours, tmp_path, monkeypatch):
    whole = train_and_evaluate(_sequence(image_config, colours, {"learning_rate": 3e-2}), str(tmp_path / "whole"))
    save_latest = Checkpoints.save_latest

    def crash_in_stage_1(self, state, meta):
        save_latest(self, state, meta)
        self.wait()
        if int(state.step) == 2 and self.workdir.endswith("stages/1"):
            raise CrashAfterSave

    with monkeypatch.context() as m:
        m.setattr(Checkpoints, "save_latest", crash_in_stage_1)
        with pytest.raises(CrashAfterSave):
            train_and_evaluate(_sequence(image_config, colours, {"learning_rate": 3e-2}), str(tmp_path / "split"))
    assert (tmp_path / "split" / "stages" / "0" / "results.json").exists()
    assert not (tmp_path / "split" / "stages" / "1" / "results.json").exists()
    resumed = train_and_evaluate(_sequence(image_config, colours, {"learning_rate": 3e-2}), str(tmp_path / "split"))
    assert resumed == whole
    fingerprints = [json.loads((tmp_path / run / "stages" / "1" / "results.json").read_text())["params_fingerprint"]
                    for run in ("whole", "split")]
    assert fingerprints[0] == fingerprints[1]
    assert not np.allclose(whole["continual/accuracy_matrix"], 0.0)


def test_a_bad_stage_fails_before_anything_trains(image_config, colours, tmp_path):
    c = _sequence(image_config, colours, {"learning_rate": -1.0})
    with pytest.raises(ValueError, match=r"config.stages\[1\]: config.learning_rate: must be >= 0"):
        train_and_evaluate(c, str(tmp_path))
    assert not (tmp_path / "stages").exists()
    c = _sequence(image_config, colours, {})
    c.task, c.model = "text_classification", "minilm-l6"
    with pytest.raises(ValueError, match="config.stages: .*'text_classification' cannot load"):
        train_and_evaluate(c, str(tmp_path))


def test_class_incremental_grows_one_head(image_config, tmp_path):
    """stages_scenario='class': stage 1 (blue, yellow) trains a head over green, red, blue, yellow whose first two
    outputs start as stage 0's; stage 1's classes score 0 before they are seen; there is no FWT."""
    palette = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (220, 220, 30)}
    _write_folder(tmp_path / "train", 6, labels=palette)
    _write_folder(tmp_path / "test", 4, seed=1, labels=palette)
    c = image_config(str(tmp_path / "train"), str(tmp_path / "test"))
    c.stages_scenario = "class"
    c.stages = ({"data.classes": ("red", "green")}, {"data.classes": ("blue", "yellow"), "strategy": "head"})
    results = train_and_evaluate(c, str(tmp_path / "run"))
    stages = [tmp_path / "run" / "stages" / str(i) for i in (0, 1)]
    assert [json.loads((d / "labels.json").read_text())["labels"] for d in stages] == [
        ["green", "red"], ["green", "red", "blue", "yellow"]]
    r = results["continual/accuracy_matrix"]
    assert r[0][1] == 0.0 and r[0][0] == json.loads((stages[0] / "results.json").read_text())["eval/accuracy"]
    assert r[1][1] == json.loads((stages[1] / "results.json").read_text())["eval/accuracy"]
    assert results["continual/scenario"] == "class" and "continual/fwt" not in results
    assert results["continual/bwt"] == pytest.approx(r[1][0] - r[0][0])
    from sft_jax.tasks.image_model import load_image_run

    first, second = (load_image_run(str(d), "latest")[1] for d in stages)
    assert second.kernel.shape == (first.kernel.shape[0], 4)
    c.stages = ({"data.classes": ("red", "green"), "data.labels": ("red", "green")}, {})
    with pytest.raises(ValueError, match="stages_scenario='class' sets each stage's data.labels"):
        train_and_evaluate(c, str(tmp_path / "bad"))


def test_a_grown_head_keeps_the_outputs_of_known_labels():
    from flax import nnx

    from sft_jax.models.vit import ViT, ViTConfig
    from sft_jax.tasks.image_model import SourceHead, build_classifier

    vit = ViT(ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    source = SourceHead(["green", "red"], "cls", rng.normal(size=(16, 2)).astype(np.float32),
                        rng.normal(size=2).astype(np.float32))
    labels = ["blue", "red", "green", "yellow"]
    grown = build_classifier(vit, labels, source, pooling="cls", dropout=0.0, seed=0, grow=True)
    fresh = build_classifier(vit, labels, None, pooling="cls", dropout=0.0, seed=0)
    kernel, bias = np.asarray(grown.head.kernel.value), np.asarray(grown.head.bias.value)
    np.testing.assert_array_equal(kernel[:, [2, 1]], source.kernel)
    np.testing.assert_array_equal(bias[[2, 1]], source.bias)
    np.testing.assert_array_equal(kernel[:, [0, 3]], np.asarray(fresh.head.kernel.value)[:, [0, 3]])
    not_grown = build_classifier(vit, labels, source, pooling="cls", dropout=0.0, seed=0)
    np.testing.assert_array_equal(np.asarray(not_grown.head.kernel.value), np.asarray(fresh.head.kernel.value))


def test_data_labels_fix_the_head_and_must_hold_every_training_label(tmp_path):
    from sft_jax.data.batching import Example
    from sft_jax.data.sources import DataError
    from sft_jax.rundir import RunDir
    from sft_jax.tasks.classification import label_vocab

    examples = [Example(text="a", label="red", where="t.jsonl:1"), Example(text="b", label="blue", where="t.jsonl:2")]
    assert label_vocab("t.jsonl", RunDir(tmp_path), examples).labels == ["blue", "red"]
    assert label_vocab("t.jsonl", RunDir(tmp_path), examples, ("red", "green", "blue")).labels == ["red", "green",
                                                                                                  "blue"]
    with pytest.raises(DataError, match=r"t.jsonl: label 'red' is not one of config.data.labels \['blue'\]"):
        label_vocab("t.jsonl", RunDir(tmp_path), examples, ("blue",))
