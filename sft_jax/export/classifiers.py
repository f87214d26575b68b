"""Text and image classifiers of sft_jax runs as Hugging Face model folders, with `id2label` / `label2id`
from the run's labels.json.

Where a stock transformers class computes exactly the trained head, the folder is that class (the ViT with
[CLS] pooling: `ViTForImageClassification` classifies the final-normed [CLS] state with one linear layer, as
sft_jax does). No stock text classifier does: `BertForSequenceClassification` and RoBERTa's put a trained
dense + tanh layer before the classifier, ModernBERT's a dense + activation + norm, and sft_jax's heads pool
([CLS] or the masked mean) straight into one linear layer. Those folders carry a small config and model class
(`remote_code`) over the stock encoder, loaded with `trust_remote_code=True`. The weights are written one
tensor at a time (`safetensors_stream`).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from sft_jax.export import hf_names, model_card, remote_code
from sft_jax.models.loading.safetensors_stream import write_safetensors
from sft_jax.rundir import RunDir

WEIGHTS = "model.safetensors"


def _labels(labels: list[str]) -> dict[str, Any]:
    return {"id2label": {str(i): label for i, label in enumerate(labels)},
            "label2id": {label: i for i, label in enumerate(labels)},
            "problem_type": "single_label_classification"}


def _write_config(out: pathlib.Path, config: dict[str, Any]) -> None:
    (out / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True))


def _lora_merged(params: dict, run: dict) -> dict:
    """The adapters of a strategy=lora run folded into their kernels (only the adapted kernels are new)."""
    if run.get("strategy") != "lora":
        return params
    from sft_jax.models.lora import LoraConfig, merge_lora

    return merge_lora(params, alpha=LoraConfig.from_any(run["lora"]).alpha)


def export_text_classifier(workdir: str, out: str | os.PathLike, checkpoint: str = "best") -> pathlib.Path:
    """A text_classification run as a HF folder that `pipeline("text-classification", model=out,
    trust_remote_code=True)` loads offline: config.json (the base model's, plus labels, pooling and auto_map),
    the modelling code, model.safetensors, the tokenizer files and README.md."""
    import ml_collections

    from sft_jax.tasks.text import TextClassifier

    rundir = RunDir(workdir)
    run = rundir.read_config()
    labels = rundir.read_labels().labels
    model = TextClassifier(ml_collections.ConfigDict(run), len(labels))
    params = _lora_merged(rundir.restore_params(model.params, checkpoint), run)
    model.params = None  # the base weights the checkpoint replaced: not kept beside the trained ones
    base_config = json.loads((pathlib.Path(model.model_dir) / "config.json").read_text())
    model_type = base_config.get("model_type", "bert")
    family = remote_code.FAMILIES[model_type]
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    encoder = (hf_names.modernbert_tensors if model_type == "modernbert" else hf_names.bert_tensors)(
        params, under="encoder/", prefix=f"{family.attr}.")
    write_safetensors(out / WEIGHTS, encoder + hf_names.head_tensors(params))
    del params
    config = {k: v for k, v in base_config.items() if k not in ("architectures", "auto_map", "_name_or_path")}
    config.update(_labels(labels), model_type=family.model_type, architectures=[family.head_class],
                  auto_map=remote_code.write(out, family), pooling=run["pooling"],
                  head_dropout=float(run.get("head_dropout", 0.0)))
    _write_config(out, config)
    model.tokenizer.model_max_length = model.max_length  # pipeline(..., truncation=True) cuts where sft_jax did
    model.tokenizer.save_pretrained(str(out))
    model_card.write(out, workdir, what=f"A {len(labels)}-class text classifier ({model_type}, "
                     f"{run['pooling']} pooling; modelling code included)", usage=f'''
from transformers import pipeline

classify = pipeline("text-classification", model="{out}", trust_remote_code=True)
classify("a gorgeous film", top_k=None)''')
    return out


def _vit_hf_config(vit_config) -> dict[str, Any]:
    keys = ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "hidden_act", "layer_norm_eps", "hidden_dropout_prob",
            "attention_probs_dropout_prob", "qkv_bias")
    return {"model_type": "vit", "dtype": "float32", **{k: getattr(vit_config, k) for k in keys}}


def _preprocessor(size: int, mean, std) -> dict[str, Any]:
    """sft_jax's image input: bilinear resize to size x size, x / 255, then (x - mean) / std per channel."""
    return {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
            "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(mean), "image_std": list(std), "do_convert_rgb": True}


def export_image_classifier(workdir: str, out: str | os.PathLike, checkpoint: str = "best") -> pathlib.Path:
    """An image_classification run as a HF folder for `pipeline("image-classification", model=out)`: the stock
    `ViTForImageClassification` for [CLS] pooling, otherwise with modelling code (`trust_remote_code=True`)."""
    from sft_jax.state import ModelDef
    from sft_jax.tasks.image_model import load_image_run

    run = RunDir(workdir).read_config()
    model, head, spec = load_image_run(workdir, checkpoint, merge=True)
    _, params = ModelDef.split(model)
    del model
    vit = spec.vit_config
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = hf_names.vit_tensors(params, under="vit/", prefix="vit.", patch=vit.patch_size,
                                   channels=vit.num_channels, qkv_bias=vit.qkv_bias)
    write_safetensors(out / WEIGHTS, tensors + hf_names.head_tensors(params))
    del params
    config = _vit_hf_config(vit) | _labels(head.labels)
    stock = head.pooling == "cls"
    if stock:
        config["architectures"] = ["ViTForImageClassification"]
    else:
        family = remote_code.FAMILIES["vit"]
        config.update(model_type=family.model_type, architectures=[family.head_class],
                      auto_map=remote_code.write(out, family), pooling=head.pooling,
                      head_dropout=float(run.get("head_dropout", 0.0)))
    _write_config(out, config)
    (out / "preprocessor_config.json").write_text(
        json.dumps(_preprocessor(vit.image_size, spec.mean, spec.std), indent=1))
    trust = "" if stock else ", trust_remote_code=True"
    kind = "stock ViTForImageClassification" if stock else "modelling code included"
    model_card.write(out, workdir, what=f"A {len(head.labels)}-class ViT image classifier ({head.pooling} pooling; "
                     f"{kind})", usage=f'''
from transformers import pipeline

classify = pipeline("image-classification", model="{out}"{trust})
classify("dog.jpg", top_k=None)''')
    return out
