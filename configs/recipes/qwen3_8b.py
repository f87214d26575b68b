"""Qwen3-8B: ARG lora (one 80 GB device) | qlora (one 80 GB device) | full (8 devices, FSDP).

    python -m sft_jax.main --config=configs/recipes/qwen3_8b.py:lora --workdir=/tmp/qwen_lora
"""

from configs.recipes.common import recipe


def get_config(arg=None):
    return recipe("Qwen/Qwen3-8B", arg or "lora")
