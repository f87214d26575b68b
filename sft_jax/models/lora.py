"""LoRA: low-rank adapters on frozen projections (Hu et al., 2021), compatible with Hugging Face PEFT.

`apply_lora` swaps chosen `nnx.Linear` layers of a model, in place, for `LoRALinear`, which keeps the base
weight under the same path and adds two small matrices::

    layers/0/attn/q/kernel   [in, out]   the pre-trained weight (frozen by strategy=lora)
    layers/0/attn/q/lora_a   [in, r]     kaiming-uniform, as PEFT
    layers/0/attn/q/lora_b   [r, out]    zeros, so a fresh adapter changes nothing

    y = x @ kernel + dropout(x) @ lora_a @ lora_b * alpha / r

Because base paths are unchanged, pre-trained loading and Hugging Face export names are unchanged too.
`merge_lora` folds the adapters back into the kernels (for export and fast generation); `save_adapters` /
`load_adapters` read and write only the adapters, in PEFT's `adapter_model.safetensors` layout.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sft_jax.models.dropout import dropout
from sft_jax.sharding import logical

DEFAULT_TARGETS = r"layers/\d+/(attn/(q|k|v|o)|mlp/(gate|up|down))$"
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
_PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Adapter hyper-parameters: rank r, scale alpha / r, dropout on the adapter input, and a regex
    (`re.search`) over module paths ("layers/3/attn/q") choosing the adapted projections."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank: must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout: must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_any(cls, value: LoraConfig | Mapping[str, Any] | None) -> LoraConfig:
        """From a LoraConfig, a dict / ConfigDict with (some of) these keys, or None (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        value = value.to_dict() if hasattr(value, "to_dict") else dict(value)
        unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"lora: unknown keys {sorted(unknown)}")
        return cls(**value)


class LoRALinear(nnx.Module):
    """A pre-trained `nnx.Linear` (frozen by strategy=lora) plus a low-rank update; see the module docstring.

    The base product is computed exactly as `nnx.Linear` computes it, so with `lora_b` = 0 the output is
    bit-identical to the base layer's.
    """

    def __init__(self, base: nnx.Linear, rank: int, alpha: float, dropout: float = 0.0, *, rngs: nnx.Rngs):
        n_in, n_out = base.in_features, base.out_features
        # The base variables themselves move over (same values, same metadata such as sharding).
        self.kernel = base.kernel
        self.bias = base.bias
        # PEFT: kaiming_uniform_(a=sqrt(5)) on lora_A.weight [r, in], i.e. U(-1/sqrt(in), 1/sqrt(in)).
        bound = 1.0 / math.sqrt(n_in)
        # Each adapter shares one logical axis with the base kernel (and is sharded like it there).
        axes_in, axes_out = base.kernel.get_metadata().get("out_sharding") or (None, None)
        self.lora_a = nnx.Param(jax.random.uniform(rngs.params(), (n_in, rank), jnp.float32, -bound, bound),
                                **logical(axes_in, "lora_rank"))
        self.lora_b = nnx.Param(jnp.zeros((rank, n_out), jnp.float32), **logical("lora_rank", axes_out))
        self.in_features, self.out_features, self.rank = n_in, n_out, rank
        self.scale = float(alpha) / rank
        self.dropout = float(dropout)
        # What the base layer computes with, kept to reproduce it (and to rebuild it in `merge_lora`).
        self.dtype, self.precision = base.dtype, base.precision
        self.dot_general, self.promote_dtype = base.dot_general, base.promote_dtype
        self.preferred_element_type = base.preferred_element_type

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """x [..., in] -> [..., out]; `rng` switches adapter dropout on (no key: no dropout)."""
        bias = self.bias.value if self.bias is not None else None
        x, kernel, bias = self.promote_dtype((x, self.kernel.value, bias), dtype=self.dtype)
        kwargs = {} if self.preferred_element_type is None else {"preferred_element_type": self.preferred_element_type}
        dims = (((x.ndim - 1,), (0,)), ((), ()))
        y = self.dot_general(x, kernel, dims, precision=self.precision, **kwargs)
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        h = x
        if rng is not None and self.dropout > 0.0:
            h = dropout(h, self.dropout, rng)
        a, b = self.lora_a.value.astype(x.dtype), self.lora_b.value.astype(x.dtype)
        # The base layer's dot for the adapters too (models/mixed.py: float32 accumulation in bfloat16, and
        # lora_b's weight gradient as its own dot; under plain autodiff XLA:CPU fused a strided transpose of
        # the [rows, out] gradient into its producer: SmolLM2 lora float32 step 7.4 -> 5.1 s).
        delta = self.dot_general(self.dot_general(h, a, dims, precision=self.precision), b, dims,
                                 precision=self.precision)
        return y + (delta * self.scale).astype(y.dtype)

    def merged_kernel(self) -> jax.Array:
        """kernel + lora_a @ lora_b * scale, float32 (full-precision product: merging must not round)."""
        delta = jnp.matmul(self.lora_a.value, self.lora_b.value, precision=jax.lax.Precision.HIGHEST)
        return self.kernel.value + delta * self.scale


def _module_path(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _replace(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def apply_lora(model: nnx.Module, targets: str, rank: int, alpha: float, dropout: float = 0.0, *,
               rngs: nnx.Rngs) -> list[str]:
    """Replaces, in place, every `nnx.Linear` whose module path matches `targets` (`re.search`) with a
    `LoRALinear` around it; base weights are untouched. Returns the adapted module paths.

    Raises ValueError when nothing matches (a typo would otherwise train nothing) or when the match is
    `lm_head`, whose kernel the decoder reads directly (tied-embedding layout), bypassing any adapter.
    """
    LoraConfig(rank, alpha, dropout, targets)  # validates
    pattern = re.compile(targets)
    found = [(path, m) for path, m in nnx.iter_modules(model)
             if isinstance(m, nnx.Linear) and pattern.search(_module_path(path))]
    if not found:
        raise ValueError(f"lora.targets: {targets!r} matches no linear layer of {type(model).__name__}")
    names = [_module_path(path) for path, _ in found]
    if "lm_head" in names:
        raise ValueError(f"lora.targets: {targets!r} matches lm_head; LoRA on the LM head is not supported")
    for path, linear in found:
        _replace(model, path, LoRALinear(linear, rank, alpha, dropout, rngs=rngs))
    return names


def has_lora(target: nnx.Module | Mapping[str, Any]) -> bool:
    """Whether a model or a flat {path: array} dict holds LoRA adapters."""
    if isinstance(target, nnx.Module):
        return any(isinstance(m, LoRALinear) for _, m in nnx.iter_modules(target))
    return any(name.endswith(("/lora_a", "/lora_b")) for name in target)


def merge_lora(target: nnx.Module | Mapping[str, Any], alpha: float | None = None):
    """Folds adapters into their kernels (kernel + lora_a @ lora_b * alpha / r) and drops them.

    A module: returns a copy in which every `LoRALinear` is a plain `nnx.Linear` again (the argument is
    left as it is). A flat {path: array} dict: returns a new dict; `alpha` is then required, since
    the scale is not a parameter.
    """
    if isinstance(target, nnx.Module):
        model = nnx.clone(target)
        for path, layer in [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, LoRALinear)]:
            # eval_shape: the placeholder kernel is never materialised before being replaced.
            linear = nnx.eval_shape(lambda layer=layer: nnx.Linear(
                layer.in_features, layer.out_features, use_bias=layer.bias is not None, dtype=layer.dtype,
                precision=layer.precision, dot_general=layer.dot_general, promote_dtype=layer.promote_dtype,
                preferred_element_type=layer.preferred_element_type, rngs=nnx.Rngs(0)))
            linear.kernel = layer.kernel.replace(value=layer.merged_kernel())
            if layer.bias is not None:
                linear.bias = layer.bias
            _replace(model, path, linear)
        return model
    params = dict(target)
    adapted = [name[: -len("lora_a")] for name in params if name.endswith("/lora_a")]
    if adapted and alpha is None:
        raise ValueError("merge_lora of a parameter dict needs alpha (the scale is alpha / rank)")
    for prefix in adapted:
        a, b = params.pop(prefix + "lora_a"), params.pop(prefix + "lora_b")
        delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
        params[prefix + "kernel"] = params[prefix + "kernel"] + delta * (alpha / a.shape[-1])
    return params


def _peft_module(module: str, family: str) -> str:
    from sft_jax.models.loading.lm import hf_name  # lm.py imports this module

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
    from safetensors.numpy import load_file

    path = pathlib.Path(adapter_dir)
    peft_config = json.loads((path / ADAPTER_CONFIG).read_text())
    if peft_config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path / ADAPTER_CONFIG}: peft_type {peft_config['peft_type']!r} is not LORA")
    for key in ("use_rslora", "use_dora"):
        if peft_config.get(key):
            raise ValueError(f"{path / ADAPTER_CONFIG}: {key}=true is not supported")
    tensors = load_file(str(path / ADAPTER_WEIGHTS))
    family = family or getattr(getattr(model, "config", None), "family", "llama")
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
