"""ViT: parity with transformers' PyTorch ViT on weights transformers created and saved."""

from __future__ import annotations

import json

import numpy as np
import pytest

TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
                patch_size=4, num_channels=3, layer_norm_eps=1e-12)


@pytest.fixture(scope="module")
def vit_dirs(tmp_path_factory):
    """A random ViTModel and a ViTForImageClassification (3 labels) saved by transformers, and the models."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    base = transformers.ViTModel(transformers.ViTConfig(**TINY_VIT)).eval()
    base.save_pretrained(out / "base", safe_serialization=True)
    labels = {0: "cat", 1: "dog", 2: "fox"}
    cls = transformers.ViTForImageClassification(transformers.ViTConfig(**TINY_VIT, id2label=labels)).eval()
    cls.save_pretrained(out / "cls", safe_serialization=True)
    return out, base, cls


def _pixels(n=3, size=16, seed=0):
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def test_vit_model_parity(vit_dirs):
    import torch

    from sft_jax.models.loading.vit import load_vit

    out, base, _ = vit_dirs
    vit, config = load_vit(out / "base")
    assert (config.image_size, config.patch_size, config.num_hidden_layers) == (16, 4, 2)
    x = _pixels()
    with torch.no_grad():  # torch takes channels-first
        ref = base(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
    ours = np.asarray(vit(x))
    assert ours.shape == ref.shape == (3, 17, 32)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_vit_classifier_parity(vit_dirs):
    """The `vit.` prefix is found and ViTForImageClassification's head gives the same logits ([CLS] pooling)."""
    import torch
    from flax import nnx

    from sft_jax.models.loading.vit import load_vit, load_vit_head
    from sft_jax.models.vit import ImageClassifier

    out, _, cls = vit_dirs
    vit, _ = load_vit(out / "cls")
    head, labels = load_vit_head(out / "cls")
    assert labels == ["cat", "dog", "fox"]
    model = ImageClassifier(vit, len(labels), pooling="cls", rngs=nnx.Rngs(0))
    model.head.kernel.value, model.head.bias.value = head["kernel"], head["bias"]
    x = _pixels(seed=1)
    with torch.no_grad():
        ref = cls(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(x)), ref, atol=1e-4, rtol=0)
    assert load_vit_head(out / "base") is None


def test_missing_and_misshaped_weights_named(vit_dirs, tmp_path):
    from safetensors.numpy import load_file, save_file

    from sft_jax.models.loading.vit import load_vit

    out, _, _ = vit_dirs
    weights = load_file(out / "base" / "model.safetensors")
    del weights["encoder.layer.1.output.dense.weight"]
    weights["layernorm.bias"] = np.zeros(7, np.float32)
    save_file(weights, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", **TINY_VIT}))
    with pytest.raises(ValueError) as info:
        load_vit(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path}: cannot load ViT weights")
    assert "missing keys: encoder.layer.1.output.dense.weight" in message
    assert "layernorm.bias: checkpoint (7,), expected (32,)" in message


def test_hf_classifier_as_model_of_a_run(vit_dirs, image_config, tmp_path):
    """config.model = a ViTForImageClassification directory: normalisation from its preprocessor_config.json,
    and its own head (labels cat/dog/fox) scores the forgetting data exactly as transformers does."""
    import torch
    from PIL import Image

    from sft_jax.train import train_and_evaluate

    out, _, cls = vit_dirs
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.3, 0.25]
    (out / "cls" / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    names = ["cat", "dog", "fox", "red", "blue"]
    labels = [names[i % 3] for i in range(6)] + [names[3 + i % 2] for i in range(6)]
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(tmp_path / f"{i}.png")
    for name, rows in (("source", range(6)), ("target", range(6, 12))):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"image": f"{i}.png", "label": labels[i]}) + "\n" for i in rows))
    with torch.no_grad():
        x = (pixels[:6] / 255.0 - np.array(mean)) / np.array(std)
        logits = cls(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)).float()).logits.numpy()
    expected = float(np.mean(np.array(["cat", "dog", "fox"])[logits.argmax(-1)] == np.array(labels[:6])))

    config = image_config(str(tmp_path / "target.jsonl"), str(tmp_path / "target.jsonl"))
    config.model = str(out / "cls")
    config.strategy, config.pooling = "head", "cls"
    config.max_steps = config.eval_every = config.checkpoint_every = 2
    config.forgetting.images = str(tmp_path / "source.jsonl")
    results = train_and_evaluate(config, str(tmp_path / "run"))
    assert results["image_size"] == 16 and results["num_labels"] == 2
    assert results["trainable_params"] == 32 * 2 + 2  # a fresh head for blue/red
    assert abs(results["forgetting/source_accuracy/before"] - expected) < 1e-9
    assert results["forgetting/source_accuracy/after"] == results["forgetting/source_accuracy/before"]
