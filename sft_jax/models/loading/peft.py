"""PEFT LoRA adapter files: the adapters alone, in the layout `peft.PeftModel` reads and writes
(adapter_model.safetensors + adapter_config.json, Hugging Face module names). The adapter modules and their
math are `sft_jax.models.lora`.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sft_jax.models.loading.files import damaged_weights, read_json_object
from sft_jax.models.loading.lm import hf_name
from sft_jax.models.loading.unused import describe_unused, unused_tensors
from sft_jax.models.lora import LoraConfig, _module_path, apply_lora

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
_PEFT_PREFIX = "base_model.model."


def _peft_module(module: str, family: str) -> str:
    return hf_name(module + "/kernel", family)[0].removesuffix(".weight")


def save_adapters(params: Mapping[str, Any], config: LoraConfig | Mapping[str, Any], out_dir: str | os.PathLike, *,
                  family: str = "llama", base_model: str = "") -> pathlib.Path:
    """Writes only the adapters as a PEFT LoRA directory (`PeftModel.from_pretrained` loads it).

    adapter_model.safetensors holds `base_model.model.<HF module>.lora_A.weight` [r, in] and `lora_B.weight`
    [out, r] (PyTorch's [out, in] layout, i.e. our matrices transposed); adapter_config.json holds r,
    lora_alpha, lora_dropout and target_modules (the HF module names; a full-match regex when only some
    layers are adapted).

    Args:
      params: flat {our path: array}, e.g. a train state's params; only `*/lora_a`, `*/lora_b` are read.
      config: the LoRA settings (rank, alpha, dropout), e.g. a run's `config.lora`.
      family: the decoder family ("llama" or "gemma3"), for Hugging Face names.
      base_model: written as `base_model_name_or_path`.
    """
    from safetensors.numpy import save_file

    if family == "phi3":  # its q/k/v (gate/up) adapters would have to be fused into rank-stacked ones
        raise ValueError("save_adapters: Phi-3 fuses its q, k, v and gate, up projections; PEFT adapter files "
                         "for it are not written (export_hf writes the model with the adapters merged)")
    cfg = LoraConfig.from_any(config)
    modules = sorted(name[: -len("/lora_a")] for name in params if name.endswith("/lora_a"))
    if not modules:
        raise ValueError("save_adapters: the parameters hold no LoRA adapters")
    tensors, hf_modules = {}, []
    for module in modules:
        a = np.asarray(jax.device_get(params[module + "/lora_a"]), np.float32)
        b = np.asarray(jax.device_get(params[module + "/lora_b"]), np.float32)
        if a.shape[1] != cfg.rank:
            raise ValueError(f"save_adapters: {module}/lora_a has rank {a.shape[1]}, the config says {cfg.rank}")
        hf = _peft_module(module, family)
        hf_modules.append(hf)
        tensors[f"{_PEFT_PREFIX}{hf}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"{_PEFT_PREFIX}{hf}.lora_B.weight"] = np.ascontiguousarray(b.T)
    # PEFT matches a list of target_modules by name suffix (in every layer), a string by re.fullmatch: the
    # list only when it names exactly the adapted projections among all those of the model.
    suffixes = sorted({m.rsplit(".", 1)[1] for m in hf_modules})
    same_kind = set()
    for name in params:
        if name.endswith("/kernel"):
            try:
                hf = _peft_module(name[: -len("/kernel")], family)
            except KeyError:
                continue
            if hf.rsplit(".", 1)[1] in suffixes:
                same_kind.add(hf)
    target_modules = suffixes if same_kind == set(hf_modules) else "|".join(re.escape(m) for m in hf_modules)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": target_modules,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": None,
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=1))
    return out


def load_adapters(model: nnx.Module, adapter_dir: str | os.PathLike, *, family: str | None = None,
                  rngs: nnx.Rngs | None = None) -> LoraConfig:
    """Adds the adapters of a PEFT LoRA directory to `model` (a base model, changed in place).

    The adapted projections are exactly those named in adapter_model.safetensors; r, lora_alpha and
    lora_dropout come from adapter_config.json. Returns the LoRA settings (`targets` is a regex naming
    the adapted module paths).
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = pathlib.Path(adapter_dir)
    peft_config = read_json_object(path / ADAPTER_CONFIG)
    if peft_config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path / ADAPTER_CONFIG}: peft_type {peft_config['peft_type']!r} is not LORA")
    for key in ("use_rslora", "use_dora"):
        if peft_config.get(key):
            raise ValueError(f"{path / ADAPTER_CONFIG}: {key}=true is not supported")
    try:
        tensors = load_file(str(path / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise damaged_weights(path / ADAPTER_WEIGHTS, e, "safetensors") from None
    family = family or getattr(getattr(model, "config", None), "family", "llama")
    if family == "phi3":
        raise ValueError(f"{path}: PEFT adapters of Phi-3's fused projections are not supported")
    # Our module path of each linear layer, through its Hugging Face name.
    ours = {}
    for module_path, m in nnx.iter_modules(model):
        if isinstance(m, nnx.Linear) and module_path:
            try:
                ours[_peft_module(_module_path(module_path), family)] = _module_path(module_path)
            except KeyError:
                continue
    modules, unknown = [], []
    for name in tensors:
        if name.endswith(".lora_A.weight"):
            hf = name.removeprefix(_PEFT_PREFIX).removesuffix(".lora_A.weight")
            (modules if hf in ours else unknown).append(hf)
    if unknown or not modules:
        raise ValueError(f"{path / ADAPTER_WEIGHTS}: no layer of the model for adapters {unknown or 'at all'}")
    # Anything else (PEFT's `modules_to_save` copies of whole layers, embedding adapters) would be dropped: refuse.
    used = {f"{_PEFT_PREFIX}{m}.lora_{ab}.weight" for m in modules for ab in "AB"}
    unused = unused_tensors(tensors, used)
    if unused:
        raise ValueError(f"{path}: cannot load the adapters; " + describe_unused(
            unused, ADAPTER_WEIGHTS, what="not LoRA adapters", why="they would be dropped"))
    cfg = LoraConfig(rank=int(peft_config["r"]), alpha=float(peft_config["lora_alpha"]),
                     dropout=float(peft_config.get("lora_dropout", 0.0)),
                     targets="^(" + "|".join(re.escape(ours[m]) for m in sorted(modules)) + ")$")
    apply_lora(model, cfg.targets, cfg.rank, cfg.alpha, cfg.dropout, rngs=rngs or nnx.Rngs(0))
    state = dict(nnx.iter_modules(model))
    for hf in modules:
        layer = state[tuple(int(p) if p.isdigit() else p for p in ours[hf].split("/"))]
        a = tensors[f"{_PEFT_PREFIX}{hf}.lora_A.weight"].T
        b = tensors[f"{_PEFT_PREFIX}{hf}.lora_B.weight"].T
        if a.shape != layer.lora_a.value.shape or b.shape != layer.lora_b.value.shape:
            raise ValueError(f"{path / ADAPTER_WEIGHTS}: {hf} adapters are {a.T.shape} / {b.T.shape}, expected "
                             f"{layer.lora_a.value.T.shape} / {layer.lora_b.value.T.shape}")
        layer.lora_a.value = jnp.asarray(a, jnp.float32)
        layer.lora_b.value = jnp.asarray(b, jnp.float32)
    return cfg
