"""sft_jax: supervised fine-tuning of pre-trained models in JAX / Flax NNX.

Importing sft_jax sets up two things for XLA:CPU, each only if sft_jax is imported before any JAX computation
(XLA reads its flags, and its threads pick their malloc arena, when its first backend starts):

- XNNPACK matmuls (`--xla_cpu_use_xnnpack=true` added to XLA_FLAGS) unless XLA_FLAGS already sets that flag or
  SFT_JAX_XNNPACK=0: on the benchmark's one-thread MiniLM step they made float32 8% and bfloat16 18% faster
  (experiments/benchmarks/notes.md). It never affects GPU or TPU backends.
- glibc malloc keeps freed memory (`host_malloc.keep_freed_memory`), unless SFT_JAX_MALLOC=0. XLA:CPU
  allocates every step's temporaries afresh; by default glibc hands each large block back to the kernel when it
  is freed, so every step faulted its temporaries in again, page by page: 0.34-0.56 million page faults and
  1-7 s of kernel time per MiniLM / SmolLM2 train step, more than the step's own arithmetic in places.
"""

import os

from sft_jax import host_malloc

_XNNPACK_FLAG = "--xla_cpu_use_xnnpack=true"

if os.environ.get("SFT_JAX_XNNPACK", "1") != "0" and "xla_cpu_use_xnnpack" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_XNNPACK_FLAG}".strip()

if os.environ.get("SFT_JAX_MALLOC", "1") != "0":
    host_malloc.keep_freed_memory()
