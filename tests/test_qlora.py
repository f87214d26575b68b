"""QLoRA (`config.quantize_base`, `sft_jax.models.quant`): int8 and NF4 base kernels with double-quantised
scales, dequantised inside a custom VJP that keeps no full-precision copy; LoRA trains on top."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals

from sft_jax.models import quant
from sft_jax.models.decoder import DecoderConfig, DecoderLM
from sft_jax.models.lora import apply_lora, merge_lora, quantize_bases
from sft_jax.state import ModelDef


def _weights(shape=(256, 96), seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(0, 0.02, shape), jnp.float32)


@pytest.mark.parametrize("kind,bits,error", [("int8", 8.5, 0.01), ("nf4", 4.16, 0.12)])
def test_quantisation_error_and_size(kind, bits, error):
    """Bits per weight: int8 8 + 32 / 64 (float32 absmax per block of 64); nf4 4 + 8 / 64 (8-bit absmax) +
    32 / 1024 (one float32 step per column of 1024 rows)."""
    w = _weights((1024, 96))
    q = quant.quantize(w, kind)
    back = quant.dequantize(q, kind)
    relative = float(jnp.sqrt(jnp.mean((back - w) ** 2)) / jnp.sqrt(jnp.mean(w**2)))
    assert relative < error  # measured: int8 0.007, nf4 0.10
    stored = sum(a.size * a.dtype.itemsize for a in q.values()) * 8 / w.size
    assert stored <= bits
    if kind == "nf4":
        assert q["codes"].dtype == jnp.uint8 and q["codes"].shape == (1024, 48)
        scale = (q["absmax"].astype(jnp.float32) * q["absmax_step"]).repeat(64, 0)
        levels = np.unique(np.round(np.asarray(back / scale), 5))
        np.testing.assert_allclose(levels, np.round(quant.NF4_LEVELS, 5))  # the 16 levels, each used


def test_matmul_gradient_without_a_float_copy():
    """The input gradient equals that of the dequantised product; the backward pass keeps only the quantised
    arrays (and the input's dtype), not the [in, out] float kernel."""
    w, x = _weights(), _weights((4, 7, 256), seed=1)
    q = quant.quantize(w, "nf4")

    def ours(x):
        return jnp.sum(jnp.sin(quant.matmul(x, q, "nf4", jnp.float32)))

    def plain(x):
        return jnp.sum(jnp.sin(x @ quant.dequantize(q, "nf4")))

    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(plain)(x), atol=1e-6)
    kept = saved_residuals(ours, x)
    assert not any(a.shape == w.shape for a, _ in kept)
    assert any(a.shape == w.shape for a, _ in saved_residuals(plain, x))


def _lora_model(kind):
    config = DecoderConfig.from_hf(dict(
        model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5,
        rope_theta=1e4, attention_bias=True))
    model = DecoderLM(config, rngs=nnx.Rngs(0))
    apply_lora(model, r"layers/\d+/(attn/(q|k|v|o)|mlp/(gate|up|down))$", 4, 8.0, rngs=nnx.Rngs(1))
    reference = nnx.clone(model)
    if kind != "none":
        assert len(quantize_bases(model, kind)) == 14
    return model, reference


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantised_lora_model(kind):
    """Outputs near the float model's; adapters train through it; merging gives a plain float model whose
    outputs equal the quantised one's; no residual holds a float copy of a projection."""
    model, reference = _lora_model(kind)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 96, (2, 10)))
    close = {"int8": 0.02, "nf4": 0.3}[kind]
    assert float(jnp.abs(model(ids) - reference(ids)).max()) < close * float(jnp.abs(reference(ids)).max())
    model_def, params = ModelDef.split(model)
    assert "layers/0/attn/q/kernel/codes" in params and "layers/0/attn/q/kernel" not in params
    assert params["layers/0/attn/q/bias"].dtype == jnp.float32  # biases stay as they were
    # A quantised kernel counts as the weights it stands for, its scales not at all.
    assert quant.count_weights(params) == quant.count_weights(reference_params(reference))

    adapters = {k: v for k, v in params.items() if k.endswith(("lora_a", "lora_b"))}
    frozen = {k: v for k, v in params.items() if k not in adapters}

    def loss(adapters):
        return jnp.mean(model_def.merge({**frozen, **adapters})(ids) ** 2)

    grads = jax.jit(jax.grad(loss))(adapters)  # one compilation, not an op-by-op backward pass
    assert float(jnp.abs(grads["layers/1/mlp/down/lora_b"]).max()) > 0
    kept = saved_residuals(loss, adapters)
    kernel_shapes = {tuple(v.shape) for k, v in reference_params(reference).items()
                     if k.startswith("layers/") and k.endswith("/kernel")}  # the projections (not lm_head)
    assert not any(tuple(a.shape) in kernel_shapes and jnp.issubdtype(a.dtype, jnp.floating) for a, _ in kept)

    trained = model_def.merge({**frozen, **{k: v + 0.05 for k, v in adapters.items()}})
    np.testing.assert_allclose(merge_lora(trained)(ids), trained(ids), atol=2e-5)


def reference_params(model):
    return ModelDef.split(model)[1]


def test_qlora_run_with_remat(tiny_llama_dir, tmp_path):
    """strategy=lora with an NF4 base and remat=full trains; the quantised base, left out of the checkpoints
    (tests/test_frozen_base.py), is rebuilt unchanged; the run's workdir rebuilds (quantising the base again)
    for generation."""
    from conftest import lm_config

    from sft_jax.generate import generate
    from sft_jax.models.finetuned import build_lm
    from sft_jax.rundir import RunDir
    from sft_jax.tasks.language_model import load_lm
    from sft_jax.train import train_and_evaluate

    c = lm_config(tiny_llama_dir, tmp_path, "lora")
    c.quantize_base, c.remat, c.max_steps = "nf4", "full", 3
    results = train_and_evaluate(c, str(tmp_path / "run"))
    assert np.isfinite(results["eval/loss"])
    start = ModelDef.split(build_lm(str(tiny_llama_dir), "lora", lora=c.lora, quantize_base="nf4")[0])[1]
    after = RunDir(str(tmp_path / "run")).restore_params(start, "latest")
    quantised = [k for k in start if k.endswith("/codes")]
    assert len(quantised) == 14 and all(after[k].dtype == jnp.uint8 for k in quantised)
    for name in start:
        same = np.array_equal(np.asarray(after[name]), np.asarray(start[name]))
        if name.endswith("/lora_b"):
            assert not same, name
        elif not name.endswith("/lora_a"):
            assert same, name  # the quantised base, norms and embedding: bit-identical
    lm, tokenizer = load_lm(workdir=str(tmp_path / "run"))
    assert generate(lm, tokenizer, ["First Citizen:"], max_new_tokens=3)[0] is not None


def test_qlora_needs_lora_and_a_language_model(tiny_config, tiny_llama_dir, tmp_path):
    from conftest import lm_config

    from sft_jax.config_defaults import validate

    c = lm_config(tiny_llama_dir, tmp_path, "full")
    c.quantize_base = "nf4"
    with pytest.raises(ValueError, match="needs strategy='lora'"):
        validate(c)
    tiny_config.strategy, tiny_config.quantize_base = "lora", "int8"
    with pytest.raises(ValueError, match="quantize_base"):
        validate(tiny_config)


def test_planned_bytes_of_a_quantised_base(tmp_path):
    from conftest import planned_config

    from sft_jax.plan import plan

    c = planned_config(tmp_path, "lora")
    plain = plan(c)
    c.quantize_base = "nf4"
    nf4 = plan(c)
    projections = 2 * (256 * 256 * 2 + 256 * 128 * 2 + 3 * 256 * 512)
    saved = plain.params - nf4.params
    np.testing.assert_allclose(saved / projections, 4 - 4.13 / 8, rtol=0.01)  # float32 -> 4.13 bits
