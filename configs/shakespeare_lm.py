"""SmolLM2-135M-Instruct adapted to Shakespeare's text (next-token fine-tuning on plain text), with the
WikiText-2 perplexity probe measuring what the adaptation costs. ARG: the strategy (head | partial | full),
default partial; append `,gemma3-270m` for Gemma 3.

    python -m sft_jax.main --config=configs/shakespeare_lm.py:full --workdir=/tmp/shakespeare_full

Train on the first 95% of tinyshakespeare's lines, evaluate on the last 5% (about 56k characters).
"""

from configs.common import add_wikitext2_probe, shared_data
from configs.common import get_config as common_config

LEARNING_RATES = {"head": 1e-4, "partial": 5e-5, "full": 3e-5}


def get_config(arg=None):
    strategy, _, model = (arg or "partial").partition(",")
    c = common_config()
    c.task = "language_modeling"
    c.model = model or "smollm2-135m-instruct"
    c.strategy = strategy
    c.frozen_layers = 20 if strategy == "partial" else 0
    c.data.train = shared_data("tinyshakespeare", "input.txt") + "[:95%]"
    c.data.eval = shared_data("tinyshakespeare", "input.txt") + "[95%:]"
    add_wikitext2_probe(c)
    c.max_length = 256
    c.buckets = (256,)
    c.batch_size = 4
    c.eval_batch_size = 8
    c.learning_rate = LEARNING_RATES.get(strategy, 3e-5)
    c.weight_decay = 0.0
    c.max_steps = 300
    c.warmup_steps = 30
    c.eval_every = 100
    c.checkpoint_every = 100
    c.early_stopping.metric = "eval/loss"
    c.early_stopping.mode = "min"
    return c
