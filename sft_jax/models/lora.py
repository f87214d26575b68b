"""LoRA: low-rank adapters on frozen projections (Hu et al., 2021), compatible with Hugging Face PEFT.

`apply_lora` swaps chosen `nnx.Linear` layers of a model, in place, for `LoRALinear`, which keeps the base
weight under the same path and adds two small matrices::

    layers/0/attn/q/kernel   [in, out]   the pre-trained weight (frozen by strategy=lora)
    layers/0/attn/q/lora_a   [in, r]     kaiming-uniform, as PEFT
    layers/0/attn/q/lora_b   [r, out]    zeros, so a fresh adapter changes nothing

    y = x @ kernel + dropout(x) @ lora_a @ lora_b * alpha / r

Because base paths are unchanged, pre-trained loading and Hugging Face export names are unchanged too.
`merge_lora` folds the adapters back into the kernels (for export and fast generation);
`sft_jax.models.loading.peft` reads and writes the adapters alone, in PEFT's files.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sft_jax.models.dropout import dropout
from sft_jax.models.mixed import Linear, linear_bias_dot
from sft_jax.models.quant import KINDS, QuantizedKernel
from sft_jax.sharding import logical

DEFAULT_TARGETS = r"layers/\d+/(attn/(q|k|v|o)|mlp/(gate|up|down))$"


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

    The base product is computed exactly as the base layer (`nnx.Linear` or `mixed.Linear`) computes it, so
    with `lora_b` = 0 the output is bit-identical to the base layer's.
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
        # mixed.Linear (encoders, biased decoder projections) adds a bfloat16 layer's bias in float32.
        self.bias_in_float32 = isinstance(base, Linear)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """x [..., in] -> [..., out]; `rng` switches adapter dropout on (no key: no dropout)."""
        bias = self.bias.value if self.bias is not None else None
        kwargs = {} if self.preferred_element_type is None else {"preferred_element_type": self.preferred_element_type}
        dims = (((x.ndim - 1,), (0,)), ((), ()))
        if isinstance(self.kernel, QuantizedKernel):  # QLoRA: dequantised inside the product (models/quant.py)
            x = x.astype(self.dtype or x.dtype)
            y = self.kernel.matmul(x, x.dtype)
            if bias is not None:
                y = (y.astype(jnp.float32) + bias).astype(x.dtype)
        elif (self.bias_in_float32 and bias is not None and self.preferred_element_type is None
                and self.dtype is not None and jnp.dtype(self.dtype) == jnp.bfloat16):
            x = x.astype(self.dtype)  # mixed.Linear's bfloat16 path: one rounding, after the float32 bias
            y = linear_bias_dot(x, self.kernel.value, bias)
        else:
            x, kernel, bias = self.promote_dtype((x, self.kernel.value, bias), dtype=self.dtype)
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
        base = self.kernel.dequantize() if isinstance(self.kernel, QuantizedKernel) else self.kernel.value
        return base + delta * self.scale


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


def quantize_bases(model: nnx.Module, kind: str) -> list[str]:
    """QLoRA: stores the frozen base kernel of every `LoRALinear` of `model` quantised (`models/quant.py`), in
    place; returns their module paths. The adapters and biases are unchanged."""
    if kind not in KINDS:
        raise ValueError(f"config.quantize_base: {kind!r} is not one of {KINDS}")
    done = []
    for path, layer in nnx.iter_modules(model):
        if isinstance(layer, LoRALinear) and not isinstance(layer.kernel, QuantizedKernel):
            layer.kernel = QuantizedKernel(layer.kernel, kind)
            done.append(_module_path(path))
    if not done:
        raise ValueError("config.quantize_base: the model has no LoRA layers whose base to quantise "
                         "(QLoRA needs strategy=lora)")
    return done


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
            cls = Linear if layer.bias_in_float32 else nnx.Linear  # the base layer's own computation
            linear = nnx.eval_shape(lambda layer=layer, cls=cls: cls(
                layer.in_features, layer.out_features, use_bias=layer.bias is not None, dtype=layer.dtype,
                precision=layer.precision, dot_general=layer.dot_general, promote_dtype=layer.promote_dtype,
                preferred_element_type=layer.preferred_element_type, rngs=nnx.Rngs(0)))
            if isinstance(layer.kernel, QuantizedKernel):  # the merged kernel is a plain float32 one again
                linear.kernel = nnx.Param(layer.merged_kernel(), **logical(*layer.kernel.axes))
            else:
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
