"""old: `decoder.attend` normalises the [T, S] probabilities (P = softmax) and keeps P for the backward pass;
new: it keeps E = exp(logits - max) and scales the [T, D] output and output gradient by 1 / rowsum(E)."""
import jax.numpy as jnp

import sft_jax.models.decoder as decoder

_NEW = decoder._attend_fwd, decoder._attend_bwd


def _old_fwd(q, k, v, mask, scale):
    p = decoder._attention_probs(q, k, mask, scale).astype(q.dtype)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v, preferred_element_type=jnp.float32).astype(q.dtype)
    return o, (q, k, v, mask, p, o)


def _old_bwd(scale, res, do):
    q, k, v, mask, p, o = res
    f32 = jnp.float32
    do = do.astype(q.dtype)
    dv = jnp.einsum("bkgts,btkgd->bskd", p, do, preferred_element_type=f32).astype(v.dtype)
    dp = jnp.einsum("btkgd,bskd->bkgts", do, v, preferred_element_type=f32)
    row = jnp.einsum("btkgd,btkgd->bkgt", do.astype(f32), o.astype(f32))
    ds = jnp.where(mask[:, None, None], p.astype(f32) * (dp - row[..., None]) * scale, 0.0).astype(q.dtype)
    dq = jnp.einsum("bkgts,bskd->btkgd", ds, k, preferred_element_type=f32).astype(q.dtype)
    dk = jnp.einsum("bkgts,btkgd->bskd", ds, q, preferred_element_type=f32).astype(k.dtype)
    return dq, dk, dv, None


def apply(variant: str) -> None:
    fwd, bwd = {"old": (_old_fwd, _old_bwd), "new": _NEW}[variant]
    decoder._attend_fwd = fwd  # attend's primal calls it by name
    decoder.attend.defvjp(fwd, bwd)
