"""Decoder attention through `jax.nn.dot_product_attention` (`config.attention`, `models/fused_attention.py`):
XLA's implementation equals the blocked attention on every mask kind, forward and backward; runs (splash too) train
alike."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sft_jax.models import fused_attention
from sft_jax.models.decoder import DecoderConfig, DecoderLM, attention_mask, causal_attend


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _segments(kind, b=2, t=40):
    seg = np.ones((b, t), np.int32)
    if kind == "padding":
        seg[1, 30:] = 0
    if kind == "packed":
        seg[0, 15:] = 2
        seg[1, 10:25], seg[1, 25:] = 2, 0
    return jnp.asarray(seg)


@pytest.mark.parametrize("kind,window", [("causal", None), ("padding", None), ("packed", None), ("causal", 6),
                                         ("packed", 6)])
def test_equals_blocked_attention(kind, window):
    rng = np.random.default_rng(0)
    b, t, kv, g, d = 2, 40, 2, 3, 8
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((b, t, kv, g, d), (b, t, kv, d), (b, t, kv, d)))
    seg = _segments(kind)
    index = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = attention_mask(seg, index, seg, index, window)
    valid = np.asarray(seg != 0)

    def blocked(q, k, v):
        return causal_attend(q, k, v, mask, 0.3, window, block=16)

    def fused(q, k, v):
        return fused_attention.dot_product_attend(q, k, v, mask, 0.3, implementation="xla")

    np.testing.assert_allclose(np.asarray(fused(q, k, v))[valid], np.asarray(blocked(q, k, v))[valid], atol=1e-5)

    def loss(f):
        return lambda q, k, v: jnp.sum(jnp.where(seg[:, :, None, None, None] != 0, jnp.sin(f(q, k, v)), 0))

    want, got = (jax.jit(jax.grad(loss(f), (0, 1, 2)))(q, k, v) for f in (blocked, fused))  # compiled once each
    for w, x in zip(want, got):
        np.testing.assert_allclose(x, w, atol=1e-5)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_decoder_with_dot_product_attention(family):
    extra = dict(model_type="gemma2", attn_logit_softcapping=5.0, query_pre_attn_scalar=8) if family == "gemma2" \
        else dict(model_type="mistral")
    config = DecoderConfig.from_hf(dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        max_position_embeddings=64, rms_norm_eps=1e-5, sliding_window=4, **extra))
    model = DecoderLM(config, rngs=nnx.Rngs(0))
    ids, mask = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 12))), jnp.ones((2, 12), jnp.int32)
    want = model(ids, mask)
    count, capped = fused_attention.set_attention(model, "dot_product")
    assert count == 2 and capped == (2 if family == "gemma2" else 0)  # soft-capped layers keep the blocked path
    np.testing.assert_allclose(model(ids, mask), want, atol=1e-5)


def test_choice_by_platform():
    assert fused_attention.choose("auto", "cpu") == "blocked"
    assert fused_attention.choose("auto", "gpu") == "dot_product"
    assert fused_attention.choose("blocked", "gpu") == "blocked"
    with pytest.raises(ValueError, match="config.attention"):
        fused_attention.choose("flash", "gpu")


def test_a_run_with_each_attention(tiny_llama_dir, tmp_path):
    import json

    from conftest import lm_config

    from sft_jax.train import train_and_evaluate

    losses = {}
    for kernel in ("blocked", "dot_product", "splash"):  # splash: in the Pallas interpreter on CPU
        (tmp_path / kernel).mkdir()
        c = lm_config(tiny_llama_dir, tmp_path / kernel, "full")
        c.attention = kernel
        train_and_evaluate(c, str(tmp_path / kernel / "run"))
        rows = map(json.loads, (tmp_path / kernel / "run" / "metrics.jsonl").read_text().splitlines())
        losses[kernel] = [r["train/loss"] for r in rows if "train/loss" in r]
    for kernel in ("dot_product", "splash"):
        np.testing.assert_allclose(losses[kernel], losses["blocked"], rtol=1e-5)
