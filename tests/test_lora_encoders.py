"""strategy=lora on the encoders (BERT, RoBERTa / XLM-R, ModernBERT) and the ViT: the adapters start as a
no-op, only they and the classifier head train, and a LoRA run's workdir predicts (and seeds the next run)."""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sft_jax.models.lora import DEFAULT_TARGETS, has_lora, merge_lora
from sft_jax.tasks.classification import ENCODER_LORA_TARGETS, add_lora

PROJECTIONS = ("attention/query", "attention/key", "attention/value", "attention/out", "mlp/up", "mlp/down")
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30)}


def _is_trained(name: str) -> bool:
    return name.endswith(("/lora_a", "/lora_b")) or name.startswith("head/")


def _check_run(before: dict, after: dict, results: dict) -> None:
    """Every pre-trained parameter bit-identical, every adapter and the head changed, and they are the count."""
    assert has_lora(before)
    for name, value in before.items():
        same = np.asarray(after[name]).tobytes() == np.asarray(value).tobytes()
        assert same != _is_trained(name), f"{name}: {'unchanged' if same else 'changed'}"
    assert results["trainable_params"] == sum(v.size for n, v in before.items() if _is_trained(n))


def _restore(workdir, params: dict) -> dict:
    from sft_jax.checkpoint import Checkpoints

    ckpt = Checkpoints(str(workdir))
    try:
        return ckpt.restore_params(params, "latest")[0]
    finally:
        ckpt.close()


# ------------------------------------------------------------------------------------------------ text


def _lora_config(config):
    config.strategy, config.learning_rate, config.lora.rank = "lora", 1e-2, 4
    config.max_steps = config.eval_every = config.checkpoint_every = 3
    return config


def _plain(config):
    plain = config.copy_and_resolve_references()
    plain.strategy = "full"
    return plain


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bert_adapters_start_as_a_no_op(tiny_config, dtype):
    """Initial logits bit-identical to the model without adapters, in float32 and in bfloat16 (mixed.Linear
    adds a bfloat16 layer's bias in float32; the adapted layer must too)."""
    from sft_jax.tasks.text import TextClassifier

    config = _lora_config(tiny_config)
    config.dtype = dtype
    lora, plain = TextClassifier(config, 2), TextClassifier(_plain(config), 2)
    adapted = sorted({n.rsplit("/", 1)[0] for n in lora.params if n.endswith("/lora_a")})
    assert adapted == sorted(f"encoder/layers/{i}/{p}" for i in range(2) for p in PROJECTIONS)
    ids, mask = _encode(lora.tokenizer, ["a good fun movie", "dull and boring, bad"])
    out = np.asarray(lora.model_def.merge(lora.params)(ids, mask))
    ref = np.asarray(plain.model_def.merge(plain.params)(ids, mask))
    assert out.tobytes() == ref.tobytes()


def _encode(tokenizer, texts):
    enc = tokenizer(texts, padding=True)
    return jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"])


@pytest.fixture(scope="module")
def text_run(make_tiny_config, tmp_path_factory):
    """3 steps of strategy=lora on the tiny BERT: (config, workdir, results, initial params)."""
    from sft_jax.tasks.text import TextClassifier
    from sft_jax.train import train_and_evaluate

    config = _lora_config(make_tiny_config(tmp_path_factory.mktemp("text_data")))
    before = TextClassifier(config, 2).params  # the model as the run starts it (same seed, same head)
    workdir = tmp_path_factory.mktemp("text_run")
    return config, workdir, train_and_evaluate(config, str(workdir)), before


def test_bert_lora_trains_adapters_and_head_only(text_run):
    _, workdir, results, before = text_run
    assert np.isfinite(results["eval/loss"])
    _check_run(before, _restore(workdir, before), results)


def test_predict_from_a_lora_text_run(text_run):
    """Predictor rebuilds the adapters from config.json; its predictions are those of the run's eval, and
    match the model with the adapters merged into the kernels."""
    from sft_jax.predict import Predictor
    from sft_jax.tasks.text import TextClassifier

    config, workdir, results, before = text_run
    records = [json.loads(line) for line in pathlib.Path(config.data.eval).read_text().splitlines()]
    texts = [r["text"] for r in records]
    rows = Predictor(str(workdir)).predict(texts)
    accuracy = np.mean([row["label"] == r["label"] for row, r in zip(rows, records)])
    assert accuracy == pytest.approx(results["eval/accuracy"])
    plain = TextClassifier(_plain(config), 2)
    merged = merge_lora(_restore(workdir, before), alpha=config.lora.alpha)
    logits = np.asarray(plain.model_def.merge(merged)(*_encode(plain.tokenizer, texts)))
    labels = json.loads((pathlib.Path(workdir) / "labels.json").read_text())["labels"]
    assert [row["label"] for row in rows] == [labels[i] for i in logits.argmax(-1)]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose([[row["probabilities"][k] for k in labels] for row in rows], probs, atol=1e-5)


def test_targets_matching_nothing_is_one_line(tiny_config):
    from sft_jax.train import train_and_evaluate

    config = _lora_config(tiny_config)
    config.lora.targets = r"attn/q$"  # a decoder's name: no such module in an encoder
    with pytest.raises(ValueError, match=r"^config\.lora\.targets: 'attn/q\$' matches no linear layer") as e:
        train_and_evaluate(config, str(pathlib.Path(config.data.train).parent / "run"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key, value, expected", [
    ("lora.targets", "head|query", "config.lora.targets: 'head|query' matches the classifier head"),
    ("lora.targets", "(", "config.lora.targets: '(' is not a regex"),
    ("lora.dropout", 0.1, "config.lora.dropout: adapter dropout is implemented for decoders only"),
])
def test_refused_lora_options(tiny_config, key, value, expected):
    from sft_jax.config_defaults import validate

    config = _lora_config(tiny_config)
    config.lora[key.split(".")[1]] = value
    with pytest.raises(ValueError, match="^" + expected.replace("(", r"\(").replace("|", r"\|")):
        validate(config)


def test_user_targets_win_and_modernbert_defaults():
    """A given regex picks exactly its layers; the default covers ModernBERT's GeGLU gate too."""
    from sft_jax.models.classifier import EncoderClassifier
    from sft_jax.models.modernbert import ModernBertConfig, ModernBertEncoder

    def classifier():
        config = ModernBertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, pad_token_id=1)
        return EncoderClassifier(ModernBertEncoder(config, rngs=nnx.Rngs(0)), 32, 3, rngs=nnx.Rngs(0))

    lora = {"rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": DEFAULT_TARGETS}
    names = add_lora(classifier(), {"strategy": "lora", "lora": lora, "seed": 0})
    assert sorted(names) == sorted(f"encoder/layers/{i}/{p}" for i in range(2) for p in (*PROJECTIONS, "mlp/gate"))
    names = add_lora(classifier(), {"strategy": "lora", "lora": {**lora, "targets": r"layers/1/mlp/down$"},
                                    "seed": 0})
    assert names == ["encoder/layers/1/mlp/down"]
    assert add_lora(classifier(), {"strategy": "full", "lora": lora, "seed": 0}) == []
    assert ENCODER_LORA_TARGETS != DEFAULT_TARGETS


# ----------------------------------------------------------------------------------------------- image


def _write_folder(root: pathlib.Path, per_class: int, seed: int) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, colour in COLOURS.items():
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 30, (8, 8, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / label / f"{i:03d}.png")
    return str(root)


@pytest.fixture(scope="module")
def image_run(image_config, tmp_path_factory):
    """3 steps of strategy=lora on a tiny vit-scratch: (config, workdir, results, initial params, the task)."""
    from sft_jax import tasks
    from sft_jax.rundir import RunDir
    from sft_jax.train import train_and_evaluate

    root = tmp_path_factory.mktemp("image_data")
    config = image_config(_write_folder(root / "train", 6, 0), _write_folder(root / "eval", 3, 1))
    config.strategy, config.lora.rank = "lora", 4
    config.max_steps = config.eval_every = config.checkpoint_every = 3
    probe = tmp_path_factory.mktemp("probe")
    task = tasks.get("image_classification")(config, RunDir(probe))  # the model as the run starts it
    workdir = tmp_path_factory.mktemp("image_run")
    return config, workdir, train_and_evaluate(config, str(workdir)), task.params, task


def test_vit_lora_starts_as_a_no_op_and_trains_adapters_and_head_only(image_run, tmp_path):
    from sft_jax import tasks
    from sft_jax.rundir import RunDir

    config, workdir, results, before, task = image_run
    adapted = sorted({n.rsplit("/", 1)[0] for n in before if n.endswith("/lora_a")})
    assert adapted == sorted(f"vit/layers/{i}/{p}" for i in range(2) for p in PROJECTIONS)
    plain = tasks.get("image_classification")(_plain(config), RunDir(tmp_path))
    pixels = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 8, 3)), jnp.float32)
    out = np.asarray(task.model_def.merge(before)(pixels))
    assert out.tobytes() == np.asarray(plain.model_def.merge(plain.params)(pixels)).tobytes()
    _check_run(before, _restore(workdir, before), results)


def test_image_lora_run_predicts_and_seeds_the_next_run(image_run, tmp_path):
    """ImagePredictor keeps the adapters; a run from the LoRA run's workdir gets its backbone merged."""
    from sft_jax import tasks
    from sft_jax.predict import ImagePredictor
    from sft_jax.rundir import RunDir

    config, workdir, results, before, _ = image_run
    eval_dir = pathlib.Path(config.data.eval)
    paths = sorted(str(p) for p in eval_dir.glob("*/*.png"))
    rows = ImagePredictor(str(workdir)).predict(paths)
    accuracy = np.mean([row["label"] == pathlib.Path(p).parent.name for row, p in zip(rows, paths)])
    assert accuracy == pytest.approx(results["eval/accuracy"])
    follow = config.copy_and_resolve_references()
    follow.model, follow.strategy = str(workdir), "lora"
    task = tasks.get("image_classification")(follow, RunDir(tmp_path))
    merged = merge_lora(_restore(workdir, before), alpha=config.lora.alpha)
    for name, value in merged.items():  # fresh adapters on the merged backbone; the source head kept
        np.testing.assert_array_equal(np.asarray(task.params[name]), np.asarray(value), err_msg=name)
    assert sorted(n for n in task.params if n not in merged) == sorted(n for n in before if "/lora_" in n)
