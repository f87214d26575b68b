"""sft_jax: supervised fine-tuning of pre-trained models in JAX / Flax NNX.

On import, XLA:CPU's XNNPACK matmuls are switched on (`--xla_cpu_use_xnnpack=true` added to XLA_FLAGS) unless
XLA_FLAGS already sets that flag or SFT_JAX_XNNPACK=0: on the benchmark's one-thread MiniLM step they made
float32 8% and bfloat16 18% faster (experiments/benchmarks/notes.md). XLA reads XLA_FLAGS once, when its first
backend starts, so this only takes effect if sft_jax is imported before any JAX computation; it never affects
GPU or TPU backends.
"""

import os

_XNNPACK_FLAG = "--xla_cpu_use_xnnpack=true"

if os.environ.get("SFT_JAX_XNNPACK", "1") != "0" and "xla_cpu_use_xnnpack" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_XNNPACK_FLAG}".strip()
