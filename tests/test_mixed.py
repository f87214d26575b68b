"""bfloat16 linear layers: float32 accumulation forward and backward (models/mixed.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def test_float32_linear_uses_the_custom_vjp_with_autodiff_values():
    """float32 layers built with `linear_kwargs` go through `linear_dot` too (its backward is what keeps
    XLA:CPU from fusing a strided transpose into the gradient's producer): the same output as `nnx.Linear`,
    the same gradients to float32 rounding, and the weight gradient one flattened [rows, K]^T @ [rows, N] dot."""
    from flax import nnx

    from sft_jax.models.mixed import linear_kwargs

    kwargs = linear_kwargs(jnp.float32)
    assert kwargs["dot_general"] is dot_general
    ours = nnx.Linear(48, 24, use_bias=False, rngs=nnx.Rngs(3), **kwargs)
    plain = nnx.Linear(48, 24, use_bias=False, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(4), (3, 10, 48))

    def loss(layer, x):
        return jnp.sum(jnp.sin(layer(x)))

    np.testing.assert_array_equal(np.asarray(ours(x)), np.asarray(plain(x)))
    (g_ours, dx_ours), (g_plain, dx_plain) = (nnx.grad(loss, argnums=(0, 1))(m, x) for m in (ours, plain))
    np.testing.assert_allclose(dx_ours, dx_plain, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_ours.kernel.value, g_plain.kernel.value, rtol=1e-5, atol=1e-5)
    text = str(jax.make_jaxpr(nnx.grad(loss))(ours, x))
    assert "custom_vjp_call" in text
    assert "dimension_numbers=(([0], [0]), ([], []))" in text, text


def test_attention_backward_matches_autodiff_with_padding_and_packing():
    """decoder.attend's written-out backward equals autodiff of the masked softmax attention: packed
    segments, padding rows (no key to attend to: zero gradient), grouped queries, a KV longer than the query
    (as with a cache); float32 tightly, bfloat16 to its rounding."""
    from sft_jax.models.decoder import _attention_probs, attend, attention_mask

    b, t, s, k, g, d = 2, 7, 9, 2, 3, 8
    keys = jax.random.split(jax.random.key(5), 4)
    q = jax.random.normal(keys[0], (b, t, k, g, d))
    kk = jax.random.normal(keys[1], (b, s, k, d))
    v = jax.random.normal(keys[2], (b, s, k, d))
    do = jax.random.normal(keys[3], q.shape)
    q_seg = jnp.array([[1, 1, 1, 2, 2, 0, 0], [1] * 7])
    k_seg = jnp.concatenate([jnp.array([[1, 1]] * 2), q_seg], axis=1)  # two cached slots before the query
    mask = attention_mask(q_seg, jnp.broadcast_to(jnp.arange(2, 9), (b, t)), k_seg,
                          jnp.broadcast_to(jnp.arange(s), (b, s)), None)

    def ref(q, kk, v):
        return jnp.einsum("bkgts,bskd->btkgd", _attention_probs(q, kk, mask, 0.3), v)

    want, want_vjp = jax.vjp(ref, q, kk, v)
    got, got_vjp = jax.vjp(lambda a, c, e: attend(a, c, e, mask, 0.3), q, kk, v)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    grads = got_vjp(do)
    assert not np.any(np.asarray(grads[0][0, 5:]))  # padding queries
    for a, w in zip(grads, want_vjp(do)):
        np.testing.assert_allclose(a, w, rtol=1e-4, atol=1e-5)
    bf = [x.astype(jnp.bfloat16) for x in (q, kk, v)]
    out, vjp = jax.vjp(lambda a, c, e: attend(a, c, e, mask, 0.3), *bf)
    assert out.dtype == jnp.bfloat16
    for a, w in zip(vjp(do.astype(jnp.bfloat16)), want_vjp(do)):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), w, rtol=0.1, atol=0.1)


@pytest.mark.parametrize("window", [None, 3, 6])
def test_causal_attend_in_blocks_matches_one_block(window):
    """decoder.causal_attend, in query blocks that skip the keys the causal (and sliding-window) mask hides,
    gives `attend`'s outputs and gradients on every real token, with packed segments and padding, for
    blocks that divide the length and ones that do not."""
    from sft_jax.models.decoder import attend, attention_mask, causal_attend

    b, t, k, g, d = 2, 11, 2, 2, 8
    keys = jax.random.split(jax.random.key(7), 4)
    q = jax.random.normal(keys[0], (b, t, k, g, d))
    kk = jax.random.normal(keys[1], (b, t, k, d))
    v = jax.random.normal(keys[2], (b, t, k, d))
    do = jax.random.normal(keys[3], q.shape)
    seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0], [1] * t])
    index = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = attention_mask(seg, index, seg, index, window)
    real = np.asarray(seg != 0)
    do = do * real[:, :, None, None, None]  # the loss reads real tokens only
    def value_and_vjp(fn):  # jitted: one compilation instead of an op-by-op forward and backward
        def run(q, kk, v, do):
            out, pullback = jax.vjp(fn, q, kk, v)
            return out, pullback(do)
        return jax.jit(run)(q, kk, v, do)

    want, want_grads = value_and_vjp(lambda a, c, e: attend(a, c, e, mask, 0.3))
    for block in (2, 4, 5):
        got, got_grads = value_and_vjp(lambda a, c, e, n=block: causal_attend(a, c, e, mask, 0.3, window, n))
        np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-5, atol=1e-6)
        for a, w in zip(got_grads, want_grads):
            np.testing.assert_allclose(a, w, rtol=1e-4, atol=1e-5)
    # The blocks really skip keys: blocks of 4 query rows over 11 tokens read keys [0, 4), [0, 8), [0, 11)
    # (from start - window + 1 with a window), not all 11 each.
    jaxpr = jax.make_jaxpr(lambda a, c, e: causal_attend(a, c, e, mask, 0.3, window, 4))(q, kk, v).jaxpr
    spans = [e.invars[1].aval.shape[1] for e in jaxpr.eqns if e.primitive.name == "custom_vjp_call"]
    assert spans == [end - (max(0, start - window + 1) if window else 0) for start, end in ((0, 4), (4, 8), (8, 11))]
