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


def build_lm(model: str, strategy: str, dtype: str = "float32", lora: LoraConfig | Mapping[str, Any] | None = None,
             seed: int = 0, *, param_dtype: str = "float32", placement: Placement | None = None,
             quantize_base: str = "none") -> tuple[DecoderLM, DecoderConfig]:
    """The pre-trained model of a run. For `strategy=head` a tied model gets its own LM head
    (initialised to the embedding), the one thing that then trains. For `strategy=lora` the projections
    matching `lora["targets"]` get adapters (rank, alpha, dropout from `lora`; `lora_a` drawn from `seed`),
    which leave the outputs unchanged until they learn; with `quantize_base` (int8 / nf4: QLoRA) their frozen
    base kernels are then stored quantised.

    With a `placement` ({path: NamedSharding} of the parameters, from their names, shapes and logical axes), a
    HF safetensors directory streams straight onto the devices as `param_dtype` (each process reading only
    its own devices' slices); other checkpoints (GGUF) load on the host in float32."""
    checkpoint = resolve_checkpoint(model)
    if placement is not None and checkpoint.kind != "gguf":
        lm, config = load_decoder_sharded(checkpoint, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype),
                                          placement=placement)
    else:
        lm, config = load_decoder(checkpoint, dtype=jnp.dtype(dtype))
    adapt_lm(lm, strategy, lora, seed, quantize_base=quantize_base)
    return lm, lm.config


def adapt_lm(lm: DecoderLM, strategy: str, lora: LoraConfig | Mapping[str, Any] | None = None, seed: int = 0, *,
             quantize_base: str = "none") -> DecoderLM:
    """What a strategy changes in a pre-trained decoder, in place: its own LM head for `head` on a tied model,
    adapters for `lora`, their bases quantised with `quantize_base` (see `build_lm`). Works on an abstract
    model (`nnx.eval_shape`) too."""
    if strategy == "head" and lm.lm_head is None:
        lm.untie_head()
    if strategy == "lora":
        cfg = LoraConfig.from_any(lora)
        apply_lora(lm, cfg.targets, cfg.rank, cfg.alpha, cfg.dropout, rngs=nnx.Rngs(seed))
    if quantize_base != "none":
        quantize_bases(lm, quantize_base)
    return lm


def with_dtype(lm: DecoderLM, dtype) -> DecoderLM:
    """The same parameters in a module whose matmuls run in `dtype` (the compute dtype is static)."""
    config = dataclasses.replace(lm.config, dtype=dtype)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(lm))


def decoder_layout(num_layers: int) -> ParamLayout:
    """Where strategies find the parts of a decoder. `head` = the output side: the LM head and final norm."""
    return ParamLayout(embeddings=r"embed/", layer=r"layers/{i}/", head=r"(lm_head|final_norm)/",
                       num_layers=num_layers)
