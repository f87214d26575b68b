"""Image data (manifests, class folders, TFDS), augmentation, and the image_classification task end to end."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from sft_jax.data import images
from sft_jax.data.batching import LabelVocab
from sft_jax.data.sources import DataError

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def _write_folder(root: pathlib.Path, per_class: int, size: int = 10, seed: int = 0, labels=COLOURS) -> pathlib.Path:
    """root/<label>/<i>.png: noisy images of each label's colour (easy to tell apart); `labels`: names of
    COLOURS, or a {label: (r, g, b)} of its own."""
    from PIL import Image

    colours = labels if isinstance(labels, dict) else {label: COLOURS[label] for label in labels}
    rng = np.random.default_rng(seed)
    for label, colour in colours.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 30, (size, size, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / label / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    """A class folder (10 per colour) and, in another folder, a manifest with image paths relative to it."""
    root = tmp_path_factory.mktemp("images")
    folder = _write_folder(root / "folder", 10)
    _write_folder(root / "m" / "pics", 4, seed=1)
    records = [{"image": f"pics/{label}/{i:03d}.png", "label": label} for label in COLOURS for i in range(4)]
    manifest = root / "m" / "eval.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder, manifest


def test_manifest_paths_relative_to_the_manifest(image_data):
    _, manifest = image_data
    records = images.read_image_records(str(manifest))
    assert len(records) == 12
    assert records[0].source == str(manifest.parent / "pics" / "red" / "000.png")
    assert records[5].where == f"{manifest}:6" and records[5].label == "green"
    ds = images.load_images(records, LabelVocab.from_examples(records), 8)
    assert ds.images.shape == (12, 8, 8, 3) and ds.images.dtype == np.uint8
    assert ds.images[0, ..., 0].mean() > 150 and ds.images[0, ..., 2].mean() < 100  # red stays red


def test_class_folders_slices_and_class_filter(image_data):
    folder, _ = image_data
    everything = images.read_image_records(str(folder))
    assert len(everything) == 30 and {r.label for r in everything} == set(COLOURS)
    head = images.read_image_records(f"{folder}[:3]")
    tail = images.read_image_records(f"{folder}[3:]")
    assert len(head) == 9 and len(tail) == 21
    assert {r.source for r in head} | {r.source for r in tail} == {r.source for r in everything}
    assert not {r.source for r in head} & {r.source for r in tail}
    assert [r.source for r in head if r.label == "blue"] == [str(folder / "blue" / f"00{i}.png") for i in range(3)]
    kept = images.read_image_records(f"{folder}[:3]", classes=("red", "blue"))
    assert {r.label for r in kept} == {"red", "blue"} and len(kept) == 6
    with pytest.raises(DataError, match=r"no images of the configured classes \['cyan'\]"):
        images.read_image_records(str(folder), classes=("red", "cyan"))
    with pytest.raises(DataError, match="file not found"):
        images.read_image_records(str(folder / "nope"))


def test_augmentation_is_a_pure_function_of_seed_and_step(image_data):
    folder, _ = image_data
    records = images.read_image_records(str(folder))
    ds = images.load_images(records, LabelVocab.from_examples(records), 8)
    make = lambda seed: images.ImageTrainBatches(ds, 6, seed, mean=(0.5,) * 3, std=(0.25,) * 3,  # noqa: E731
                                                 crop_padding=2, flip=True)
    a, b = make(0), make(0)
    for step in (7, 0, 3, 7):  # any order: nothing depends on earlier calls
        np.testing.assert_array_equal(a.batch(step)["pixel_values"], b.batch(step)["pixel_values"])
    assert not np.array_equal(a.batch(1)["pixel_values"], a.batch(2)["pixel_values"])
    assert not np.array_equal(a.batch(1)["pixel_values"], make(1).batch(1)["pixel_values"])
    # The images of a batch are its examples (normalised), shifted by at most 2 pixels and maybe mirrored.
    plain = images.TrainBatches(ds, 6, (1,), 0, 0, collate=images.image_collate((0.5,) * 3, (0.25,) * 3))
    raw, aug = plain.batch(4), a.batch(4)
    np.testing.assert_array_equal(raw["labels"], aug["labels"])
    for x, y in zip(raw["pixel_values"], aug["pixel_values"]):
        padded = np.pad(x, ((2, 2), (2, 2), (0, 0)))
        crops = [padded[i: i + 8, j: j + 8] for i in range(5) for j in range(5)]
        assert any(np.array_equal(y, c) or np.array_equal(y, c[:, ::-1]) for c in crops)


def test_normalisation_from_preprocessor_config(tmp_path):
    from sft_jax.tasks.image_model import resolve_image_model

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "image_size": 8, "patch_size": 4,
                                                      "hidden_size": 16, "num_attention_heads": 2}))
    image_cfg = {"mean": (0.1, 0.2, 0.3), "std": (1.0, 1.0, 1.0)}
    spec = resolve_image_model(str(tmp_path), {}, image_cfg)
    assert (spec.kind, spec.mean, spec.vit_config.image_size) == ("hf", (0.1, 0.2, 0.3), 8)  # no preprocessor file
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.4, 0.3],
                                                                   "image_std": [0.2, 0.2, 0.25]}))
    spec = resolve_image_model(str(tmp_path), {}, image_cfg)
    assert (spec.mean, spec.std) == ((0.5, 0.4, 0.3), (0.2, 0.2, 0.25))
    batch = images.make_image_batch(images.ImageDataset(np.full((1, 8, 8, 3), 255, np.uint8), np.zeros(1, np.int32),
                                                        [""]), np.arange(1), 2, mean=spec.mean, std=spec.std)
    np.testing.assert_allclose(batch["pixel_values"][0, 0, 0], [2.5, 3.0, 2.8], rtol=1e-6)
    assert list(batch["weights"]) == [1.0, 0.0]


def test_tfds_images(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    folder = _write_folder(tmp_path / "src", 3, size=8, labels=("red", "blue"))

    class SftJaxTinyColours(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 3)),
                "label": tfds.features.ClassLabel(names=["red", "blue"])}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for label in ("red", "blue"):
                for i in range(3):  # encoded PNG files: no TensorFlow needed
                    yield f"{label}{i}", {"image": str(folder / label / f"{i:03d}.png"), "label": label}

    try:
        SftJaxTinyColours(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    except ImportError as e:  # a tfds feature that needs TensorFlow here
        pytest.skip(f"cannot build a TFDS image dataset without TensorFlow: {e}")
    records = images.read_image_records(f"tfds:{SftJaxTinyColours.name}:train", data_dir=str(tmp_path / "tfds"))
    assert sorted(r.label for r in records) == ["blue"] * 3 + ["red"] * 3
    ds = images.load_images(records, LabelVocab(["blue", "red"]), 8)
    from PIL import Image

    expected = {str(np.asarray(Image.open(folder / r.label / f"{i:03d}.png")).tobytes())
                for r in records for i in range(3)}
    assert all(str(img.tobytes()) in expected for img in ds.images)


def _run(config, workdir):
    from sft_jax.train import train_and_evaluate

    return train_and_evaluate(config, str(workdir))


@pytest.fixture(scope="module")
def base_run(image_data, tmp_path_factory, image_config):
    """A tiny ViT trained from scratch on red/green (first 6 per class); its workdir is a model."""
    folder, manifest = image_data
    config = image_config(f"{folder}[:6]", str(manifest))
    config.data.classes = ("red", "green")
    config.max_steps = 6
    workdir = tmp_path_factory.mktemp("base")
    return workdir, _run(config, workdir), config


def test_image_run_outputs(base_run):
    workdir, results, _ = base_run
    assert json.loads((workdir / "labels.json").read_text())["labels"] == ["green", "red"]
    assert results["train_examples"] == 12 and results["eval_examples"] == 8 and results["image_size"] == 8
    assert results["eval/accuracy"] == 1.0  # red vs green is easy
    for key in ("eval/f1", "eval/loss", "params_fingerprint"):
        assert key in results
    assert json.loads((workdir / "config.json").read_text())["task"] == "image_classification"


def test_predict_images(base_run, image_data):
    from sft_jax.predict import ImagePredictor

    workdir, _, _ = base_run
    folder, _ = image_data
    paths = [str(folder / "red" / "009.png"), str(folder / "green" / "009.png")]  # not trained on
    rows = ImagePredictor(str(workdir)).predict(paths)
    assert [r["label"] for r in rows] == ["red", "green"]
    assert set(rows[0]["probabilities"]) == {"green", "red"}
    assert abs(sum(rows[0]["probabilities"].values()) - 1.0) < 1e-5


@pytest.mark.parametrize("strategy", ["head", "partial"])
def test_transfer_from_a_run_workdir_with_forgetting_probe(base_run, image_data, image_config, tmp_path, strategy):
    """Fine-tuning the base on red/blue: its backbone is loaded, and the forgetting probe scores red/green with
    the base's own head: before = the base's accuracy; head-only training leaves it exactly unchanged."""
    from sft_jax import tasks
    from sft_jax.checkpoint import Checkpoints
    from sft_jax.rundir import RunDir

    base_dir, base_results, _ = base_run
    folder, manifest = image_data
    config = image_config(f"{folder}[:6]", str(manifest))
    config.model = str(base_dir)
    config.strategy, config.frozen_layers = strategy, 1
    config.data.classes = ("red", "blue")
    config.forgetting.images = str(manifest)  # has blue too: only the base head's classes are kept
    (tmp_path / "probe").mkdir()
    run = tasks.get("image_classification")(config, RunDir(tmp_path / "probe"))  # the model as the run starts it
    results = _run(config, tmp_path / "run")
    assert results["source_eval_examples"] == 8
    assert results["forgetting/source_accuracy/before"] == base_results["eval/accuracy"]
    if strategy == "head":
        assert results["forgetting/source_accuracy/after"] == results["forgetting/source_accuracy/before"]
        assert results["trainable_params"] == 16 * 2 + 2
    frozen = "vit/" if strategy == "head" else ("vit/embeddings/", "vit/layers/0/")
    ckpt = Checkpoints(str(tmp_path / "run"))
    after, _ = ckpt.restore_params(run.params, "latest")
    ckpt.close()
    for name, value in run.params.items():  # run.params: the base's backbone as loaded
        if name.startswith(frozen):
            np.testing.assert_array_equal(np.asarray(after[name]), np.asarray(value), err_msg=name)
    if strategy == "partial":  # the blocks after the frozen ones did learn
        assert not np.array_equal(np.asarray(after["vit/layers/1/mlp/up/kernel"]),
                                  np.asarray(run.params["vit/layers/1/mlp/up/kernel"]))


def test_resume_is_bit_identical(image_data, image_config, tmp_path):
    folder, manifest = image_data
    config = image_config(f"{folder}[:4]", str(manifest))
    config.image.crop_padding, config.image.flip = 1, True
    whole = _run(config, tmp_path / "whole")
    config.max_steps = 2
    _run(config, tmp_path / "split")
    config.max_steps = 4  # a compatible change: the run resumes at step 2
    resumed = _run(config, tmp_path / "split")
    assert resumed["params_fingerprint"] == whole["params_fingerprint"]
    assert resumed["eval/loss"] == whole["eval/loss"]


def test_forgetting_probe_needs_a_source_head(image_data, image_config, tmp_path):
    folder, manifest = image_data
    config = image_config(f"{folder}[:4]", str(manifest))
    config.forgetting.images = str(manifest)
    with pytest.raises(ValueError, match="vit-scratch has no classification head of its own"):
        _run(config, tmp_path / "run")


def _backbone_distance(workdir, base_params: dict) -> float:
    """Squared distance of a run's latest backbone (vit/...) from the base's."""
    from sft_jax.checkpoint import Checkpoints

    ckpt = Checkpoints(str(workdir))
    after, _ = ckpt.restore_params(base_params, "latest")
    ckpt.close()
    return sum(float(np.sum((np.asarray(after[k]) - np.asarray(v)) ** 2))
               for k, v in base_params.items() if k.startswith("vit/"))


def test_ewc_on_images_anchors_the_backbone_to_the_source_task(base_run, image_data, image_config, tmp_path):
    """EWC for an image run: the Fisher is that of the base's own task (its head, on images of its classes,
    `regularizer.fisher_data`), not uniform (the run differs from L2-SP's); a heavy penalty keeps the
    fine-tuned backbone much closer to the base's."""
    from sft_jax.state import ModelDef
    from sft_jax.tasks.image_model import load_image_run

    base_dir, _, _ = base_run
    folder, manifest = image_data
    config = image_config(f"{folder}[:6]", str(manifest))
    config.model, config.strategy, config.max_steps = str(base_dir), "full", 6
    config.data.classes = ("red", "blue")
    plain = _run(config, tmp_path / "plain")
    config.regularizer.ewc, config.regularizer.fisher_data = 1e4, str(manifest)
    config.regularizer.fisher_batches, config.regularizer.fisher_batch_size = 2, 2
    ewc = _run(config, tmp_path / "ewc")
    config.regularizer.ewc, config.regularizer.l2sp = 0.0, 1e4
    l2sp = _run(config, tmp_path / "l2sp")
    assert len({plain["params_fingerprint"], ewc["params_fingerprint"], l2sp["params_fingerprint"]}) == 3
    _, base_params = ModelDef.split(load_image_run(str(base_dir))[0])
    assert _backbone_distance(tmp_path / "ewc", base_params) < 0.5 * _backbone_distance(tmp_path / "plain",
                                                                                        base_params)


def test_ewc_on_images_needs_a_source_head(image_data, image_config, tmp_path):
    folder, manifest = image_data
    config = image_config(f"{folder}[:4]", str(manifest))
    config.regularizer.ewc, config.regularizer.fisher_data = 1.0, str(manifest)
    with pytest.raises(ValueError, match="config.regularizer.ewc: vit-scratch has no classification head of its own"):
        _run(config, tmp_path / "run")
