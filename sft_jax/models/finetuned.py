"""Rebuild a decoder LM as a fine-tuning run configured it, and load a run's fine-tuned weights."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from sft_jax.models.decoder import DecoderConfig, DecoderLM
from sft_jax.models.loading.lm import load_decoder, load_lm_tokenizer
from sft_jax.models.lora import LoraConfig, apply_lora, merge_lora
from sft_jax.state import ModelDef
from sft_jax.strategies import ParamLayout


def build_lm(model: str, strategy: str, dtype: str = "float32", lora: LoraConfig | Mapping[str, Any] | None = None,
             seed: int = 0) -> tuple[DecoderLM, DecoderConfig]:
    """The pre-trained model of a run. For `strategy=head` a tied model gets its own LM head
    (initialised to the embedding), the one thing that then trains. For `strategy=lora` the projections
    matching `lora["targets"]` get adapters (rank, alpha, dropout from `lora`; `lora_a` drawn from `seed`),
    which leave the outputs unchanged until they learn."""
    lm, config = load_decoder(model, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    if strategy == "head" and lm.lm_head is None:
        lm.untie_head()
    if strategy == "lora":
        cfg = LoraConfig.from_any(lora)
        apply_lora(lm, cfg.targets, cfg.rank, cfg.alpha, cfg.dropout, rngs=nnx.Rngs(seed))
    return lm, lm.config


def load_finetuned_lm(workdir: str, which: str = "best", *, merge: bool = False
                      ) -> tuple[DecoderLM, DecoderConfig, Any]:
    """(model with the run's `which` checkpoint weights, its config, tokenizer) of a workdir.

    A `strategy=lora` run comes back with its adapters (`.../lora_a`, `.../lora_b`) as trained; with
    `merge=True` they are folded into the kernels, giving a plain `DecoderLM` (faster to generate with).
    """
    from sft_jax.checkpoint import restore_run_params

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir}: no config.json; is this a sft_jax workdir?")
    with open(path) as f:
        run = json.load(f)
    lm, config = build_lm(run["model"], run["strategy"], run.get("dtype", "float32"), lora=run.get("lora"),
                          seed=run.get("seed", 0))
    model_def, params = ModelDef.split(lm)
    params = restore_run_params(workdir, params, which)
    lm = model_def.merge(params)
    return (merge_lora(lm) if merge else lm), config, load_lm_tokenizer(run["model"])


def decoder_layout(num_layers: int) -> ParamLayout:
    """Where strategies find the parts of a decoder. `head` = the output side: the LM head and final norm."""
    return ParamLayout(embeddings=r"embed/", layer=r"layers/{i}/", head=r"(lm_head|final_norm)/",
                       num_layers=num_layers)
