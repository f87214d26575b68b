"""old: attention differentiated by autodiff; new: decoder.attend's written-out backward."""
import jax.numpy as jnp

import sft_jax.models.decoder as dec

_NEW = dec.attend


def _old(q, k, v, mask, scale):
    p = dec._attention_probs(q, k, mask, scale)
    return jnp.einsum("bkgts,bskd->btkgd", p.astype(q.dtype), v, preferred_element_type=jnp.float32).astype(q.dtype)


def apply(variant: str) -> None:
    dec.attend = {"old": _old, "new": _NEW}[variant]
