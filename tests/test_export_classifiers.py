"""Classifiers out to Hugging Face (`python -m sft_jax.export --format=hf`): for every pooling, the exported
folder loaded by `transformers.pipeline` gives sft_jax's predicted probabilities within 1e-4; the stock class
where it computes the trained head exactly (ViT with [CLS]), the folder's own modelling code otherwise; the
model card; the command line's one-line errors.

Tiny random encoders (BERT, RoBERTa, ModernBERT with MiniLM's tokenizer; a scratch ViT) train a few steps, so
the heads are not their initialisation."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import TINY_BERT, TOKENIZER_FILES

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
TEXTS = ["good movie number 3, fun and great", "bad movie, dull", "a film", "good good good but boring and dull"]


def _tiny_encoder_dir(root: pathlib.Path, family: str, tiny_bert_dir: pathlib.Path) -> pathlib.Path:
    """A random tiny RoBERTa or ModernBERT on the MiniLM tokenizer's vocabulary (pad id 0)."""
    if family == "bert":
        return tiny_bert_dir
    out = root / family
    torch.manual_seed(0)
    if family == "roberta":
        config = transformers.RobertaConfig(**dict(TINY_BERT, max_position_embeddings=130, type_vocab_size=1,
                                                   pad_token_id=0, bos_token_id=101, eos_token_id=102))
        model = transformers.RobertaModel(config, add_pooling_layer=False)
    else:
        config = transformers.ModernBertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=3,
                                               num_attention_heads=4, intermediate_size=48, pad_token_id=0,
                                               cls_token_id=101, sep_token_id=102, bos_token_id=101,
                                               eos_token_id=102, global_attn_every_n_layers=2, local_attention=4)
        model = transformers.ModernBertModel(config)
    with torch.no_grad():  # away from the default init, so a mix-up of norms or biases shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_bert_dir / name, out / name)
    return out


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, make_tiny_config, tiny_bert_dir):
    """`text_run(family, pooling)` -> the workdir of a 2-step run (made once per module; one evaluation and one
    checkpoint, which the export reads)."""
    from sft_jax.train import train_and_evaluate

    made = {}

    def run(family: str, pooling: str, strategy: str = "full") -> pathlib.Path:
        key = (family, pooling, strategy)
        if key not in made:
            root = tmp_path_factory.mktemp(f"{family}_{pooling}_{strategy}")
            c = make_tiny_config(root)
            c.model = str(_tiny_encoder_dir(root, family, tiny_bert_dir))
            c.pooling, c.strategy, c.learning_rate = pooling, strategy, 1e-2
            c.head_dropout = 0.1
            c.max_steps = c.eval_every = c.checkpoint_every = 2
            train_and_evaluate(c, str(root / "workdir"))
            made[key] = root / "workdir"
        return made[key]

    return run


def _pipeline_probs(rows: list[list[dict]], labels: list[str]) -> np.ndarray:
    return np.array([[next(d["score"] for d in row if d["label"] == label) for label in labels] for row in rows])


def _sft_probs(rows: list[dict], labels: list[str]) -> np.ndarray:
    return np.array([[r["probabilities"][label] for label in labels] for r in rows])


# [CLS] pooling is one branch of the pooling code every text family's modelling file shares (remote_code.py):
# RoBERTa takes it, BERT (whose stock pooler the folder must not use) the mean branch, full and LoRA.
@pytest.mark.parametrize("family,pooling,strategy", [("bert", "mean", "full"), ("roberta", "cls", "full"),
                                                     ("modernbert", "mean", "full"), ("bert", "mean", "lora")])
def test_text_pipeline_gives_sft_jax_probabilities(text_run, tmp_path, family, pooling, strategy):
    from sft_jax.export.classifiers import export_text_classifier
    from sft_jax.predict import Predictor

    workdir = text_run(family, pooling, strategy)
    out = export_text_classifier(str(workdir), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    labels = json.loads((workdir / "labels.json").read_text())["labels"]
    assert config["id2label"] == {str(i): label for i, label in enumerate(labels)}
    assert config["label2id"] == {label: i for i, label in enumerate(labels)}
    # No stock text classifier pools straight into one linear layer: the folder's own code, by auto_map.
    assert config["pooling"] == pooling and config["model_type"].startswith("sft_jax_")
    assert "AutoModelForSequenceClassification" in config["auto_map"]
    classify = transformers.pipeline("text-classification", model=str(out), trust_remote_code=True)
    got = _pipeline_probs(classify(TEXTS, top_k=None), labels)
    want = _sft_probs(Predictor(str(workdir)).predict(TEXTS), labels)
    assert np.abs(got - want).max() < TOL, (got, want)
    assert np.abs(want - 0.5).max() > 1e-3  # the head learned something: parity is not that of a blank head


def test_remote_code_is_required(text_run, tmp_path):
    from sft_jax.export.classifiers import export_text_classifier

    out = export_text_classifier(str(text_run("bert", "mean")), tmp_path / "hf")
    with pytest.raises(ValueError):  # never silently the stock class with a random pooler
        transformers.AutoModelForSequenceClassification.from_pretrained(str(out), trust_remote_code=False)


def test_model_card(text_run, tmp_path):
    from sft_jax.export.classifiers import export_text_classifier

    workdir = text_run("bert", "mean")
    run = json.loads((workdir / "config.json").read_text())
    results = json.loads((workdir / "results.json").read_text())
    card = (export_text_classifier(str(workdir), tmp_path / "hf") / "README.md").read_text()
    assert f"| base model | `{run['model']}` |" in card
    assert f"| training data | `{run['data']['train']}` |" in card
    assert "| strategy | full |" in card and "| pooling | mean |" in card
    assert f"| eval/accuracy | {results['eval/accuracy']:.4f} |" in card
    assert run["command"] and run["command"] in card


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, image_config):
    """`image_run(pooling)` -> (workdir, image paths) of a 2-step tiny ViT run on 8x8 colour images."""
    from PIL import Image

    from sft_jax.train import train_and_evaluate

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    records = []
    for label, colour in COLOURS.items():
        for i in range(6):
            pixels = np.clip(np.array(colour) + rng.normal(0, 60, (8, 8, 3)), 0, 255).astype(np.uint8)
            path = root / f"{label}{i}.png"
            Image.fromarray(pixels).save(path)
            records.append({"image": str(path), "label": label})
    manifest = root / "data.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    made = {}

    def run(pooling: str):
        if pooling not in made:
            c = image_config(str(manifest), str(manifest))
            c.pooling = pooling
            c.max_steps = c.eval_every = c.checkpoint_every = 2
            c.image.mean, c.image.std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
            workdir = root / f"workdir_{pooling}"
            train_and_evaluate(c, str(workdir))
            made[pooling] = workdir
        return made[pooling], [r["image"] for r in records[::4]]

    return run


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_image_pipeline_gives_sft_jax_probabilities(image_run, tmp_path, pooling):
    from sft_jax.export.classifiers import export_image_classifier
    from sft_jax.predict import ImagePredictor

    workdir, paths = image_run(pooling)
    out = export_image_classifier(str(workdir), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    labels = json.loads((workdir / "labels.json").read_text())["labels"]
    assert config["id2label"] == {str(i): label for i, label in enumerate(labels)}
    if pooling == "cls":  # the stock class computes exactly this head: no code of our own in the folder
        assert config["architectures"] == ["ViTForImageClassification"] and "auto_map" not in config
        assert not (out / "modeling_sft_jax.py").exists()
        assert type(transformers.AutoModelForImageClassification.from_pretrained(str(out))).__name__ == \
            "ViTForImageClassification"
    else:
        assert "AutoModelForImageClassification" in config["auto_map"]
    classify = transformers.pipeline("image-classification", model=str(out), trust_remote_code=pooling != "cls")
    got = _pipeline_probs(classify(paths, top_k=None), labels)
    want = _sft_probs(ImagePredictor(str(workdir)).predict(paths), labels)
    assert np.abs(got - want).max() < TOL, (got, want)
    assert np.abs(want - 1 / 3).max() > 1e-3


def _export_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sft_jax.export", *args], capture_output=True, text=True,
                          timeout=600, cwd=pathlib.Path(__file__).parents[1])


def _one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_one_line_errors(text_run, tmp_path):
    workdir = str(text_run("bert", "mean"))
    _one_error_line(_export_cli(f"--workdir={tmp_path}", "--format=hf", f"--out={tmp_path / 'o'}"),
                    "not the workdir of a run")
    _one_error_line(_export_cli(f"--workdir={workdir}", "--format=onnx", f"--out={tmp_path / 'o'}"),
                    "--format=onnx", "hf, gguf, peft")
    _one_error_line(_export_cli(f"--workdir={workdir}", "--format=gguf", f"--out={tmp_path / 'o'}"),
                    "text_classification", "--format=hf")
    _one_error_line(_export_cli(f"--workdir={workdir}", "--format=hf"), "--out")
    assert not (tmp_path / "o").exists()
