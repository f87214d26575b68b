"""SmolLM2-135M-Instruct on GSM8K grade-school maths: question -> worked answer ending in "#### N".
ARG: strategy (lora | partial | full), default lora.

    python -m sft_jax.main --config=configs/gsm8k_smollm2.py --workdir=/tmp/gsm8k_lora

Scored by exact match of the final number on the first 200 test questions (generation, greedy).
"""

from configs.common import get_config as common_config
from configs.common import shared_data

LEARNING_RATES = {"lora": 5e-4, "partial": 5e-5, "full": 3e-5}


def get_config(arg=None):
    c = common_config()
    c.task = "sft"
    c.model = "smollm2-135m-instruct"
    c.strategy = arg or "lora"
    c.frozen_layers = 20 if c.strategy == "partial" else 0
    c.data.train = shared_data("gsm8k", "train.jsonl")
    c.data.eval = shared_data("gsm8k", "test.jsonl")
    c.data.max_eval_examples = 200
    c.data.input_field, c.data.output_field = "question", "answer"
    c.prompt.template = "{input}"
    c.prompt.chat = True
    c.max_length = 384
    c.buckets = (192, 256, 384)
    c.packing = True  # GSM8K pairs are short (~150 tokens): pack them into full rows
    c.batch_size = 8
    c.eval_batch_size = 16
    c.learning_rate = LEARNING_RATES.get(c.strategy, 3e-5)
    c.weight_decay = 0.0
    c.max_steps = 300
    c.warmup_steps = 30
    c.eval_every = 100
    c.checkpoint_every = 100
    c.log_every = 10
    c.eval_generation.metrics = ("exact_match",)
    c.eval_generation.num_examples = 64
    c.eval_generation.max_new_tokens = 256
    c.eval_generation.batch_size = 16
    c.early_stopping.metric = "eval/loss"
    c.early_stopping.mode = "min"
    c.forgetting.wikitext2 = shared_data("wikitext2_raw")
    c.forgetting.wikitext2_max_tokens = 16384
    return c
