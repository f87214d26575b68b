"""BERT q, k and v projections: sep: three [H, H] products, as `bert.BertAttention` has them; fused: the three
kernels (and biases) concatenated into one [H, 3H] product each step, its output split (one forward, one
input-gradient and one weight-gradient dot per layer instead of three each). Not kept (stop 19)."""
import jax
import jax.numpy as jnp

import sft_jax.models.bert as bert
from sft_jax.models.dropout import dropout
from sft_jax.models.mixed import linear_dot

_ORIG = bert.BertAttention.__call__


def _fused_call(self, x, bias, *, dropout_rng=None):
    b, t, h = x.shape
    kernel = jnp.concatenate([self.query.kernel[...], self.key.kernel[...], self.value.kernel[...]], axis=1)
    qkv_bias = jnp.concatenate([self.query.bias[...], self.key.bias[...], self.value.bias[...]])
    qkv = linear_dot(x, kernel) + qkv_bias
    q, k, v = (a.reshape(b, t, self.num_heads, self.head_dim) for a in jnp.split(qkv, 3, axis=-1))
    logits = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits * (self.head_dim**-0.5) + bias, axis=-1)
    probs = dropout(probs, self.dropout_rate, dropout_rng)
    ctx = jnp.einsum("bnts,bsnd->btnd", probs, v, preferred_element_type=jnp.float32)
    return self.out(ctx.reshape(b, t, -1))


def apply(variant: str) -> None:
    bert.BertAttention.__call__ = {"old": _ORIG, "sep": _ORIG, "fused": _fused_call}[variant]
