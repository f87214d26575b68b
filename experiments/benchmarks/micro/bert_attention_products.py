"""One MiniLM layer's attention core (batch 32, 12 heads of 32, 128 tokens, dropout 0.1), forward and backward,
with oneDNN dots: the autodiff form of `bert.BertAttention` against the custom VJPs of
`../ab/bert_attention_vjp.py` (stop 19: faster alone, no faster in the step; ../notes.md).

    python -m experiments.benchmarks.micro.bert_attention_products
"""

import statistics
import time

import jax
import jax.numpy as jnp

from experiments.benchmarks.ab.bert_attention_vjp import scores, values
from sft_jax import platform
from sft_jax.models.dropout import dropout
from sft_jax.train_step import CPU_MATMULS

B, T, N, D = 32, 128, 12, 32
F = jnp.float32


def autodiff_scores(q, k):
    return jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=F)


def autodiff_values(p, v):
    return jnp.einsum("bnts,bsnd->btnd", p, v, preferred_element_type=F)


def core(score_fn, value_fn, bias, key):
    def f(q, k, v):
        p = dropout(jax.nn.softmax(score_fn(q, k) * D**-0.5 + bias, -1), 0.1, key)
        return value_fn(p, v)
    return f


if __name__ == "__main__":
    platform.configure_cpu()  # malloc and XNNPACK settings, before JAX starts
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    q, k, v, g = (jax.random.normal(ks[i], (B, T, N, D)) for i in range(4))
    bias = jnp.where(jnp.arange(T)[None, None, None, :] < 100, 0.0, jnp.finfo(F).min) * jnp.ones((B, 1, 1, 1))
    forms = {"autodiff": core(autodiff_scores, autodiff_values, bias, ks[4]), "vjp": core(scores, values, bias, ks[4])}
    fns = {name: jax.jit(lambda q, k, v, f=f: jax.vjp(f, q, k, v)[1](g), compiler_options=CPU_MATMULS["onednn"])
           for name, f in forms.items()}
    ref = fns["autodiff"](q, k, v)
    for a, b in zip(fns["vjp"](q, k, v), ref):
        assert jnp.allclose(a, b, rtol=1e-3, atol=1e-4)
    times = {name: [] for name in fns}
    for _ in range(9):
        for name, f in fns.items():
            t = time.perf_counter()
            for _ in range(5):
                out = f(q, k, v)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - t) / 5 * 1e3)
    print("forward + backward, ms: " + "  ".join(f"{n} {statistics.median(x):.1f}" for n, x in times.items()))
