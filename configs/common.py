"""Shared defaults: every key the trainer reads (see sft_jax/config_defaults.py)."""

import os

from sft_jax.config_defaults import defaults

# Real data shipped beside the project (never copied into it); fresh clones without it use TFDS.
SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


def shared_data(*parts: str) -> str:
    return os.path.normpath(os.path.join(SHARED_DATA, *parts))


def get_config(arg=None):
    del arg
    return defaults()


# The one WikiText-2 forgetting probe every decoder config and experiment uses, so their "before" perplexities
# are one number: the first 16k tokens of the raw test split, in disjoint windows of 512 (cheap on CPU).
WIKITEXT2_PROBE = {"wikitext2_max_tokens": 16384, "wikitext2_max_length": 512, "wikitext2_stride": 511}


def add_wikitext2_probe(c):
    """Sets the shared WikiText-2 probe (WIKITEXT2_PROBE) on config `c`; returns `c`."""
    c.forgetting.wikitext2 = shared_data("wikitext2_raw")
    for key, value in WIKITEXT2_PROBE.items():
        c.forgetting[key] = value
    return c


# Learning rates per strategy for SmolLM2-135M: adapters tolerate (and need) a much larger step.
SMOLLM2_LEARNING_RATES = {"lora": 5e-4, "partial": 5e-5, "full": 3e-5, "head": 1e-4}


def smollm2_sft(strategy: str):
    """What the SmolLM2-135M-Instruct SFT configs share: the model, the strategy and its learning rate,
    chat-template prompts, early stopping on eval loss, and the shared WikiText-2 forgetting probe.
    `partial` freezes the embeddings and the first 20 of the 30 blocks."""
    c = get_config()
    c.task = "sft"
    c.model = "smollm2-135m-instruct"
    c.strategy = strategy
    c.frozen_layers = 20 if strategy == "partial" else 0
    c.learning_rate = SMOLLM2_LEARNING_RATES.get(strategy, 3e-5)
    c.weight_decay = 0.0
    c.prompt.chat = True
    c.batch_size = 8
    c.eval_generation.batch_size = 16
    c.early_stopping.metric = "eval/loss"
    c.early_stopping.mode = "min"
    return add_wikitext2_probe(c)
