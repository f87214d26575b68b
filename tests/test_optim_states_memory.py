"""8-bit Adam moments (`sft_jax.optim_states`) updated a chunk at a time: the planned step's temporaries stay
near the gradient's bytes instead of holding float32 moments of the whole model, on one device and over FSDP;
the chunked update gives the same moments as one piece, in the stored layout checkpoints already hold."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax import optim_states
from sft_jax.config_defaults import defaults
from sft_jax.plan import plan

# A LLaMA shape whose trained bytes are mostly scanned layer stacks and a (small) vocabulary: 9.5M parameters.
SHAPE = {"model_type": "llama", "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 1024,
         "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
         "rms_norm_eps": 1e-5, "rope_theta": 10000, "tie_word_embeddings": False}


def _config(model_file, devices):
    c = defaults()
    c.task, c.model, c.strategy = "language_modeling", str(model_file), "full"
    c.data.train = c.data.eval = "never-read.txt"
    c.param_dtype, c.optimizer_state_dtype, c.dtype = "bfloat16", "int8", "bfloat16"
    c.remat, c.scan_layers, c.lm_loss_chunk = "full", True, 64
    c.batch_size, c.max_length, c.buckets = devices, 64, (64,)
    c.mesh = {"data": 1, "fsdp": devices, "tensor": 1}
    return c


@pytest.mark.parametrize("devices", [1, 8])
def test_int8_update_temporaries_are_a_chunk(tmp_path, monkeypatch, devices):
    """Chunks of 2^18 values (a layer of the MLP stack). One device: the step's temporaries under 3x the
    parameters' bytes (the bfloat16 gradient is 1x; float32 moments of every tensor alive at once made 4.4x).
    fsdp=8: under 1.5x the whole model's parameter bytes per device (gathering the codes to cut the flattened
    tensors into blocks made 5.8x)."""
    if jax.device_count() < devices:
        pytest.skip(f"needs {devices} (simulated) devices; see conftest.py")
    monkeypatch.setattr(optim_states, "CHUNK_VALUES", 1 << 18)
    model = tmp_path / "config.json"
    model.write_text(json.dumps(SHAPE))
    p = plan(_config(model, devices), devices=jax.devices()[:devices])
    bound = 3.0 * p.params if devices == 1 else 1.5 * devices * p.params
    assert p.temporaries < bound, (p.temporaries, p.params)


@pytest.mark.parametrize("shape", [(6, 4, 512), (3, 2, 256, 256), (40, 768), (256, 1024), (5, 300)])
def test_chunked_moments_equal_one_piece(monkeypatch, shape):
    """Stacks cut by layers, matrices by rows or by block columns, and a tensor that is not cut: the moments
    are bit-identical to one update of the whole tensor, and the update within float32 rounding."""
    rng = np.random.default_rng(0)
    tx = optim_states.scale_by_adam("int8")
    grads = [jnp.asarray(rng.normal(size=shape) * 10.0 ** rng.integers(-6, 2), jnp.float32) for _ in range(3)]

    def run(chunk):
        monkeypatch.setattr(optim_states, "CHUNK_VALUES", chunk)
        state, outs = tx.init({"w": grads[0]}), []
        update = jax.jit(tx.update)
        for g in grads:
            out, state = update({"w": g}, state)
            outs.append(out["w"])
        return outs, state

    want_out, want = run(1 << 30)
    got_out, got = run(1024)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(want_out, got_out):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6)


def test_stored_layout_is_blocks_of_the_flattened_tensor():
    """Codes keep the parameter's shape and absmaxes are one per BLOCK consecutive values of the flattened
    tensor (the layout of saved checkpoints), whichever way the blocks are computed."""
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4, 512)), jnp.float32)
    q = optim_states.encode(x, signed=True)
    flat = np.asarray(x).reshape(-1, optim_states.BLOCK)
    absmax = np.abs(flat).max(axis=1)
    np.testing.assert_array_equal(np.asarray(q.absmax), absmax)
    np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1, optim_states.BLOCK),
                                  np.round(flat / absmax[:, None] * 127).astype(np.int8))
