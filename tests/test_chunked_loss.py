"""The chunked language-model loss (`lm_loss(..., chunk=N)`, `config.lm_loss_chunk`): the same loss, counts and
gradients as all logits at once; only [batch, chunk, vocab] logits alive, which the compiled memory shows."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sft_jax.data.lm import add_target_index
from sft_jax.losses import lm_loss
from sft_jax.models.decoder import DecoderConfig, DecoderLM
from sft_jax.state import ModelDef

VOCAB = 300


def _model(**extra):
    config = DecoderConfig.from_hf(dict(
        model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5,
        rope_theta=1e4, **extra))
    return ModelDef.split(DecoderLM(config, rngs=nnx.Rngs(0)))


def _batch(t=24, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (3, t)).astype(np.int32)
    segments = np.ones((3, t), np.int32)
    segments[2, t - 5:] = 0  # right padding
    loss_mask = (rng.random((3, t)) < 0.6).astype(np.float32) * segments
    return {"input_ids": ids, "segment_ids": segments, "positions": np.maximum(np.cumsum(segments, 1) - 1, 0),
            "targets": rng.integers(0, VOCAB, (3, t)).astype(np.int32), "loss_mask": loss_mask}


@pytest.mark.parametrize("chunk", [1, 5, 64])  # 5 leaves a padded last chunk; 64 is one chunk
@pytest.mark.parametrize("targets", ["all positions", "target_index"])
@pytest.mark.parametrize("tied", [True, False])
def test_chunked_equals_unchunked(chunk, targets, tied):
    model_def, params = _model(tie_word_embeddings=tied, final_logit_softcapping=None)
    batch = _batch()
    if targets == "target_index":
        batch = add_target_index(batch)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def run(chunk):
        def loss(params):
            return lm_loss(model_def.merge(params), batch, None, chunk=chunk)

        (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return value, aux, grads

    with jax.default_matmul_precision("highest"):
        want, got = run(0), run(chunk)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for key in ("loss_sum", "correct", "count"):
        np.testing.assert_allclose(got[1][key], want[1][key], rtol=1e-6, err_msg=key)
    for name in want[2]:
        np.testing.assert_allclose(got[2][name], want[2][name], atol=1e-6, rtol=1e-6, err_msg=name)
    head = "embed/embedding" if tied else "lm_head/kernel"
    assert float(jnp.abs(want[2][head]).max()) > 1e-4


def test_soft_capped_logits_chunked():
    """Gemma 2's final-logit soft-capping happens inside `model.logits`, so chunks get it too."""
    model_def, params = _model(final_logit_softcapping=2.0)
    batch = {k: jnp.asarray(v) for k, v in _batch(seed=1).items()}
    with jax.default_matmul_precision("highest"):
        want = lm_loss(model_def.merge(params), batch, None)[0]
        got = lm_loss(model_def.merge(params), batch, None, chunk=4)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def _temp_bytes(chunk, vocab=128256, hidden=64, tokens=2048):
    """Compiled temporary bytes of loss + gradient for the LM head alone: [1, tokens, hidden] hidden states
    into a `vocab`-word head (abstract: nothing runs)."""
    class Head:  # what lm_loss needs of a model, with the hidden states given
        def __init__(self, kernel, hidden_states):
            self.kernel, self.hidden_states = kernel, hidden_states

        def hidden(self, *args, **kwargs):
            return self.hidden_states, None

        def logits(self, h):
            return (h @ self.kernel).astype(jnp.float32)

        def __call__(self, *args, **kwargs):  # what the unchunked loss calls
            return self.logits(self.hidden_states)

    def loss(kernel, h, batch):
        return lm_loss(Head(kernel, h), batch, None, chunk=chunk)[0]

    spec = jax.ShapeDtypeStruct
    batch = {k: spec((1, tokens), jnp.int32) for k in ("input_ids", "segment_ids", "positions", "targets")}
    batch["loss_mask"] = spec((1, tokens), jnp.float32)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
        spec((hidden, vocab), jnp.float32), spec((1, tokens, hidden), jnp.float32), batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunks_bound_the_logits_memory():
    """128k vocabulary, 2048 targets: 1 GiB of float32 logits at once, and as much for their gradient; in
    chunks of 128 positions about 2.5 chunks' worth (the chunk's logits, their gradient, the head's gradient)."""
    whole, chunked = _temp_bytes(0), _temp_bytes(128)
    logits, chunk_logits = 2048 * 128256 * 4, 128 * 128256 * 4
    assert whole >= 1.9 * logits  # measured: 2004 MiB
    assert chunked <= 3 * chunk_logits  # measured: 157 MiB, 1/13 of the whole


def test_config_key_reaches_the_task(tiny_llama_dir, tmp_path):
    from conftest import lm_config

    from sft_jax.rundir import RunDir
    from sft_jax.tasks.language_model import LanguageModel

    c = lm_config(tiny_llama_dir, tmp_path, "full")
    c.lm_loss_chunk = 4
    task = LanguageModel(c, RunDir(str(tmp_path / "run")))
    assert isinstance(task.loss_fn, functools.partial) and task.loss_fn.keywords == {"chunk": 4}


def test_refused_for_tasks_without_a_language_model_loss(tiny_config):
    from sft_jax.config_defaults import validate

    tiny_config.lm_loss_chunk = 4
    with pytest.raises(ValueError, match="lm_loss_chunk"):
        validate(tiny_config)
