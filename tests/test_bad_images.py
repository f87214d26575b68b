"""Bad image input (tests/data/bad/image_*.jsonl and images/): a one-line error naming the manifest line and the
image file, before any training; unusual but usable modes are converted to RGB."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from sft_jax.data import images
from sft_jax.data.batching import LabelVocab
from sft_jax.data.sources import DataError

BAD = pathlib.Path(__file__).resolve().parent / "data" / "bad"
IMAGES = BAD / "images"


def _load(name: str, size: int = 8):
    records = images.read_image_records(str(BAD / name))
    return images.load_images(records, LabelVocab(["blue", "red"]), size)


@pytest.mark.parametrize("name, expected", [
    ("image_undecodable.jsonl", f":2: {IMAGES}/not_an_image.png: cannot decode image (UnidentifiedImageError"),
    ("image_truncated.jsonl", f":3: {IMAGES}/truncated.jpg: cannot decode image"),
    ("image_missing.jsonl", f":1: {IMAGES}/no_such_file.png: image file not found"),
    ("image_unseen_label.jsonl", ":2: label 'zebra' is not one of the training labels ['blue', 'red']"),
])
def test_bad_image_named_with_line_and_file(name, expected):
    with pytest.raises(DataError) as info:
        _load(name)
    message = str(info.value)
    assert message.startswith(f"{BAD / name}{expected}"), message
    assert "\n" not in message


def test_image_field_must_be_a_path():
    with pytest.raises(DataError) as info:
        images.read_image_records(str(BAD / "image_path_not_string.jsonl"))
    expected = f"{BAD}/image_path_not_string.jsonl:3: field 'image' must be a non-empty path string, got 7"
    assert str(info.value) == expected


def test_undecodable_file_in_a_class_folder_names_the_file(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        (tmp_path / label / "0.png").write_bytes((IMAGES / "red0.png").read_bytes())
    (tmp_path / "b" / "1.png").write_bytes((IMAGES / "not_an_image.png").read_bytes())
    records = images.read_image_records(str(tmp_path))
    with pytest.raises(DataError) as info:
        images.load_images(records, LabelVocab(["a", "b"]), 8)
    assert str(info.value).startswith(f"{tmp_path}/b/1.png: cannot decode image")


def test_greyscale_rgba_palette_16bit_and_non_square_become_rgb():
    ds = _load("image_modes.jsonl")
    assert ds.images.shape == (5, 8, 8, 3) and ds.images.dtype == np.uint8
    grey, rgba, palette, grey16, wide = ds.images
    assert (grey == 200).all()  # L: the grey level in all three channels
    assert (rgba[..., 0] == 220).all() and (rgba[..., 1:] == 0).all()  # alpha dropped, colour kept
    assert np.abs(palette.astype(int) - (20, 20, 220)).max() <= 2  # palette index -> its colour
    assert (grey16 == 255).all()  # 16-bit white scaled to 8 bits, not clipped to garbage
    assert np.abs(wide.astype(int) - (220, 20, 20)).max() <= 1  # 10x6 resized to the model's 8x8
    assert list(ds.labels) == [1, 1, 0, 0, 1]


def test_bad_image_stops_the_run_before_training(image_config, tmp_path):
    from sft_jax.train import train_and_evaluate

    config = image_config(str(BAD / "image_train_ok.jsonl"), str(BAD / "image_truncated.jsonl"))
    with pytest.raises(DataError) as info:
        train_and_evaluate(config, str(tmp_path / "run"))
    assert str(info.value).startswith(f"{BAD}/image_truncated.jsonl:3: {IMAGES}/truncated.jpg: cannot decode image")
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").rglob("*"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("overrides, expected", [
    ({"vit.hidden_size": 15}, "config.vit: hidden_size 15 is not a multiple of num_attention_heads 2"),
    ({"vit.image_size": 10}, "config.vit: image_size 10 is not a multiple of patch_size 4"),
    ({"vit.num_hidden_layers": 0}, "config.vit: sizes must be positive"),
    ({"image.std": (0.5, 0.0, 0.5)}, "config.image.mean / std: three values each, std > 0"),
    ({"image.mean": (0.5, 0.5)}, "config.image.mean / std: three values each, std > 0"),
    ({"image.crop_padding": -1}, "config.image.crop_padding: must be >= 0, got -1"),
    ({"strategy": "lora", "lora.dropout": 0.1}, "config.lora.dropout: adapter dropout is implemented for decoders"),
    ({"task": "text_classification", "forgetting.images": "x.jsonl"},
     "config.forgetting.images: the image forgetting probe needs task='image_classification'"),
])
def test_invalid_image_config_values(image_config, overrides, expected):
    from sft_jax.config_defaults import validate

    config = image_config("train.jsonl", "eval.jsonl")
    config.update_from_flattened_dict(overrides)
    with pytest.raises(ValueError) as info:
        validate(config)
    assert str(info.value).startswith(expected), str(info.value)


def test_unknown_image_config_key(image_config):
    from sft_jax.config_defaults import validate

    config = image_config("train.jsonl", "eval.jsonl")
    config.image.unlock()
    config.image.flipp = True
    with pytest.raises(ValueError, match="unknown config key 'image.flipp'"):
        validate(config)
