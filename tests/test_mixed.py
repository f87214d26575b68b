"""bfloat16 linear layers: float32 accumulation forward and backward (models/mixed.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.models.mixed import dot_general, linear_dot


def test_linear_dot_value_and_gradients_match_float32():
    """On bfloat16-representable inputs: the float32 product and both gradients, to bfloat16 rounding."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (4, 16, 64)).astype(jnp.bfloat16)
    w = jax.random.normal(k2, (64, 32)).astype(jnp.bfloat16)
    g = jax.random.normal(k3, (4, 16, 32)).astype(jnp.bfloat16)
    out, vjp = jax.vjp(lambda a, b: linear_dot(a, b, jnp.float32), x, w)
    ref, ref_vjp = jax.vjp(lambda a, b: a @ b, x.astype(jnp.float32), w.astype(jnp.float32))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)  # exact products, float32 sums
    for got, want in zip(vjp(g.astype(jnp.float32)), ref_vjp(g.astype(jnp.float32))):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=2e-2)


def test_backward_matmuls_accumulate_in_float32():
    """The gradient's dots ask for float32 results (the fast bfloat16 path), none is bfloat16 -> bfloat16."""
    x = jnp.ones((8, 64), jnp.bfloat16)
    w = jnp.ones((64, 32), jnp.bfloat16)

    def loss(x, w):
        y = dot_general(x, w, (((1,), (0,)), ((), ())))
        return jnp.sum(y.astype(jnp.float32) ** 2)

    text = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w))
    dots = [line for line in text.splitlines() if "dot_general" in line]
    assert len(dots) == 3
    assert all(line.split("=")[0].split(":")[-1].startswith("f32[") for line in dots), dots
