"""XSum one-sentence summaries with SmolLM2-135M-Instruct: LoRA vs partial vs full fine-tuning, scored by ROUGE on
held-out articles, with the WikiText-2 perplexity rise as the forgetting measure, under the experiment protocol
(experiments/decoder_strategies.py: equal steps, 3 seeds, the best checkpoint on held-out training articles,
the reported articles scored once).

    PYTHONPATH=. python -m experiments.xsum_summarization.run [--strategies=lora,partial,full] [--seeds=0,1,2]
    PYTHONPATH=. python -m experiments.xsum_summarization.run --report
"""

from __future__ import annotations

import os

from experiments import decoder_strategies

TASK = decoder_strategies.Task(
    title="XSum summarization: LoRA vs partial vs full fine-tuning of SmolLM2-135M-Instruct",
    here=os.path.dirname(os.path.abspath(__file__)),
    config="configs/xsum_smollm2.py",
    metric="rougeL", metric_name="ROUGE-L",
    # Articles cut to 256 tokens in bfloat16: the budget fits the CPU (the summary is never cut).
    overrides={"dtype": "bfloat16", "batch_size": 4, "max_length": 256, "buckets": "(256,)",
               "data.validation_fraction": 0.1, "data.max_eval_examples": 100, "log_every": 10},
    description="Data: the 1,000 XSum test articles in ../shared/data/xsum, the first 900 for training (10% of "
                "them held out for selection), the last 100 reported; prompt: a chat turn \"Summarize this article "
                "in one sentence.\" + the article. Learning rates: lora 5e-4 (rank 8), partial 5e-5 (first 20 of "
                "30 blocks frozen), full 3e-5. Scored: ROUGE-L (stemmed F1 x100) of greedy generations (at most 48 "
                "new tokens) on the first 32 reported articles, and the loss on all 100.",
)

if __name__ == "__main__":
    decoder_strategies.main(TASK, strategies="lora,partial,full")
