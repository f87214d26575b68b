"""One MiniLM layer's attention, forward + backward: XLA autodiff, a FlashAttention-form custom VJP, PyTorch."""
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

B, T, N, D = 32, 128, 12, 32
ks = jax.random.split(jax.random.PRNGKey(0), 4)
q, k, v = (jax.random.normal(ks[i], (B, T, N, D)) for i in range(3))
bias = jnp.zeros((B, 1, 1, T))
g = jax.random.normal(ks[3], (B, T, N, D))


def autodiff(q, k, v):  # the form of sft_jax.models.bert.BertAttention
    p = jax.nn.softmax(jnp.einsum("btnd,bsnd->bnts", q, k) * D**-.5 + bias, -1)
    return jnp.einsum("bnts,bsnd->btnd", p, v)


@jax.custom_vjp
def flash(q, k, v):
    return _fwd(q, k, v)[0]


def _fwd(q, k, v):
    logits = jnp.einsum("btnd,bsnd->bnts", q, k) * D**-.5 + bias
    e = jnp.exp(logits - jnp.max(logits, -1, keepdims=True))
    inv = jnp.swapaxes(1 / jnp.sum(e, -1), 1, 2)[..., None]
    o = jnp.einsum("bnts,bsnd->btnd", e, v) * inv
    return o, (q, k, v, e, inv, o)


def _bwd(res, do):
    q, k, v, e, inv, o = res
    do = do * inv
    dv = jnp.einsum("bnts,btnd->bsnd", e, do)
    ds = e * (jnp.einsum("btnd,bsnd->bnts", do, v) - jnp.einsum("btnd,btnd->bnt", do, o)[..., None]) * D**-.5
    return jnp.einsum("bnts,bsnd->btnd", ds, k), jnp.einsum("bnts,btnd->bsnd", ds, q), dv


flash.defvjp(_fwd, _bwd)


def jax_step(f):
    fn = jax.jit(lambda q, k, v: jax.vjp(f, q, k, v)[1](g))
    return lambda: jax.block_until_ready(fn(q, k, v))


torch.set_num_threads(2)
tq, tk, tv = (torch.randn(B, N, T, D, requires_grad=True) for _ in range(3))
tg, tbias = torch.randn(B, N, T, D), torch.zeros(B, 1, 1, T)


def sdpa():
    torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tbias).backward(tg)


def math():
    ((tq @ tk.transpose(-1, -2) * D**-.5 + tbias).softmax(-1) @ tv).backward(tg)


cases = {"jax autodiff": jax_step(autodiff), "jax flash vjp": jax_step(flash), "torch sdpa": sdpa,
         "torch math": math}
for f in cases.values():
    f()
for _ in range(3):
    out = []
    for name, f in cases.items():
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        out.append(f"{name} {np.median(ts) * 1e3:.1f} ms")
    print(" | ".join(out), flush=True)
