"""SmolLM2-135M-Instruct on GSM8K grade-school maths: question -> worked answer ending in "#### N".
ARG: strategy (lora | partial | full), default lora.

    python -m sft_jax.main --config=configs/gsm8k_smollm2.py --workdir=/tmp/gsm8k_lora

Scored by exact match of the final number on the first 200 test questions (generation, greedy).
"""

from configs.common import shared_data, smollm2_sft


def get_config(arg=None):
    c = smollm2_sft(arg or "lora")
    c.data.train = shared_data("gsm8k", "train.jsonl")
    c.data.eval = shared_data("gsm8k", "test.jsonl")
    c.data.max_eval_examples = 200
    c.data.input_field, c.data.output_field = "question", "answer"
    c.prompt.template = "{input}"
    c.max_length = 384
    c.buckets = (192, 256, 384)
    c.packing = True  # GSM8K pairs are short (~150 tokens): pack them into full rows
    c.eval_batch_size = 16
    c.max_steps = 300
    c.warmup_steps = 30
    c.eval_every = 100
    c.checkpoint_every = 100
    c.log_every = 10
    c.eval_generation.metrics = ("exact_match",)
    c.eval_generation.num_examples = 64
    c.eval_generation.max_new_tokens = 256
    return c
