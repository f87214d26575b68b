"""Tried in stop 17, not kept (8.05 -> 8.14 s, SmolLM2 lora float32 at 1 x 1024 tokens).

old: `decoder._attend_bwd` computes dV = E^T dO' and dK = dS^T Q as [S, D] products, whose [T, S]
operand XLA:CPU first copies into a transposed layout; new: it computes dV^T = dO'^T E and dK^T = Q^T dS
([D, S], contracting the [T, S] operand over its major axis, as it is laid out) and transposes the small
[D, S] result."""
import jax.numpy as jnp

import sft_jax.models.decoder as decoder

_NEW = decoder._attend_bwd


def _new_bwd(scale, res, do):
    q, k, v, mask, e, inv, o = res
    f32 = jnp.float32
    do = (do.astype(f32) * inv).astype(q.dtype)
    dv = jnp.einsum("btkgd,bkgts->bkds", do, e, preferred_element_type=f32)
    dv = jnp.einsum("bkds->bskd", dv).astype(v.dtype)
    dp = jnp.einsum("btkgd,bskd->bkgts", do, v, preferred_element_type=f32)
    row = jnp.einsum("btkgd,btkgd->bkgt", do.astype(f32), o.astype(f32))
    ds = jnp.where(mask[:, None, None], e.astype(f32) * (dp - row[..., None]) * scale, 0.0).astype(q.dtype)
    dq = jnp.einsum("bkgts,bskd->btkgd", ds, k, preferred_element_type=f32).astype(q.dtype)
    dk = jnp.einsum("btkgd,bkgts->bkds", q, ds, preferred_element_type=f32)
    dk = jnp.einsum("bkds->bskd", dk).astype(k.dtype)
    return dq, dk, dv, None


def apply(variant: str) -> None:
    bwd = {"old": _NEW, "new": _new_bwd}[variant]  # not kept: "old" is the code as it stands
    decoder.attend.defvjp(decoder._attend_fwd, bwd)
