"""Llama-3.1-8B-Instruct: ARG lora (one 80 GB device) | qlora (one 80 GB device) | full (8 devices, FSDP).

    python -m sft_jax.main --config=configs/recipes/llama31_8b.py:qlora --workdir=/tmp/llama_qlora
    python -m sft_jax.plan --config=configs/recipes/llama31_8b.py:full --devices=8
"""

from configs.recipes.common import recipe


def get_config(arg=None):
    return recipe("meta-llama/Llama-3.1-8B-Instruct", arg or "lora")
