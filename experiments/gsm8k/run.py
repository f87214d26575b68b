"""GSM8K exact match of SmolLM2-135M-Instruct before and after fine-tuning on GSM8K's worked answers, LoRA and full,
under the experiment protocol (experiments/decoder_strategies.py: equal steps, 3 seeds, the best checkpoint on
held-out training questions, the test questions scored once).

    PYTHONPATH=. python -m experiments.gsm8k.run [--strategies=lora,full] [--seeds=0,1,2] [--steps=330]
    PYTHONPATH=. python -m experiments.gsm8k.run --report

Exact match: the final number of the greedy generation (after "####", else the last number) equals the
reference's, on the first 64 test questions.
"""

from __future__ import annotations

import os

from experiments import decoder_strategies

TASK = decoder_strategies.Task(
    title="GSM8K: LoRA vs full fine-tuning of SmolLM2-135M-Instruct",
    here=os.path.dirname(os.path.abspath(__file__)),
    config="configs/gsm8k_smollm2.py",
    metric="exact_match", metric_name="GSM8K exact match (%)",
    # Packed rows of 256 tokens in bfloat16 and 2% (about 150 questions) held out: the budget fits the CPU.
    overrides={"dtype": "bfloat16", "batch_size": 4, "max_length": 256, "buckets": "(256,)",
               "data.validation_fraction": 0.02, "data.max_eval_examples": 64,
               "eval_generation.num_examples": 64, "log_every": 10},
    description="Data: GSM8K train (7,473 question -> worked answer pairs) as chat turns packed into rows of 256 "
                "tokens; learning rates lora 5e-4 (rank 8), full 3e-5. Scored: exact match of the final number of "
                "greedy generations (at most 256 new tokens) on the first 64 test questions, and the loss on them.",
)

if __name__ == "__main__":
    decoder_strategies.main(TASK)
