"""What `config.model` means for image classification, and building the classifier it names.

`config.model` is one of:
  - `vit-scratch`: a randomly initialised ViT sized by `config.vit.*` (to pre-train a base where no weights exist);
  - a Hugging Face ViT directory (or hub id): its encoder, normalisation from `preprocessor_config.json`,
    and for `ViTForImageClassification` its head and labels;
  - the workdir of an earlier sft_jax image run: its best checkpoint, labels and normalisation.
A head and labels that come with the model form its *source head*: kept when the run's labels are the same,
and otherwise the original head of the forgetting probe (accuracy on the source classes before and after).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sft_jax.models.lora import LoraConfig, merge_lora
from sft_jax.models.vit import ImageClassifier, ViT, ViTConfig
from sft_jax.rundir import RunDir
from sft_jax.state import ModelDef
from sft_jax.tasks.classification import add_lora

VIT_SCRATCH = "vit-scratch"


@dataclasses.dataclass
class SourceHead:
    """The classification head a model came with: its labels, pooling and weights."""

    labels: list[str]
    pooling: str
    kernel: np.ndarray
    bias: np.ndarray


@dataclasses.dataclass
class ImageModelSpec:
    """A resolved `config.model`: architecture and normalisation, without weights."""

    kind: str  # "scratch" | "hf" | "run"
    path: str
    vit_config: ViTConfig
    mean: tuple[float, ...]
    std: tuple[float, ...]
    run_config: dict | None = None  # kind == "run": the earlier run's config.json


def resolve_image_model(model: str, vit: Mapping[str, Any], image: Mapping[str, Any],
                        dtype: Any = jnp.float32) -> ImageModelSpec:
    """Architecture and normalisation of `model` (see the module doc); `vit` and `image` are the config's
    `vit.*` and `image.*` (sizes for `vit-scratch`; mean/std when the checkpoint has none)."""
    default_norm = tuple(image["mean"]), tuple(image["std"])
    if model == VIT_SCRATCH:
        return ImageModelSpec("scratch", model, ViTConfig(**dict(vit), dtype=dtype), *default_norm)
    if RunDir(model).is_run(labels=True):
        run = RunDir(model).read_config()
        if run.get("task") != "image_classification":
            raise ValueError(f"{model}: a workdir of a {run.get('task')!r} run, not of an image_classification run")
        # The earlier run resolved its own model the same way; its normalisation is the one its weights know.
        inner = resolve_image_model(run["model"], run["vit"], run["image"], dtype)
        return ImageModelSpec("run", model, inner.vit_config, inner.mean, inner.std, run_config=run)
    from sft_jax.models.loading.vit import image_normalisation, read_vit_config
    from sft_jax.models.registry import resolve_model_dir

    model_dir = str(resolve_model_dir(model))
    config, _ = read_vit_config(model_dir, dtype=dtype)
    return ImageModelSpec("hf", model_dir, config, *(image_normalisation(model_dir) or default_norm))


def load_image_run(workdir: str, which: str = "best", *, seed: int = 0, merge: bool = False
                   ) -> tuple[ImageClassifier, SourceHead, ImageModelSpec]:
    """The classifier of an image run's workdir with its `which` checkpoint ("best", falling back to
    "latest" while a run has not evaluated yet), its head and labels, and its resolved spec.

    A strategy=lora run comes back with its adapters as trained; with `merge` they are folded into the
    kernels (a plain ViT again, as an earlier run's backbone is for the next run)."""
    rundir = RunDir(workdir)
    if not rundir.is_run(labels=True):
        raise FileNotFoundError(f"{workdir}: not the workdir of a run (needs config.json, labels.json, "
                                "checkpoints)")
    run = rundir.read_config()
    spec = resolve_image_model(workdir, run["vit"], run["image"])
    labels = rundir.read_labels().labels

    def classifier() -> ImageClassifier:
        return ImageClassifier(ViT(spec.vit_config, rngs=nnx.Rngs(seed)), len(labels), pooling=run["pooling"],
                               dropout=run["head_dropout"], rngs=nnx.Rngs(seed))

    module = classifier()
    adapted = add_lora(module, run)
    model_def, params = ModelDef.split(module)
    params = rundir.restore_params(params, which)
    if adapted and merge:
        params = merge_lora(params, alpha=LoraConfig.from_any(run["lora"]).alpha)
        model_def = ModelDef.split(nnx.eval_shape(classifier))[0]  # the plain layers, no weights drawn
    head = SourceHead(labels, run["pooling"], np.asarray(params["head/kernel"]), np.asarray(params["head/bias"]))
    return model_def.merge(params), head, spec


def load_backbone(spec: ImageModelSpec, seed: int = 0, ignore_weights: tuple[str, ...] = ()
                  ) -> tuple[ViT, SourceHead | None]:
    """The ViT of `spec` with its weights (random for `vit-scratch`) and its source head, if any. A checkpoint
    tensor neither of them uses is an error unless a regex of `ignore_weights` (re.search) matches it."""
    if spec.kind == "scratch":
        return ViT(spec.vit_config, rngs=nnx.Rngs(seed)), None
    if spec.kind == "run":
        classifier, head, _ = load_image_run(spec.path, seed=seed, merge=True)
        return classifier.vit, head
    from sft_jax.models.loading.hf import read_weights
    from sft_jax.models.loading.vit import load_vit, load_vit_head

    weights = read_weights(spec.path)
    vit, _ = load_vit(spec.path, dtype=spec.vit_config.dtype, weights=weights, ignore=ignore_weights)
    found = load_vit_head(spec.path, weights)
    head = None if found is None else SourceHead(found[1], "cls", found[0]["kernel"], found[0]["bias"])
    return vit, head


def build_classifier(vit: ViT, labels: list[str], source: SourceHead | None, *, pooling: str, dropout: float,
                     seed: int, grow: bool = False) -> ImageClassifier:
    """`vit` with a head for `labels`: the source head when its labels and pooling are the same, else fresh;
    with `grow` (a head over given labels), each label the source head has keeps its output weights and the
    others start fresh."""
    module = ImageClassifier(vit, len(labels), pooling=pooling, dropout=dropout, rngs=nnx.Rngs(seed))
    if source is None or source.pooling != pooling:
        return module
    if source.labels == list(labels):
        module.head.kernel.value = jnp.asarray(source.kernel)
        module.head.bias.value = jnp.asarray(source.bias)
    elif grow:
        kernel, bias = np.array(module.head.kernel.value), np.array(module.head.bias.value)
        for i, label in enumerate(labels):
            if label in source.labels:
                kernel[:, i] = source.kernel[:, source.labels.index(label)]
                bias[i] = source.bias[source.labels.index(label)]
        module.head.kernel.value, module.head.bias.value = jnp.asarray(kernel), jnp.asarray(bias)
    return module
