"""Process-wide settings for JAX's CPU backend, applied only by the entry points that ask for them.

Importing sft_jax changes nothing in the process. The command-line modules (`sft_jax.main`, `sft_jax.generate`,
`sft_jax.predict`) call `configure_cpu()` before JAX starts; a notebook or script that wants the same settings
calls it first thing, before any JAX computation.
"""

from __future__ import annotations

import os
import sys
import warnings

from sft_jax import host_malloc

XNNPACK_FLAG = "--xla_cpu_use_xnnpack=true"


def configure_cpu() -> dict[str, bool]:
    """Set up XLA:CPU for fine-tuning; returns `{"xnnpack": ..., "malloc": ...}`, which settings are in place.

    Takes effect only before JAX's CPU backend starts (the first JAX computation or `jax.devices()`): XLA reads
    XLA_FLAGS, and its threads pick their malloc arena, once, when the backend starts. Called later it still
    changes the process but not that backend, and warns. Calling it again changes nothing. GPU and TPU backends
    are unaffected.

    - XNNPACK matmuls: `--xla_cpu_use_xnnpack=true` appended to XLA_FLAGS, unless XLA_FLAGS already sets
      `xla_cpu_use_xnnpack` or SFT_JAX_XNNPACK=0. A MiniLM train step ran 8% faster in float32 and 18% in
      bfloat16 (experiments/benchmarks/notes.md).
    - glibc malloc keeps and reuses freed memory (`host_malloc.keep_freed_memory`), unless SFT_JAX_MALLOC=0.
      XLA:CPU allocates each step's temporaries afresh; with glibc's defaults each freed block goes back to the
      kernel, and every step faults its temporaries in again page by page, which can cost more time than the
      step's arithmetic. The cost: the process keeps its peak heap. glibc only; elsewhere nothing changes.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    before = (XNNPACK_FLAG in flags.split(), host_malloc.applied())
    if os.environ.get("SFT_JAX_XNNPACK", "1") != "0" and "xla_cpu_use_xnnpack" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {XNNPACK_FLAG}".strip()
    if os.environ.get("SFT_JAX_MALLOC", "1") != "0":
        host_malloc.keep_freed_memory()
    applied = {"xnnpack": XNNPACK_FLAG in os.environ.get("XLA_FLAGS", "").split(), "malloc": host_malloc.applied()}
    if tuple(applied.values()) != before and _backend_started():
        warnings.warn("sft_jax.platform.configure_cpu() ran after JAX's backend started; its settings take no "
                      "effect there (call it before any JAX computation)", stacklevel=2)
    return applied


def _backend_started() -> bool:
    """Whether JAX has started a backend, checked without importing JAX or starting one."""
    xla_bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(xla_bridge is not None and getattr(xla_bridge, "_backends", None))
