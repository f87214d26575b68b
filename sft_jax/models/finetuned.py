"""Rebuild a decoder LM as a fine-tuning run configured it, and load a run's fine-tuned weights."""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp

from sft_jax.models.decoder import DecoderConfig, DecoderLM
from sft_jax.models.loading.lm import load_decoder, load_lm_tokenizer
from sft_jax.state import ModelDef
from sft_jax.strategies import ParamLayout


def build_lm(model: str, strategy: str, dtype: str = "float32") -> tuple[DecoderLM, DecoderConfig]:
    """The pre-trained model of a run. For `strategy=head` a tied model gets its own LM head
    (initialised to the embedding), the one thing that then trains."""
    lm, config = load_decoder(model, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    if strategy == "head" and lm.lm_head is None:
        lm.untie_head()
    return lm, lm.config


def load_finetuned_lm(workdir: str, which: str = "best") -> tuple[DecoderLM, DecoderConfig, Any]:
    """(model with the run's `which` checkpoint weights, its config, tokenizer) of a workdir."""
    from sft_jax.checkpoint import Checkpoints

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir}: no config.json; is this a sft_jax workdir?")
    with open(path) as f:
        run = json.load(f)
    lm, config = build_lm(run["model"], run["strategy"], run.get("dtype", "float32"))
    model_def, params = ModelDef.split(lm)
    ckpt = Checkpoints(workdir)
    try:
        try:
            params, _ = ckpt.restore_params(params, which)
        except FileNotFoundError:
            params, _ = ckpt.restore_params(params, "latest")
    finally:
        ckpt.close()
    return model_def.merge(params), config, load_lm_tokenizer(run["model"])


def decoder_layout(num_layers: int) -> ParamLayout:
    """Where strategies find the parts of a decoder. `head` = the output side: the LM head and final norm."""
    return ParamLayout(embeddings=r"embed/", layer=r"layers/{i}/", head=r"(lm_head|final_norm)/",
                       num_layers=num_layers)
