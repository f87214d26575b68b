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


DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"
_DETERMINISTIC_NAME = DETERMINISTIC_FLAG.split("=")[0]


def determinism_flags(deterministic: bool, gpu: bool, xla_flags: str) -> str:
    """XLA_FLAGS for a run: `xla_flags`, plus XLA's deterministic-ops flag when `deterministic` and the run uses a
    GPU. On GPU, XLA otherwise picks kernels by autotuning and sums scatters and some reductions with atomics, so
    two runs (a resumed one and an uninterrupted one) can differ in the last bits; CPU (and TPU) kernels are
    deterministic already, so nothing is added there. A flag the user set stays; one that contradicts is refused.

    Raises:
      ValueError: `xla_flags` sets the flag to something else than true while `deterministic` asks for it.
    """
    if not (deterministic and gpu):
        return xla_flags
    given = [f for f in xla_flags.split() if f.split("=")[0] == _DETERMINISTIC_NAME]
    if not given:
        return f"{xla_flags} {DETERMINISTIC_FLAG}".strip()
    if given[-1].split("=", 1)[-1].lower() not in ("true", "1", _DETERMINISTIC_NAME):
        raise ValueError(f"config.deterministic=True, but XLA_FLAGS sets {given[-1]}: drop one or the other")
    return xla_flags


def configure_determinism(deterministic: bool) -> None:
    """Applies `determinism_flags` to this process's XLA_FLAGS (`config.deterministic`), before JAX's backend
    starts. When the GPU backend has already started without the flag, XLA would not read it any more: refused."""
    if not deterministic:
        return
    if _backend_started():
        import jax

        if jax.default_backend() == "gpu" and _DETERMINISTIC_NAME not in os.environ.get("XLA_FLAGS", ""):
            raise ValueError("config.deterministic=True: JAX's GPU backend started before XLA_FLAGS could get "
                             f"{DETERMINISTIC_FLAG}; set it in XLA_FLAGS before the first JAX computation")
        return
    os.environ["XLA_FLAGS"] = determinism_flags(True, _gpu_expected(), os.environ.get("XLA_FLAGS", ""))


def _gpu_expected() -> bool:
    """Whether JAX will start a GPU backend, told without starting one: JAX_PLATFORMS (or jax.config's
    jax_platforms) when set, else whether a CUDA or ROCm plugin of JAX is installed (JAX prefers a GPU when one is)."""
    import jax

    platforms = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or ""
    if platforms:
        return any(p.strip() in ("cuda", "gpu", "rocm") for p in platforms.split(","))
    try:
        import jax_plugins
    except ImportError:
        return False
    import pkgutil

    return any("cuda" in m.name or "rocm" in m.name for m in pkgutil.iter_modules(jax_plugins.__path__))
