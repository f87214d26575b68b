"""Activation rematerialisation (`config.remat`, `sft_jax.models.remat`): the same gradients with every policy,
for decoders, encoders and the ViT; what the backward pass keeps falls as the policy says; runs train alike."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals

from sft_jax.models import remat
from sft_jax.models.bert import BertConfig, BertEncoder
from sft_jax.models.decoder import DecoderConfig, DecoderLM
from sft_jax.models.modernbert import ModernBertConfig, ModernBertEncoder
from sft_jax.models.vit import ViT, ViTConfig
from sft_jax.state import ModelDef

_DECODER = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=1e4)


def _decoder(family):
    extra = dict(model_type="gemma2", sliding_window=4, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                 query_pre_attn_scalar=8) if family == "gemma2" else dict(model_type="llama")
    model = DecoderLM(DecoderConfig.from_hf(dict(_DECODER, **extra)), rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)))
    return model, lambda m, rng: m(ids)


def _bert():
    model = BertEncoder(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=32), rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 10)))
    return model, lambda m, rng: m(ids, jnp.ones_like(ids), dropout_rng=rng)


def _modernbert():
    model = ModernBertEncoder(ModernBertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3,
                                               num_attention_heads=4, intermediate_size=48, local_attention=4,
                                               pad_token_id=0, attention_dropout=0.1, mlp_dropout=0.1),
                              rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(2).integers(1, 64, (2, 10)))
    return model, lambda m, rng: m(ids, jnp.ones_like(ids), dropout_rng=rng)


def _vit():
    model = ViT(ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=32), rngs=nnx.Rngs(0))
    pixels = jnp.asarray(np.random.default_rng(3).normal(size=(2, 8, 8, 3)), jnp.float32)
    return model, lambda m, rng: m(pixels, dropout_rng=rng)


MODELS = {"llama": lambda: _decoder("llama"), "gemma2": lambda: _decoder("gemma2"), "bert": _bert,
          "modernbert": _modernbert, "vit": _vit}


def _grads(build, policy):
    model, forward = build()
    assert remat.set_remat(model, policy) == 1
    model_def, params = ModelDef.split(model)

    def loss(params):  # dropout on where the model has any: the keys go through the remat boundary
        out = forward(model_def.merge(params), jax.random.key(7))
        return jnp.mean(jnp.sin(out.astype(jnp.float32)))

    return jax.jit(jax.grad(loss))(params)


CASES = [(name, "full") for name in MODELS] + [("llama", "dots"), ("llama", "offload"), ("bert", "dots")]


@pytest.mark.parametrize("name,policy", CASES)
def test_gradients_equal_without_remat(name, policy):
    with jax.default_matmul_precision("highest"):
        want, got = _grads(MODELS[name], "none"), _grads(MODELS[name], policy)
    assert set(want) == set(got)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-6, rtol=1e-6, err_msg=key)
    assert max(float(jnp.abs(g).max()) for g in want.values()) > 1e-4


def _residual_bytes(policy):
    """Bytes the backward pass keeps from the forward pass of a 1B Llama shape (Llama 3.2 1B: 16 layers of
    2048, GQA 32/8, MLP 8192) at sequence 2048, besides the parameters and inputs; abstract, nothing runs."""
    config = DecoderConfig.from_hf(dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=5e5, tie_word_embeddings=True))
    model = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
    remat.set_remat(model, policy)
    model_def, params = ModelDef.split(model)

    def loss(params, ids):
        hidden, _ = model_def.merge(params).hidden(ids)
        return jnp.mean(hidden**2)

    kept = saved_residuals(loss, params, jax.ShapeDtypeStruct((1, 2048), jnp.int32))
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a, why in kept if "from the argument" not in why)


def test_full_remat_keeps_a_fraction_of_the_activations():
    """`full` keeps only each block's input (1 x 2048 x 2048 float32 per layer); `dots` adds the projections."""
    none, full, dots = (_residual_bytes(p) for p in ("none", "full", "dots"))
    assert full <= none / 20  # measured: 13.7 GiB -> 0.30 GiB
    assert full < dots < none / 2  # measured: 2.9 GiB
    assert full <= 16 * 2048 * 2048 * 4 * 1.2


def test_models_without_blocks_and_unknown_policies_are_refused():
    with pytest.raises(ValueError, match="config.remat"):
        remat.set_remat(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), "fast")
    assert remat.set_remat(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), "full") == 0
    device = types.SimpleNamespace(platform="fake", id=0, addressable_memories=lambda: [
        types.SimpleNamespace(kind="device")])
    with pytest.raises(ValueError, match="no pinned host memory") as error:
        remat.check_backend("offload", [device])
    assert "\n" not in str(error.value)
    remat.check_backend("full", [device])


@pytest.mark.parametrize("policy", ["offload"])
def test_a_run_with_remat_trains_as_one_without(tiny_config, tmp_path, policy):
    import json

    from sft_jax.train import train_and_evaluate

    def losses(workdir):
        return [row["train/loss"] for row in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
                if "train/loss" in row]

    tiny_config.strategy = "full"
    train_and_evaluate(tiny_config, str(tmp_path / "none"))
    tiny_config.remat = policy
    train_and_evaluate(tiny_config, str(tmp_path / policy))
    np.testing.assert_allclose(losses(tmp_path / policy), losses(tmp_path / "none"), rtol=1e-5)
