"""Our decoder LMs against transformers' PyTorch models on the same weights, and export round trips.

Tolerances (float32 throughout, XLA matmul precision "highest" so that no TF32/bf16 passes hide in XLA):
- tiny random models (2-3 layers, logits ~1): 1e-5 absolute; what is left is summation order.
- real models (SmolLM2: 30 layers, Gemma 3: 18 layers, logits up to ~30): 1e-3 absolute on the logits of
  real tokens. Rounding differences of ~1e-7 relative per op compound through the depth and the residual
  stream (norms up to ~1e3 in Gemma); measured: 1.5e-4 (SmolLM2) and 4e-5 (Gemma 3). A layout bug (q/k
  permutation, norm offset, RoPE base) moves logits by O(1), orders of magnitude above this bound.
  The greedy next token must agree at every position as well.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sft_jax.models.decoder import DecoderConfig  # noqa: E402
from sft_jax.models.loading.lm import export_hf, load_decoder, load_lm_tokenizer  # noqa: E402
from sft_jax.models.registry import resolve_checkpoint  # noqa: E402

TEXTS = ["The capital of France is", "Hello, my name is John and I like to eat pizza with my friends."]


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _reference_logits(ref, ids, mask):
    with torch.no_grad():
        return ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()


def _batch(tokenizer):
    enc = tokenizer(TEXTS, return_tensors="np", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def _assert_close(ours, ref, mask, atol):
    valid = mask.astype(bool)
    diff = np.abs(np.asarray(ours) - ref)[valid]
    assert diff.max() < atol, f"max abs logit difference {diff.max():.3g} >= {atol}"
    np.testing.assert_array_equal(np.asarray(ours).argmax(-1)[valid], ref.argmax(-1)[valid])


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_tiny_random_model_matches_transformers(family, tiny_llama_dir, tiny_gemma3_dir):
    model_dir = tiny_llama_dir if family == "llama" else tiny_gemma3_dir
    model, config = load_decoder(str(model_dir))
    assert config.family == family
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    # 12 tokens cross Gemma's sliding window of 4; left padding in row 0, right padding in row 1.
    ids = rng.integers(3, 5000, (2, 12))
    mask = np.ones((2, 12), np.int64)
    mask[0, :3] = 0
    mask[1, 9:] = 0
    _assert_close(model(jnp.asarray(ids), jnp.asarray(mask)), _reference_logits(ref, ids, mask), mask, 1e-5)


def test_sliding_window_is_used(tiny_gemma3_dir):
    """Widening the window on the tiny Gemma must change late logits (the mask is not a no-op)."""
    import dataclasses

    from sft_jax.models.decoder import DecoderLM
    from sft_jax.state import ModelDef

    model, config = load_decoder(str(tiny_gemma3_dir))
    wide = DecoderLM(dataclasses.replace(config, sliding_window=64), rngs=__import__("flax").nnx.Rngs(0))
    model_def, params = ModelDef.split(model)
    wide_def, _ = ModelDef.split(wide)
    ids = jnp.asarray(np.random.default_rng(1).integers(3, 5000, (1, 10)))
    narrow_logits = model_def.merge(params)(ids)
    wide_logits = wide_def.merge(params)(ids)
    np.testing.assert_allclose(narrow_logits[:, :4], wide_logits[:, :4], atol=1e-6)
    assert float(jnp.abs(narrow_logits[:, 4:] - wide_logits[:, 4:]).max()) > 1e-3


def test_packed_segments_do_not_attend_to_each_other(tiny_llama_dir):
    model, _ = load_decoder(str(tiny_llama_dir))
    rng = np.random.default_rng(2)
    a, b = rng.integers(3, 5000, 5), rng.integers(3, 5000, 7)
    packed = jnp.asarray(np.concatenate([a, b]))[None]
    segments = jnp.asarray([[1] * 5 + [2] * 7])
    positions = jnp.asarray([list(range(5)) + list(range(7))])
    out = model(packed, segment_ids=segments, positions=positions)
    np.testing.assert_allclose(out[0, :5], model(jnp.asarray(a)[None])[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 5:], model(jnp.asarray(b)[None])[0], atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_export_round_trip(family, tiny_llama_dir, tiny_gemma3_dir, tmp_path):
    model_dir = tiny_llama_dir if family == "llama" else tiny_gemma3_dir
    model, _ = load_decoder(str(model_dir))
    model.untie_head()  # what strategy=head does; the export must carry the separate head
    model.lm_head.kernel.value = model.lm_head.kernel.value * 1.5
    export_hf(model, tmp_path / "export", tokenizer=load_lm_tokenizer(str(model_dir)))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    assert not ref.config.tie_word_embeddings
    ids = np.random.default_rng(3).integers(3, 5000, (2, 9))
    mask = np.ones_like(ids)
    _assert_close(model(jnp.asarray(ids), jnp.asarray(mask)), _reference_logits(ref, ids, mask), mask, 1e-5)
    # And our loader reads the export back to the same model.
    again, _ = load_decoder(str(tmp_path / "export"))
    np.testing.assert_allclose(again(jnp.asarray(ids)), model(jnp.asarray(ids)), atol=1e-6)


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        DecoderConfig.from_hf({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope_type 'llama3'"):
        DecoderConfig.from_hf({"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "intermediate_size": 8,
                               "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})


def test_missing_weights_are_named(tiny_llama_dir, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama_dir, bad)
    weights = load_file(bad / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, bad / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_decoder(str(bad))


# --- real pre-trained weights, from the GGUF files the packages install ------------------------------------

def _real(name):
    try:
        checkpoint = resolve_checkpoint(name)
    except ValueError as e:
        pytest.skip(str(e))
    model, config = load_decoder(checkpoint)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(checkpoint.path.parent), gguf_file=checkpoint.path.name, dtype=torch.float32).eval()
    return model, config, load_lm_tokenizer(checkpoint), ref


@pytest.fixture(scope="module")
def smollm2():
    return _real("smollm2-135m-instruct")


def test_smollm2_gguf_matches_transformers(smollm2):
    model, config, tokenizer, ref = smollm2
    assert (config.family, config.num_layers, config.num_kv_heads, config.tie_embeddings) == ("llama", 30, 3, True)
    ids, mask = _batch(tokenizer)
    assert not mask.all()  # padding is exercised
    _assert_close(model(jnp.asarray(ids), jnp.asarray(mask)), _reference_logits(ref, ids, mask), mask, 1e-3)


def test_smollm2_export_reloads_in_transformers(smollm2, tmp_path):
    model, _, tokenizer, _ = smollm2
    export_hf(model, tmp_path, tokenizer=tokenizer)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids, mask = _batch(transformers.AutoTokenizer.from_pretrained(tmp_path))
    _assert_close(model(jnp.asarray(ids), jnp.asarray(mask)), _reference_logits(ref, ids, mask), mask, 1e-3)


def test_smollm2_chat_template(smollm2):
    tokenizer = smollm2[2]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_gemma3_gguf_matches_transformers():
    model, config, tokenizer, ref = _real("gemma3-270m")
    assert (config.family, config.num_layers, config.sliding_window) == ("gemma3", 18, 512)
    assert config.layer_types[5] == "full_attention" and config.layer_types[4] == "sliding_attention"
    ids, mask = _batch(tokenizer)
    first = ids[np.arange(len(ids)), mask.argmax(1)]  # the tokenizer pads on the left and adds BOS
    assert (first == config.bos_token_id).all()
    _assert_close(model(jnp.asarray(ids), jnp.asarray(mask)), _reference_logits(ref, ids, mask), mask, 1e-3)


def test_bfloat16_compute_keeps_float32_parameters(tiny_gemma3_dir):
    """dtype=bfloat16 casts matmul inputs only: parameters stay float32 and logits stay close to float32's."""
    from sft_jax.state import ModelDef

    model32, _ = load_decoder(str(tiny_gemma3_dir))
    model16, config16 = load_decoder(str(tiny_gemma3_dir), dtype=jnp.bfloat16)
    assert config16.dtype == jnp.bfloat16
    _, params16 = ModelDef.split(model16)
    assert all(v.dtype == jnp.float32 for v in params16.values())
    ids = jnp.asarray(np.random.default_rng(4).integers(3, 5000, (2, 10)))
    logits32, logits16 = model32(ids), model16(ids)
    assert logits16.dtype == jnp.float32
    # bf16 keeps 8 mantissa bits (relative error ~4e-3 per rounding); on these O(1) logits that is ~1e-2.
    assert float(jnp.abs(logits32 - logits16).max()) < 5e-2
    assert float(jnp.abs(logits32 - logits16).max()) > 0  # bf16 really ran


def test_cache_continues_positions_by_default(tiny_gemma3_dir):
    """Prefill then one token at a time through the cache, no explicit positions: same logits as one pass."""
    model, _ = load_decoder(str(tiny_gemma3_dir))
    ids = jnp.asarray(np.random.default_rng(5).integers(3, 5000, (2, 9)))
    full = model(ids)
    cache = model.init_cache(2, 16)
    h, cache = model.hidden(ids[:, :6], cache=cache)
    steps = [model.logits(h)]
    for t in range(6, 9):
        h, cache = model.hidden(ids[:, t:t + 1], cache=cache)
        steps.append(model.logits(h))
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5)
    assert int(cache["end"]) == 9
