"""old: the float32 LM head as an autodiff einsum; new: through linear_dot (bfloat16 was already)."""
import jax.numpy as jnp

import sft_jax.models.decoder as dec

_NEW = dec.DecoderLM._logits


def _old(self, hidden):
    dtype = self.config.dtype
    if dtype == jnp.bfloat16:
        return _NEW(self, hidden)
    if self.lm_head is None:
        return jnp.einsum("...h,vh->...v", hidden.astype(dtype), self.embed.embedding.value.astype(dtype),
                          preferred_element_type=jnp.float32)
    return jnp.einsum("...h,hv->...v", hidden.astype(dtype), self.lm_head.kernel.value.astype(dtype),
                      preferred_element_type=jnp.float32)


def apply(variant: str) -> None:
    dec.DecoderLM._logits = {"old": _old, "new": _NEW}[variant]
