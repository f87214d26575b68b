"""all-MiniLM-L6-v2 on SST-2 sentiment. ARG: the strategy (head | partial | full), default partial.

    python -m sft_jax.main --config=configs/sst2.py:full --workdir=/tmp/sst2_full
"""

import os

from configs.common import get_config as common_config
from configs.common import shared_data

# Learning rates per strategy: a fresh head alone tolerates (and needs) a much larger step.
LEARNING_RATES = {"head": 2e-3, "partial": 1e-4, "full": 1e-4}


def get_config(arg=None):
    c = common_config()
    c.strategy = arg or "partial"
    c.frozen_layers = 3 if c.strategy == "partial" else 0
    c.model = "minilm-l6"
    if os.path.exists(shared_data("sst2", "train.tsv")):
        c.data.train = shared_data("sst2", "train.tsv")
        c.data.eval = shared_data("sst2", "dev.tsv")
    else:
        c.data.train, c.data.eval = "tfds:glue/sst2:train", "tfds:glue/sst2:validation"
    if os.path.exists(shared_data("stsb", "dev.tsv")):
        c.forgetting.stsb = shared_data("stsb", "dev.tsv")
    c.max_length = 64  # SST-2 sentences: 99.9% of dev under 64 tokens
    c.buckets = (16, 32, 64)
    c.learning_rate = LEARNING_RATES.get(c.strategy, 5e-5)
    c.batch_size = 32
    # Full fine-tuning keeps improving past one epoch; the head and partial runs plateau well before.
    c.max_steps = 3000 if c.strategy == "full" else 1500
    c.warmup_steps = 100
    c.eval_every = 250
    c.checkpoint_every = 250
    c.early_stopping.patience = 3
    return c
