"""sft_jax parameter names -> Hugging Face tensor names and layouts for the classifiers' encoders: the
inverse of the loaders' tables (`models/loading/hf.py`, `models/loading/vit.py`), as `Tensor`s that convert
one parameter when written (`safetensors_stream`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from sft_jax.models.loading import hf as hf_loading
from sft_jax.models.loading import vit as vit_loading
from sft_jax.models.loading.safetensors_stream import Tensor

_LEAF = {"embedding": "weight", "kernel": "weight", "scale": "weight", "bias": "bias"}


def _host(params: Mapping[str, Any], name: str) -> np.ndarray:
    """One parameter on the host in float32 (a bfloat16 master copy included)."""
    return np.asarray(jax.device_get(params[name]), np.float32)


def _torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    return value.T if leaf == "kernel" else value  # torch Linear stores [out, in]


def _shape(params: Mapping[str, Any], name: str) -> tuple[int, ...]:
    shape = tuple(params[name].shape)
    return shape[::-1] if name.endswith("/kernel") else shape


def _one(params, name: str, hf: str) -> Tensor:
    leaf = name.rsplit("/", 1)[1]
    return Tensor(hf, _shape(params, name), np.float32, lambda: _torch_layout(leaf, _host(params, name)))


def _fused(params, names: list[str], hf: str) -> Tensor:
    """HF's fused projection (ModernBERT's Wqkv, Wi): our separate ones stacked along the output rows."""
    leaf = names[0].rsplit("/", 1)[1]
    shapes = [_shape(params, n) for n in names]
    shape = (sum(s[0] for s in shapes), *shapes[0][1:])
    return Tensor(hf, shape, np.float32,
                  lambda: np.concatenate([_torch_layout(leaf, _host(params, n)) for n in names], axis=0))


def bert_tensors(params: Mapping[str, Any], *, under: str, prefix: str) -> list[Tensor]:
    """The BERT / RoBERTa / XLM-RoBERTa encoder held under `under` ("encoder/") as HF tensors named with
    `prefix` ("bert.", "roberta.")."""
    out = []
    for name in params:
        if not name.startswith(under):
            continue
        module, leaf = name[len(under):].rsplit("/", 1)
        hf_module, _ = hf_loading._hf_module(module, hf_loading._MODULE_RULES)
        out.append(_one(params, name, f"{prefix}{hf_module}.{_LEAF[leaf]}"))
    return out


def modernbert_tensors(params: Mapping[str, Any], *, under: str, prefix: str) -> list[Tensor]:
    """The ModernBERT encoder under `under` as HF tensors: query, key, value fused into Wqkv, gate and up into
    Wi (in the chunk order the loader splits them)."""
    fused: dict[str, list[tuple[int, str]]] = {}
    out = []
    for name in params:
        if not name.startswith(under):
            continue
        module, leaf = name[len(under):].rsplit("/", 1)
        hf_module, chunk = hf_loading._hf_module(module, hf_loading._MODERNBERT_RULES)
        hf = f"{prefix}{hf_module}.{_LEAF[leaf]}"
        if chunk is None:
            out.append(_one(params, name, hf))
        else:
            if hf not in fused:
                out.append(hf)  # a placeholder keeps the tensor in order; filled below
                fused[hf] = []
            fused[hf].append((chunk[0], name))
    return [_fused(params, [n for _, n in sorted(fused[t])], t) if isinstance(t, str) else t for t in out]


def _vit_name(path: str) -> str:
    """The published (`encoder.layer.N...`) HF name of a ViT parameter path, without the "vit." prefix."""
    return vit_loading._candidates(path)[0]


def _vit_patch(value: np.ndarray, patch: int, channels: int) -> np.ndarray:
    """Our [(row, column, channel)-flattened patch, hidden] kernel -> the Conv2d weight [hidden, C, P, P]."""
    return value.reshape(patch, patch, channels, -1).transpose(3, 2, 0, 1)


def vit_tensors(params: Mapping[str, Any], *, under: str, prefix: str, patch: int, channels: int,
                qkv_bias: bool) -> list[Tensor]:
    """The ViT encoder under `under` ("vit/") as HF tensors named with `prefix` ("vit."). Without `qkv_bias`
    the (zero) query, key, value biases are left out, as HF's ViT has none then."""
    out = []
    for name in params:
        if not name.startswith(under):
            continue
        path = name[len(under):]
        if not qkv_bias and re.search(r"attention/(query|key|value)/bias$", path):
            continue
        hf = prefix + _vit_name(path)
        if path == "embeddings/patch/kernel":
            hidden = params[name].shape[1]
            out.append(Tensor(hf, (hidden, channels, patch, patch), np.float32,
                              lambda name=name: _vit_patch(_host(params, name), patch, channels)))
        else:
            out.append(_one(params, name, hf))
    return out


def head_tensors(params: Mapping[str, Any], *, head: str = "head/", name: str = "classifier") -> list[Tensor]:
    """The linear classification head as `classifier.weight` [labels, hidden] and `classifier.bias`."""
    return [_one(params, f"{head}kernel", f"{name}.weight"), _one(params, f"{head}bias", f"{name}.bias")]


