"""BERT attention products (stop 19, not kept): cur: XLA autodiff of the two einsums, as `bert.BertAttention`
has them (the key and value gradients contract the [T, S] operand down its columns); vjp: custom VJPs that
compute those two gradients as (a^T b)^T, the operand with T first copied to [B, N, D, T]."""
import jax
import jax.numpy as jnp
from jax import lax

import sft_jax.models.bert as bert
from sft_jax.models.dropout import dropout

F = jnp.float32
_ORIG = bert.BertAttention.__call__


def _contract_time(a, b):
    """a [B, T, N, D], b [B, N, T, S] -> sum_t a b as [B, S, N, D], via [B, N, D, T] x [B, N, T, S]."""
    a_t = lax.optimization_barrier(jnp.transpose(a, (0, 2, 3, 1)))
    return jnp.transpose(jnp.einsum("bndt,bnts->bnds", a_t, b, preferred_element_type=F), (0, 3, 1, 2))


@jax.custom_vjp
def scores(q, k):
    return jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=F)


def _scores_bwd(res, g):
    q, k = res
    dq = jnp.einsum("bnts,bsnd->btnd", g, k, preferred_element_type=F)
    return dq.astype(q.dtype), _contract_time(q, g).astype(k.dtype)


scores.defvjp(lambda q, k: (scores(q, k), (q, k)), _scores_bwd)


@jax.custom_vjp
def values(p, v):
    return jnp.einsum("bnts,bsnd->btnd", p, v, preferred_element_type=F)


def _values_bwd(res, g):
    p, v = res
    dp = jnp.einsum("btnd,bsnd->bnts", g, v, preferred_element_type=F)
    return dp.astype(p.dtype), _contract_time(g, p).astype(v.dtype)


values.defvjp(lambda p, v: (values(p, v), (p, v)), _values_bwd)


def _vjp_call(self, x, bias, *, dropout_rng=None):
    b, t, _ = x.shape
    split = (b, t, self.num_heads, self.head_dim)
    q, k, v = (f(x).reshape(split) for f in (self.query, self.key, self.value))
    probs = jax.nn.softmax(scores(q, k) * (self.head_dim**-0.5) + bias, axis=-1)
    probs = dropout(probs, self.dropout_rate, dropout_rng)
    return self.out(values(probs.astype(v.dtype), v).astype(v.dtype).reshape(b, t, -1))


def apply(variant: str) -> None:
    bert.BertAttention.__call__ = {"old": _ORIG, "cur": _ORIG, "vjp": _vjp_call}[variant]
