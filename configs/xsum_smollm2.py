"""SmolLM2-135M-Instruct fine-tuned to write one-sentence XSum summaries. ARG: strategy (lora | partial | full),
default lora.

    python -m sft_jax.main --config=configs/xsum_smollm2.py --workdir=/tmp/xsum_lora

Data: the first 1,000 XSum test articles in ../shared/data/xsum: 90% train, the last 100 held out. The prompt
is a chat turn (the model is instruction-tuned); only the summary and its end-of-turn token are targets.
Forgetting: WikiText-2 perplexity on its first 16k tokens, before and after.
"""

from configs.common import shared_data, smollm2_sft


def get_config(arg=None):
    c = smollm2_sft(arg or "lora")
    xsum = shared_data("xsum", "xsum-1000.jsonl")
    c.data.train, c.data.eval = xsum + "[:90%]", xsum + "[90%:]"
    c.data.input_field, c.data.output_field = "document", "summary"
    c.prompt.template = "Summarize this article in one sentence.\n\n{input}"
    c.max_length = 512  # longer articles are cut at the end of the article, never in the summary
    c.buckets = (256, 384, 512)
    c.eval_batch_size = 8
    c.max_steps = 200
    c.warmup_steps = 20
    c.eval_every = 50
    c.checkpoint_every = 50
    c.log_every = 5
    c.eval_generation.metrics = ("rouge",)
    c.eval_generation.num_examples = 32
    c.eval_generation.max_new_tokens = 48
    return c
