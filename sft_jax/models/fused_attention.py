"""Decoder self-attention through `jax.nn.dot_product_attention`: cuDNN's fused (flash) kernel on GPU where it
applies, XLA's implementation elsewhere. The blocked attention of `models/decoder.py` stays the CPU path.

`config.attention` picks per run: `blocked` (today's), `dot_product`, or `auto` (dot_product on GPU and TPU,
blocked on CPU). The mask is the decoder's own (causal, packed segments, sliding window), passed whole; layers
with soft-capped logits (Gemma 2), which the fused kernels do not support, keep the blocked path, and
`choose` says so.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

KERNELS = ("auto", "blocked", "dot_product")


def dot_product_attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                       implementation: str | None = None) -> jax.Array:
    """`decoder.attend` (q [B, T, K, G, D] grouped by KV head, k / v [B, S, K, D], mask [B, T, S]) through
    `jax.nn.dot_product_attention`; `implementation` None lets JAX pick cuDNN where it can. Rows with no key
    to attend to (padding) come out as zeros, so that no kernel's NaN can reach a gradient."""
    b, t, kv, g, d = q.shape
    out = jax.nn.dot_product_attention(q.reshape(b, t, kv * g, d), k, v, mask=mask[:, None], scale=scale,
                                       implementation=implementation)
    out = jnp.where(jnp.any(mask, axis=-1)[:, :, None, None], out, 0)
    return out.reshape(b, t, kv, g, d).astype(q.dtype)


def choose(kernel: str, platform: str | None = None) -> str:
    """The attention a `config.attention` value means on `platform` (default: JAX's default backend)."""
    if kernel not in KERNELS:
        raise ValueError(f"config.attention: {kernel!r} is not one of {KERNELS}")
    if kernel != "auto":
        return kernel
    platform = platform or jax.default_backend()
    return "dot_product" if platform in ("gpu", "cuda", "rocm", "tpu") else "blocked"


def set_attention(model: nnx.Module, kernel: str) -> tuple[int, int]:
    """Sets the attention of every decoder attention module of `model` (those with an `attention_kernel`
    attribute); returns (modules set, of which soft-capped and so kept blocked)."""
    count = capped = 0
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "attention_kernel"):
            module.attention_kernel = kernel
            count += 1
            capped += bool(getattr(module, "softcap", None)) and kernel == "dot_product"
    return count, capped
