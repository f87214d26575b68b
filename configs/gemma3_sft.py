"""Gemma 3 270M base (not instruction-tuned) fine-tuned on input-output or instruction records, in plain prompt
templates: a base model has no chat format to keep. ARG: strategy (full | lora | partial), default full.

    python -m sft_jax.main --config=configs/gemma3_sft.py --workdir=/tmp/gemma3 \
        --config.data.train=train.jsonl --config.data.eval=val.jsonl

The data is the caller's (data.train or data.mixture, and data.eval). bfloat16 matmuls keep the 262k-token
vocabulary's logits affordable on CPU; the WikiText-2 probe is the shared one (configs.common).
"""

from configs.common import add_wikitext2_probe
from configs.common import get_config as common_config

LEARNING_RATES = {"full": 5e-5, "partial": 5e-5, "lora": 5e-4}


def get_config(arg=None):
    strategy = arg or "full"
    c = common_config()
    c.task = "sft"
    c.model = "gemma3-270m"
    c.strategy = strategy
    c.frozen_layers = 9 if strategy == "partial" else 0  # half of the 18 blocks
    c.learning_rate = LEARNING_RATES.get(strategy, 5e-5)
    c.weight_decay = 0.0
    c.dtype = "bfloat16"
    c.lm_loss_chunk = 64  # the 262k-token vocabulary's logits, 64 positions at a time: GBs less per step
    c.prompt.chat = False
    c.max_length = 256
    c.buckets = (64, 128, 256)
    c.batch_size = 8
    c.eval_batch_size = 16
    c.max_steps = 330
    c.warmup_steps = 30
    c.schedule = "cosine"
    c.eval_every = 110
    c.checkpoint_every = 110
    c.log_every = 10
    c.eval_generation.metrics = ()
    c.early_stopping.metric = "eval/loss"
    c.early_stopping.mode = "min"
    return add_wikitext2_probe(c)
