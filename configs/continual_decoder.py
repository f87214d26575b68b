"""A decoder sequence: SmolLM2-135M-Instruct fine-tuned on XSum, then GSM8K, then English-French translation
(`config.stages`), the WikiText-2 probe (first 16k tokens) before and after every stage. ARG: strategy (lora, a
fresh adapter per stage folded in after it; or full), default lora.

    python -m sft_jax.main --config=configs/continual_decoder.py:lora --workdir=DIR [--config.seed=S]

The weights are SmolLM2-135M-Instruct dequantised from its Q4_1 GGUF (the packaged `smollm2-135m-instruct`).
Data (../shared/data): XSum, the first 900 of 1,000 test articles to train on and the last 100 to score;
GSM8K, the first 30% of its training questions (2,242), the first 100 test questions scored; Multi30k en-fr,
the first 8% of its training pairs (2,320), the first 100 validation pairs scored. In every stage 10% of the
training examples are held out (drawn with the seed) to choose the best checkpoint, and at most 2,000 of the
rest train; the scored sets are never trained or selected on. 60 steps of 4 examples a stage.
The matrix is next-token accuracy on the scored sets' target tokens (continual/loss_matrix: their loss).
"""

from configs.common import shared_data, smollm2_sft

STEPS_PER_STAGE = 60


def stages() -> tuple[dict, ...]:
    """The three stages' data, prompts and lengths (few buckets: each one is a train step compiled)."""
    xsum = shared_data("xsum", "xsum-1000.jsonl")
    gsm8k, multi30k = shared_data("gsm8k"), shared_data("multi30k")
    return (
        {"data.train": xsum + "[:90%]", "data.eval": xsum + "[90%:]", "data.input_field": "document",
         "data.output_field": "summary", "prompt.template": "Summarize this article in one sentence.\n\n{input}",
         "max_length": 320, "buckets": (320,)},
        {"data.train": f"{gsm8k}/train.jsonl[:30%]", "data.eval": f"{gsm8k}/test.jsonl", "data.input_field": "question",
         "data.output_field": "answer", "prompt.template": "{input}", "data.max_train_examples": 2000,
         "max_length": 320, "buckets": (192, 320)},
        {"data.train": f"parallel:{multi30k}/train.en.gz,{multi30k}/train.fr.gz[:8%]",
         "data.eval": f"parallel:{multi30k}/val.en.gz,{multi30k}/val.fr.gz",
         "prompt.template": "Translate the following sentence into French.\n\n{input}",
         "data.max_train_examples": 2000, "max_length": 128, "buckets": (64, 128)},
    )


def get_config(arg=None):
    c = smollm2_sft(arg or "lora")
    c.stages = stages()
    c.dtype = "bfloat16"  # float32 master weights, bfloat16 matmuls
    c.data.validation_fraction = 0.1
    c.data.max_eval_examples = 100
    c.data.too_long = "truncate"
    c.batch_size = 4
    c.eval_batch_size = 8
    c.max_steps = STEPS_PER_STAGE
    c.warmup_steps, c.warmup_ratio = 0, 0.1
    c.schedule = "cosine"
    c.eval_every = 30
    c.checkpoint_every = 30
    c.log_every = 10
    return c
