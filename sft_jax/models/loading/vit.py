"""Load Hugging Face ViT checkpoints (`ViTModel`, `ViTForImageClassification`) into `sft_jax.models.vit`.

Published checkpoints (and transformers' `save_pretrained`) use the names
`[vit.]encoder.layer.N.attention.attention.query.weight`; the module names of transformers >= 5
(`layers.N.attention.q_proj.weight`) are accepted too. The `vit.` prefix of `ViTForImageClassification`
is detected. The patch projection is a Conv2d [hidden, C, P, P] in the checkpoint and a linear map of
(row, column, channel)-flattened patches here.
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sft_jax.models.loading.files import read_json_object
from sft_jax.models.loading.hf import read_weights, weights_file
from sft_jax.models.loading.unused import describe_unused, non_weights, unused_tensors
from sft_jax.models.vit import ViT, ViTConfig

_PREFIXES = ("", "vit.", "model.")

# (our module path, HF module names: published layout first, transformers 5 layout second).
_MODULE_RULES = (
    (r"embeddings/patch", (r"embeddings.patch_embeddings.projection",)),
    (r"layers/(\d+)/attention_norm", (r"encoder.layer.\1.layernorm_before", r"layers.\1.layernorm_before")),
    (r"layers/(\d+)/attention/(query|key|value)", (r"encoder.layer.\1.attention.attention.\2",)),
    (r"layers/(\d+)/attention/out", (r"encoder.layer.\1.attention.output.dense", r"layers.\1.attention.o_proj")),
    (r"layers/(\d+)/mlp_norm", (r"encoder.layer.\1.layernorm_after", r"layers.\1.layernorm_after")),
    (r"layers/(\d+)/mlp/up", (r"encoder.layer.\1.intermediate.dense", r"layers.\1.mlp.fc1")),
    (r"layers/(\d+)/mlp/down", (r"encoder.layer.\1.output.dense", r"layers.\1.mlp.fc2")),
    (r"norm", (r"layernorm",)),
)
_NEW_QKV = {"query": "q_proj", "key": "k_proj", "value": "v_proj"}
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _candidates(path: str) -> list[str]:
    """HF tensor names (without prefix) that may hold our parameter `path` ("layers/0/mlp/up/kernel")."""
    if path in ("embeddings/cls_token", "embeddings/position_embeddings"):
        return [path.replace("/", ".")]
    module, leaf = path.rsplit("/", 1)
    for pattern, templates in _MODULE_RULES:
        match = re.fullmatch(pattern, module)
        if match:
            names = [match.expand(t) for t in templates]
            if module.split("/")[-1] in _NEW_QKV:
                names.append(f"layers.{match.group(1)}.attention.{_NEW_QKV[match.group(2)]}")
            return [f"{n}.{_LEAF_NAMES[leaf]}" for n in names]
    raise KeyError(f"no Hugging Face name rule for parameter {path!r}")


def _convert(path: str, value: np.ndarray) -> np.ndarray:
    if path == "embeddings/patch/kernel":  # Conv2d [H, C, P, P] -> [P*P*C, H], patches flattened (row, col, chan)
        h = value.shape[0]
        return value.transpose(2, 3, 1, 0).reshape(-1, h)
    if path.endswith("/kernel"):
        return value.T  # torch Linear stores [out, in]
    return value


def _detect_prefix(weights: dict[str, Any]) -> str:
    for prefix in _PREFIXES:
        if f"{prefix}embeddings.cls_token" in weights:
            return prefix
    return ""


def fill_state(weights: dict[str, np.ndarray], abstract_state: nnx.State, config: ViTConfig, *,
               source: str, prefix: str = "", ignore=(), where: str = "the checkpoint") -> nnx.State:
    """Fills an abstract ViT state (from `nnx.eval_shape`) with HF-named `weights`; `prefix` ("vit.")
    is prepended to every name. Raises ValueError naming every missing or mis-shaped tensor, and every tensor
    left unread (of `where`, the weights file) that is neither in `unused.NON_WEIGHTS["vit"]` (the pooler; the
    classifier, which `load_vit_head` reads) nor matched by a regex of `ignore` (re.search)."""
    missing, mismatched, filled, used = [], [], [], set()
    for path, variable in nnx.to_flat_state(abstract_state):
        name_path = "/".join(str(p) for p in path)
        names = [prefix + n for n in _candidates(name_path)]
        name = next((n for n in names if n in weights), None)
        if name is None:
            if not config.qkv_bias and re.search(r"attention/(query|key|value)/bias$", name_path):
                value = np.zeros(variable.shape, np.float32)  # qkv_bias=False: no tensor, a zero bias
            else:
                missing.append(names[0])
                continue
        else:
            used.add(name)
            value = _convert(name_path, weights[name])
        if value.shape != tuple(variable.shape):
            mismatched.append(f"{name}: checkpoint {tuple(weights[name].shape)}, expected {tuple(variable.shape)}")
            continue
        filled.append((path, variable.replace(value=jnp.asarray(value, jnp.float32))))
    unused = unused_tensors(weights, used, allow=non_weights("vit"), ignore=ignore)
    if missing or mismatched or unused:
        problems = ([f"missing keys: {', '.join(missing)}"] if missing else []) + (
            [f"shape mismatches: {'; '.join(mismatched)}"] if mismatched else []) + (
            [describe_unused(unused, where)] if unused else [])
        raise ValueError(f"{source}: cannot load ViT weights; {'. '.join(problems)}")
    return nnx.from_flat_state(filled)


def read_vit_config(model_dir: str | os.PathLike, *, dtype: Any = jnp.float32) -> tuple[ViTConfig, dict]:
    """(ViTConfig, the raw config.json dict) of a Hugging Face ViT directory."""
    path = pathlib.Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json")
    raw = read_json_object(path)
    if raw.get("model_type", "vit") != "vit":
        raise ValueError(f"{path}: model_type {raw.get('model_type')!r} is not a ViT ('vit')")
    return ViTConfig.from_hf(raw, dtype=dtype), raw


def load_vit(model_dir: str | os.PathLike, *, dtype: Any = jnp.float32,
             weights: dict[str, np.ndarray] | None = None, ignore=()) -> tuple[ViT, ViTConfig]:
    """The encoder of a HF `ViTModel` / `ViTForImageClassification` directory (its pooler is not used; its head
    is `load_vit_head`'s). Any other tensor left unread is an error unless a regex of `ignore` matches it."""
    config, _ = read_vit_config(model_dir, dtype=dtype)
    weights = read_weights(model_dir) if weights is None else weights
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: ViT(config, rngs=nnx.Rngs(0))))
    state = fill_state(weights, abstract_state, config, source=str(model_dir), prefix=_detect_prefix(weights),
                       ignore=ignore, where=weights_file(model_dir).name)
    return nnx.merge(graphdef, state), config


def load_vit_head(model_dir: str | os.PathLike, weights: dict[str, np.ndarray] | None = None
                  ) -> tuple[dict[str, np.ndarray], list[str]] | None:
    """`ViTForImageClassification`'s classifier as {"kernel": [H, L], "bias": [L]} and its labels
    (id2label in id order), or None when the checkpoint has no classifier."""
    weights = read_weights(model_dir) if weights is None else weights
    if "classifier.weight" not in weights:
        return None
    _, raw = read_vit_config(model_dir)
    n = weights["classifier.weight"].shape[0]
    id2label = {int(k): v for k, v in raw.get("id2label", {}).items()}
    labels = [id2label.get(i, f"LABEL_{i}") for i in range(n)]
    return {"kernel": weights["classifier.weight"].T, "bias": weights["classifier.bias"]}, labels


def image_normalisation(model_dir: str | os.PathLike) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) per channel from the checkpoint's `preprocessor_config.json`, or None without one."""
    path = pathlib.Path(model_dir) / "preprocessor_config.json"
    if not path.is_file():
        return None
    raw = read_json_object(path)
    if raw.get("do_normalize", True) is False:
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if "image_mean" not in raw or "image_std" not in raw:
        return None
    return tuple(float(x) for x in raw["image_mean"]), tuple(float(x) for x in raw["image_std"])
