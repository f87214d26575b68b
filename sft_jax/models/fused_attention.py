"""Decoder self-attention through a fused kernel: `jax.nn.dot_product_attention` (cuDNN's fused flash kernel on
GPU where it applies, XLA's implementation elsewhere) or JAX's splash attention (a Pallas flash-attention kernel
for TPU, forward and backward). The blocked attention of `models/decoder.py` stays the CPU path.

`config.attention` picks per run: `blocked` (today's), `dot_product`, `splash`, or `auto` (splash on TPU,
dot_product on GPU, blocked on CPU). Both kernels apply the decoder's mask (causal, packed segments, sliding
window): dot_product takes it whole, splash as segment ids plus a causal or local block mask whose all-masked
blocks it skips. Layers with soft-capped logits (Gemma 2): splash caps them itself; `jax.nn.dot_product_attention`
cannot, so under dot_product they keep the blocked path, and `choose` / `describe` say so. Off TPU, splash runs
in Pallas's interpreter (tests on CPU; slow), and GPU refuses it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from sft_jax import sharding

KERNELS = ("auto", "blocked", "dot_product", "splash")
_GPU = ("gpu", "cuda", "rocm")

# Query / key rows per splash block: the largest of these that divides the length, which is padded to a
# multiple of the smallest (the TPU's 128 lanes; the kernel needs key blocks of a multiple of 128).
SPLASH_BLOCKS = (512, 256, 128)


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


def splash_attend(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, scale: float,
                  window: int | None = None, softcap: float | None = None, interpret: bool | None = None) -> jax.Array:
    """Causal self-attention in `decoder.attend`'s layout (q [B, T, K, G, D] grouped by KV head, k / v
    [B, T, K, D]) through splash attention: within each segment of `segments` [B, T] (0 = padding), within
    `window` if set (t - s < window), logits soft-capped as the decoder caps them (cap * tanh(logits * scale /
    cap)) if `softcap` is set. Query heads read their KV head in the kernel (no repetition).

    The length is padded to a multiple of 128 (as padding segment) and sliced back; padding rows come out as
    zeros. `interpret` (default: whenever the backend is not TPU) runs the kernel in Pallas's interpreter
    (`pallas_call(interpret=True)`: the same kernel body, grid and block specs, executed as XLA ops; the TPU
    semantics interpreter, `pltpu.InterpretParams`, fails on the batched kernel in JAX 0.10: its grid gains the
    vmapped dimension, its dimension semantics do not).
    Under an active `sharding.activation_sharding` mesh of several devices the kernel runs per shard
    (`jax.shard_map`), batch and KV heads split as the logical rules split "batch" and "kv_heads"."""
    b, t, kv, g, d = q.shape
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    pad = -t % SPLASH_BLOCKS[-1]
    seg = segments.astype(jnp.int32)
    if pad:
        q, k, v = (jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in (q, k, v))
        seg = jnp.pad(seg, [(0, 0), (0, pad)])
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)  # the kernel does not scale

    def run(q, k, v, seg):
        bl, length, kvl = q.shape[:3]
        kernel = _splash_kernel(kvl * g, length, window or None, softcap or None, interpret)
        heads = q.transpose(0, 2, 3, 1, 4).reshape(bl, kvl * g, length, d)  # head k * G + g reads kv head k

        def one(q, k, v, s):
            from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

            return kernel(q, k, v, SegmentIds(s, s))

        out = jax.vmap(one)(heads, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), seg)
        return out.reshape(bl, kvl, g, length, d).transpose(0, 3, 1, 2, 4)

    active = sharding.active_activation_sharding()
    if active is not None and active[0].size > 1:
        mesh, rules = active
        batch, _, heads = (*sharding.logical_spec(("batch", None, "kv_heads"), rules, mesh, (b, t, kv)),
                           None, None, None)[:3]
        run = jax.shard_map(run, mesh=mesh, in_specs=(P(batch, None, heads), P(batch, None, heads),
                                                      P(batch, None, heads), P(batch)),
                            out_specs=P(batch, None, heads), check_vma=False)
    out = run(q, k, v, seg)[:, :t]
    return jnp.where(segments[:, :, None, None, None] != 0, out, 0).astype(q.dtype)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, length: int, window: int | None, softcap: float | None, interpret: bool):
    """The splash kernel of one example: q [heads, length, D] against k / v [kv heads, length, D], causal or
    local (window) by index; built once per shape (its block masks are computed on the host)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    shape = (length, length)
    mask = splash.LocalMask(shape, window_size=(window - 1, 0), offset=0) if window else splash.CausalMask(shape)
    block = next(size for size in SPLASH_BLOCKS if length % size == 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    with jax.ensure_compile_time_eval():  # concrete mask arrays, also when first built inside a trace
        return splash.make_splash_mha(splash.MultiHeadMask((mask,) * heads), block_sizes=sizes,
                                      attn_logits_soft_cap=softcap, head_shards=1, q_seq_shards=1,
                                      interpret=interpret)


def choose(kernel: str, platform: str | None = None) -> str:
    """The attention a `config.attention` value means on `platform` (default: JAX's default backend)."""
    if kernel not in KERNELS:
        raise ValueError(f"config.attention: {kernel!r} is not one of {KERNELS}")
    if kernel in ("blocked", "dot_product"):
        return kernel
    platform = platform or jax.default_backend()
    if kernel == "splash":
        if platform in _GPU:
            raise ValueError("config.attention='splash' is a TPU (Pallas Mosaic) kernel; on GPU use dot_product")
        return kernel
    return "splash" if platform == "tpu" else "dot_product" if platform in _GPU else "blocked"


def set_attention(model: nnx.Module, kernel: str) -> tuple[int, int]:
    """Sets the attention of every decoder attention module of `model` (those with an `attention_kernel`
    attribute); returns (modules set, of which soft-capped and so kept blocked: under dot_product only)."""
    count = capped = 0
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "attention_kernel"):
            module.attention_kernel = kernel
            count += 1
            capped += bool(getattr(module, "softcap", None)) and kernel == "dot_product"
    return count, capped


def describe(kernel: str, count: int, capped: int = 0, platform: str | None = None) -> str:
    """The line a run logs for the attention `set_attention` chose."""
    if kernel == "splash":
        platform = platform or jax.default_backend()
        mode = "" if platform == "tpu" else f"; interpret mode on {platform}"
        return f"attention: splash (Pallas TPU kernel{mode}) in {count} layers"
    kept = f"; {capped} soft-capped layers keep the blocked path" if capped else ""
    return f"attention: {'jax.nn.dot_product_attention' if kernel == 'dot_product' else kernel} in {count} layers{kept}"
