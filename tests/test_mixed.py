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


def test_bias_added_in_float32_and_its_gradient_summed_in_float32():
    """mixed.Linear in bfloat16: bias added before the one rounding; bias and kernel gradients match the
    float32 layer's to bfloat16 rounding; in float32 the layer is exactly `nnx.Linear`."""
    from flax import nnx

    from sft_jax.models.mixed import Linear, linear_bias_dot

    k1, k2, k3, k4 = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(k1, (4, 16, 64)).astype(jnp.bfloat16)
    w = jax.random.normal(k2, (64, 32)).astype(jnp.bfloat16).astype(jnp.float32)
    b = jax.random.normal(k3, (32,)) * 100.0  # large: a bfloat16 bias would lose its low bits
    g = jax.random.normal(k4, (4, 16, 32)).astype(jnp.bfloat16)
    out, vjp = jax.vjp(linear_bias_dot, x, w, b)
    exact = x.astype(jnp.float32) @ w + b
    # one rounding of the float32 value (the float32 values may differ in their last bit near zero)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(exact.astype(jnp.bfloat16), np.float32),
                               rtol=8e-3, atol=1e-5)
    ref = jax.vjp(lambda a, c, d: a @ c + d, x.astype(jnp.float32), w, b)[1](g.astype(jnp.float32))
    dx, dw, db = vjp(g)
    assert (dx.dtype, dw.dtype, db.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)
    np.testing.assert_allclose(np.asarray(dx, np.float32), ref[0], rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(dw, ref[1], rtol=1e-4, atol=1e-3)  # bfloat16 inputs, float32 sums
    np.testing.assert_allclose(db, ref[2], rtol=1e-5, atol=1e-4)
    text = str(jax.make_jaxpr(vjp)(g))
    assert "reduce_sum" in text and all("bf16" not in line for line in text.splitlines() if "reduce_sum" in line)

    f32 = Linear(64, 32, rngs=nnx.Rngs(0))
    plain = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
    xf = x.astype(jnp.float32)
    np.testing.assert_array_equal(np.asarray(f32(xf)), np.asarray(plain(xf)))
    bf = Linear(64, 32, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert bf(xf).dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(bf(xf)), np.asarray(linear_bias_dot(x, bf.kernel[...], bf.bias[...])))


def test_weight_gradient_contracts_leading_axes_in_place():
    """dW = x^T g contracts batch and length where they stand (a 2-axis contraction, which XLA:CPU keeps on
    its bfloat16 path) and equals the flattened [rows, K]^T @ [rows, N] product; 2-D inputs too."""
    from sft_jax.models.mixed import _weight_grad

    k1, k2 = jax.random.split(jax.random.key(2))
    for shape in ((4, 16), (64,)):
        x = jax.random.normal(k1, (*shape, 24)).astype(jnp.bfloat16)
        g = jax.random.normal(k2, (*shape, 8)).astype(jnp.bfloat16)
        want = x.reshape(-1, 24).astype(jnp.float32).T @ g.reshape(-1, 8).astype(jnp.float32)
        got = _weight_grad(x, g)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        jaxpr = str(jax.make_jaxpr(_weight_grad)(x, g))
        assert "dimension_numbers=(([0, 1], [0, 1]), ([], []))" in jaxpr, jaxpr


def test_exact_gelu_custom_vjp_matches_autodiff():
    """BERT's erf GELU with its one-pass backward: value and gradient equal autodiff of
    jax.nn.gelu(approximate=False) in float32; bfloat16 in, bfloat16 out, computed in float32."""
    from sft_jax.models.bert import gelu_exact

    x = jnp.linspace(-8.0, 8.0, 4001)
    g = jnp.cos(x)
    want, want_vjp = jax.vjp(lambda a: jax.nn.gelu(a, approximate=False), x)
    got, got_vjp = jax.vjp(gelu_exact, x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_vjp(g)[0], want_vjp(g)[0], rtol=1e-5, atol=1e-6)
    xb = x.astype(jnp.bfloat16)
    out, vjp = jax.vjp(gelu_exact, xb)
    assert out.dtype == jnp.bfloat16 and vjp(g.astype(jnp.bfloat16))[0].dtype == jnp.bfloat16
    exact = jax.nn.gelu(xb.astype(jnp.float32), approximate=False)
    # one rounding of the float32 value (the float32 values may differ in their last bit near zero)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(exact.astype(jnp.bfloat16), np.float32),
                               rtol=8e-3, atol=1e-5)
