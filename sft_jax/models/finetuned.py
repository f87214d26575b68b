"""The decoder LM a fine-tuning strategy starts from, and where strategies find its parts."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from sft_jax.models.decoder import DecoderConfig, DecoderLM
from sft_jax.models.layout import ParamLayout
from sft_jax.models.loading.lm import load_decoder
from sft_jax.models.loading.stream import Placement, load_decoder_sharded
from sft_jax.models.lora import LoraConfig, apply_lora, quantize_bases
from sft_jax.models.registry import resolve_checkpoint
from sft_jax.models.scan import scan_decoder


def build_lm(model: str, strategy: str, dtype: str = "float32", lora: LoraConfig | Mapping[str, Any] | None = None,
             seed: int = 0, *, param_dtype: str = "float32", placement: Placement | None = None,
             quantize_base: str = "none", scan_layers: bool = False, frozen_layers: int = 0,
             ignore_weights: tuple[str, ...] = ()) -> tuple[DecoderLM, DecoderConfig]:
    """The pre-trained model of a run. For `strategy=head` a tied model gets its own LM head
    (initialised to the embedding), the one thing that then trains. For `strategy=lora` the projections
    matching `lora["targets"]` get adapters (rank, alpha, dropout from `lora`; `lora_a` drawn from `seed`),
    which leave the outputs unchanged until they learn; with `quantize_base` (int8 / nf4: QLoRA) their frozen
    base kernels are then stored quantised. With `scan_layers` the layers are stacked and scanned
    (`models/scan.py`), in two stacks for `partial` (the first `frozen_layers` and the rest).

    With a `placement` ({path: NamedSharding} of the parameters, from their names, shapes and logical axes), a
    HF safetensors directory streams straight onto the devices as `param_dtype` (each process reading only
    its own devices' slices); other checkpoints (GGUF) load on the host in float32. A checkpoint tensor the
    model does not use is an error unless a regex of `ignore_weights` (re.search) matches it (`load_decoder`)."""
    checkpoint = resolve_checkpoint(model)
    if placement is not None and checkpoint.kind != "gguf":
        lm, config = load_decoder_sharded(checkpoint, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype),
                                          placement=placement, ignore=ignore_weights)
    else:
        lm, config = load_decoder(checkpoint, dtype=jnp.dtype(dtype), ignore=ignore_weights)
    adapt_lm(lm, strategy, lora, seed, quantize_base=quantize_base, scan_layers=scan_layers,
             frozen_layers=frozen_layers)
    return lm, lm.config


def adapt_lm(lm: DecoderLM, strategy: str, lora: LoraConfig | Mapping[str, Any] | None = None, seed: int = 0, *,
             quantize_base: str = "none", scan_layers: bool = False, frozen_layers: int = 0) -> DecoderLM:
    """What a strategy changes in a pre-trained decoder, in place: its own LM head for `head` on a tied model,
    adapters for `lora`, their bases quantised with `quantize_base`, the layers scanned (see `build_lm`).
    Works on an abstract model (`nnx.eval_shape`) too."""
    if strategy == "head" and lm.lm_head is None:
        lm.untie_head()
    if strategy == "lora":
        cfg = LoraConfig.from_any(lora)
        apply_lora(lm, cfg.targets, cfg.rank, cfg.alpha, cfg.dropout, rngs=nnx.Rngs(seed))
    if quantize_base != "none":
        quantize_bases(lm, quantize_base)
    if scan_layers:
        partial = strategy == "partial" and 0 < frozen_layers < len(lm.layers)
        scan_decoder(lm, [frozen_layers] if partial else [])
    return lm


def with_dtype(lm: DecoderLM, dtype) -> DecoderLM:
    """The same parameters in a module whose matmuls run in `dtype` (the compute dtype is static)."""
    config = dataclasses.replace(lm.config, dtype=dtype)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(lm))


def decoder_layout(num_layers: int, segment_sizes: tuple[int, ...] = ()) -> ParamLayout:
    """Where strategies find the parts of a decoder. `head` = the output side: the LM head and final norm.
    A scanned decoder (`segment_sizes`: layers per segment) is frozen and grouped by whole segments."""
    layer = r"segments/{i}/" if segment_sizes else r"layers/{i}/"
    return ParamLayout(embeddings=r"embed/", layer=layer, head=r"(lm_head|final_norm)/", num_layers=num_layers,
                       unit_sizes=tuple(segment_sizes))
