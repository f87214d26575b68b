"""Where a model's parts live in its parameter paths: what freezing rules and parameter groups match on."""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp

from sft_jax.models.quant import QUANTIZED


@dataclasses.dataclass(frozen=True)
class ParamLayout:
    """Where the parts of a task model live in its parameter paths (regexes)."""

    embeddings: str  # e.g. r"encoder/embeddings/"
    layer: str  # with {i}, e.g. r"encoder/layers/{i}/"
    head: str  # the freshly added layers, e.g. r"head/"
    num_layers: int
    fresh: str = ""  # freshly initialised parameters (no pre-trained value), e.g. r"head/"; "" for none
    # Layers per unit that `layer` numbers, where a unit holds several (scanned segments: models/scan.py);
    # empty: one layer each.
    unit_sizes: tuple[int, ...] = ()


def storage_dtype(name: str, dtype, param_dtype: str, fresh: re.Pattern | None = None):
    """The dtype parameter `name` (now `dtype`) is stored in: `param_dtype` for pre-trained floating-point
    weights; new ones (`fresh`: a new head; LoRA adapters) and quantised ones (codes and scales, QLoRA) keep
    theirs, so that what starts from zero learns at full precision."""
    new = (fresh is not None and fresh.search(name)) or name.endswith(QUANTIZED + ("/lora_a", "/lora_b"))
    return dtype if new or not jnp.issubdtype(dtype, jnp.floating) else jnp.dtype(param_dtype)


def in_storage_dtype(params: dict, param_dtype: str, layout: ParamLayout) -> dict:
    """`params` stored as `storage_dtype` says."""
    if param_dtype == "float32":
        return params
    fresh = re.compile("^" + layout.fresh) if layout.fresh else None

    def stored(name, value):
        dtype = storage_dtype(name, value.dtype, param_dtype, fresh)
        return value if dtype == value.dtype else value.astype(dtype)

    return {name: stored(name, value) for name, value in params.items()}
