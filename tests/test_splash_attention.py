"""Decoder attention through JAX's splash attention, the Pallas TPU flash-attention kernel (`config.attention=
splash`, `models/fused_attention.py`), run on CPU in Pallas's interpreter: equal to the blocked attention on
every mask kind, with grouped-query heads and soft-capped logits, forward and backward (the kernel's own
backward); per shard under a sharded mesh; inside the decoder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sft_jax import sharding
from sft_jax.models import fused_attention
from sft_jax.models.decoder import DecoderConfig, DecoderLM, attention_mask, causal_attend


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _segments(kind, b, t):
    seg = np.ones((b, t), np.int32)
    if kind == "padding":
        seg[1, t - 10:] = 0
    if kind == "packed":
        seg[0, 15:] = 2
        seg[1, 10:25], seg[1, 25:t - 5], seg[1, t - 5:] = 2, 3, 0
    return jnp.asarray(seg)


def _inputs(b, t, kv, g, d):
    rng = np.random.default_rng(0)
    return tuple(jnp.asarray(rng.normal(size=s), jnp.float32)
                 for s in ((b, t, kv, g, d), (b, t, kv, d), (b, t, kv, d)))


def _blocked(q, k, v, seg, window, softcap):  # blocks of 16 rows (40 tokens) or 128 (300): several either way
    t = q.shape[1]
    index = jnp.broadcast_to(jnp.arange(t), seg.shape)
    mask = attention_mask(seg, index, seg, index, window)
    return causal_attend(q, k, v, mask, 0.3, window, block=16 if t < 128 else None, softcap=softcap)


def _splash(q, k, v, seg, window, softcap):
    return fused_attention.splash_attend(q, k, v, seg, 0.3, window, softcap)


def _loss(f, q, k, v, seg, window, softcap):
    return jnp.sum(jnp.where(seg[:, :, None, None, None] != 0, jnp.sin(f(q, k, v, seg, window, softcap)), 0))


# Compiled once per (window, cap, length): the cases that share them share the programs.
_forward = {f: jax.jit(f, static_argnums=(4, 5)) for f in (_blocked, _splash)}
_grads = jax.jit(jax.grad(_loss, (1, 2, 3)), static_argnums=(0, 5, 6))

# (mask kind, window, soft cap, length): 40 tokens pad to one 128-row block; 300 pad to three, whose
# all-masked blocks (above the diagonal, left of the window) the kernel skips.
CASES = [("causal", None, None, 40), ("padding", None, None, 40), ("packed", None, None, 40), ("packed", 6, 5.0, 40),
         ("packed", 150, None, 300)]


@pytest.mark.parametrize("kind,window,softcap,t", CASES)
def test_equals_blocked_attention(kind, window, softcap, t):
    q, k, v = _inputs(2, t, 2, 2, 8)  # 4 query heads on 2 KV heads
    seg = _segments(kind, 2, t)
    valid = np.asarray(seg != 0)
    got = np.asarray(_forward[_splash](q, k, v, seg, window, softcap))
    np.testing.assert_allclose(got[valid], np.asarray(_forward[_blocked](q, k, v, seg, window, softcap))[valid],
                               atol=1e-5)
    assert not got[~valid].any()  # padding rows are zeros
    want, got = (_grads(f, q, k, v, seg, window, softcap) for f in (_blocked, _splash))
    for w, x in zip(want, got):
        np.testing.assert_allclose(x, w, atol=1e-5)


def test_runs_per_shard_under_a_mesh():
    b, t, kv, g, d = 4, 40, 2, 2, 8
    q, k, v = _inputs(b, t, kv, g, d)
    seg = _segments("packed", b, t)
    want = fused_attention.splash_attend(q, k, v, seg, 0.3, 6)
    mesh = sharding.make_mesh({"data": 2, "tensor": 2})

    @jax.jit
    def sharded(q, k, v, seg):
        with sharding.activation_sharding(mesh):
            return fused_attention.splash_attend(q, k, v, seg, 0.3, 6)

    text = sharded.lower(q, k, v, seg).as_text()
    assert "shard_map" in text or "manual" in text  # the kernel runs on each device's batch and heads
    np.testing.assert_allclose(sharded(q, k, v, seg), want, atol=1e-6)


def test_decoder_with_splash_attention():
    """Gemma 2: a sliding-window layer and a global one, both soft-capped, 4 query heads on 2 KV heads."""
    config = DecoderConfig.from_hf(dict(model_type="gemma2", vocab_size=64, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        max_position_embeddings=64, rms_norm_eps=1e-5, sliding_window=4,
                                        attn_logit_softcapping=5.0, query_pre_attn_scalar=8))
    model = DecoderLM(config, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 12)))
    mask = jnp.asarray(np.r_[[[1] * 12], [[1] * 9 + [0] * 3]], jnp.int32)
    want = np.asarray(model(ids, mask))
    count, capped = fused_attention.set_attention(model, "splash")
    assert (count, capped) == (2, 0)  # splash caps Gemma 2's logits itself
    np.testing.assert_allclose(np.asarray(model(ids, mask))[mask != 0], want[mask != 0], atol=1e-5)


def test_choice_by_platform():
    assert fused_attention.choose("auto", "tpu") == "splash"
    assert fused_attention.choose("splash", "cpu") == "splash"  # the interpreter: tests
    assert fused_attention.choose("dot_product", "tpu") == "dot_product"
    with pytest.raises(ValueError, match="config.attention='splash'"):
        fused_attention.choose("splash", "gpu")
    assert "interpret mode on cpu" in fused_attention.describe("splash", 2, platform="cpu")
    assert fused_attention.describe("splash", 2, platform="tpu") == "attention: splash (Pallas TPU kernel) in 2 layers"
