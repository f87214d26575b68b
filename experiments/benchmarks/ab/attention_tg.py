"""Tried in stop 17, not kept (8.50 -> 8.78 s, SmolLM2 lora float32 at 1 x 1024 tokens).

old: `decoder.attend` holds logits, probabilities and their gradients as [B, K, G, T, S] (query group
before query row); new: as [B, K, T, G, S], the order of the query's own [B, T, K, G, D] rows, so the
[T * G, S] blocks XLA:CPU hands to its matmuls are reshapes of these arrays rather than transposed copies."""
import jax.numpy as jnp

import sft_jax.models.decoder as decoder

_CUR = decoder._attend_fwd, decoder._attend_bwd
_NEG = decoder._NEG


def _fwd(q, k, v, mask, scale):
    logits = jnp.einsum("btkgd,bskd->bktgs", q, k, preferred_element_type=jnp.float32)
    logits = jnp.where(mask[:, None, :, None], logits * scale, _NEG)
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    inv = jnp.swapaxes(1.0 / jnp.sum(e, axis=-1), 1, 2)[..., None]  # [B, T, K, G, 1]
    e = e.astype(q.dtype)
    o = (jnp.einsum("bktgs,bskd->btkgd", e, v, preferred_element_type=jnp.float32) * inv).astype(q.dtype)
    return o, (q, k, v, mask, e, inv, o)


def _bwd(scale, res, do):
    q, k, v, mask, e, inv, o = res
    f32 = jnp.float32
    do = (do.astype(f32) * inv).astype(q.dtype)
    dv = jnp.einsum("bktgs,btkgd->bskd", e, do, preferred_element_type=f32).astype(v.dtype)
    dp = jnp.einsum("btkgd,bskd->bktgs", do, v, preferred_element_type=f32)
    row = jnp.einsum("btkgd,btkgd->bktg", do.astype(f32), o.astype(f32))
    ds = jnp.where(mask[:, None, :, None], e.astype(f32) * (dp - row[..., None]) * scale, 0.0).astype(q.dtype)
    dq = jnp.einsum("bktgs,bskd->btkgd", ds, k, preferred_element_type=f32).astype(q.dtype)
    dk = jnp.einsum("bktgs,btkgd->bskd", ds, q, preferred_element_type=f32).astype(k.dtype)
    return dq, dk, dv, None


def apply(variant: str) -> None:
    fwd, bwd = {"old": _CUR, "new": (_fwd, _bwd)}[variant]  # not kept: "old" is the code as it stands
    decoder._attend_fwd = fwd
    decoder.attend.defvjp(fwd, bwd)
