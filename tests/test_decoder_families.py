"""Decoder families beyond LLaMA / Gemma 3 (Mistral, Qwen2/2.5, Qwen3) and RoPE scaling, against transformers.

Every model is a tiny RANDOM transformers model saved to a temporary directory (nothing is downloaded); token
ids are fed directly. Logits are compared in float32 under matmul precision "highest" within 1e-4 on the
real (non-padding) tokens. transformers gets the same position ids as ours (the count of earlier real
tokens), which matters for the RoPE types that depend on the sequence length (dynamic, longrope).
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sft_jax.models.decoder import SLIDING, DecoderConfig, DecoderLM  # noqa: E402
from sft_jax.models.loading.lm import export_hf, load_decoder  # noqa: E402
from sft_jax.models.lora import apply_lora, merge_lora  # noqa: E402
from sft_jax.state import ModelDef  # noqa: E402

VOCAB = 256
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = {
    # name: (config class, model class, extra config); each one's distinguishing features switched on
    "llama-biases": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=4, head_dim=8)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen2-sliding": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=4,
                                                              max_window_layers=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),  # head_dim != hidden / heads = 8
    # fused qkv_proj / gate_up_proj; Phi-3-mini's config sets a sliding window on every layer
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=4, rope_parameters={"rope_type": "default",
                                                                                       "rope_theta": 1e4})),
    # soft-capped attention and output logits (caps small enough to bite), pre/post norms, local/global layers
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        sliding_window=4, head_dim=8, query_pre_attn_scalar=12, attn_logit_softcapping=0.5,
        final_logit_softcapping=0.3, num_hidden_layers=3, hidden_activation="gelu_pytorch_tanh")),
}
ATOL = 1e-4


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _save(path, config_cls: str, model_cls: str, **extra):
    """A random tiny transformers model saved at `path`; norms and biases randomised so that they matter."""
    config = dict(BASE, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.2)
            elif "proj" in name:  # sharper attention, larger updates: logits depend on the context
                p.normal_(0.0, 0.15)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_dir(request, tmp_path_factory):
    config_cls, model_cls, extra = FAMILIES[request.param]
    return request.param, _save(tmp_path_factory.mktemp(request.param), config_cls, model_cls, **extra)


def _positions(mask):
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def _reference(model_dir, ids, mask):
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   position_ids=torch.tensor(_positions(mask))).logits.float().numpy()


def _padded_batch(length=12, seed=0):
    """Left padding in row 0, right padding in row 1."""
    ids = np.random.default_rng(seed).integers(3, VOCAB, (2, length))
    mask = np.ones((2, length), np.int64)
    mask[0, :3] = 0
    mask[1, length - 3:] = 0
    return ids, mask


def _max_diff(ours, ref, mask):
    return float(np.abs(np.asarray(ours) - ref)[mask.astype(bool)].max())


def _assert_matches(model, model_dir, ids, mask, atol=ATOL):
    ours = model(jnp.asarray(ids), jnp.asarray(mask))
    diff = _max_diff(ours, _reference(model_dir, ids, mask), mask)
    assert diff < atol, f"max abs logit difference {diff:.3g} >= {atol}"
    return ours


def test_family_matches_transformers(family_dir):
    name, model_dir = family_dir
    model, config = load_decoder(str(model_dir))
    assert config.family == name.split("-")[0]
    ids, mask = _padded_batch()  # 12 tokens: past the sliding window of 4
    _assert_matches(model, model_dir, ids, mask)
    expected = {"llama-biases": (True, True, True, False), "mistral": (False, False, False, False),
                "qwen2": (True, False, False, False), "qwen2-sliding": (True, False, False, False),
                "qwen3": (False, False, False, True), "phi3": (False, False, False, False),
                "gemma2": (False, False, False, False)}[name]
    assert (config.qkv_bias, config.o_bias, config.mlp_bias, config.qk_norm) == expected
    if name in ("mistral", "phi3"):
        assert config.layer_types == (SLIDING, SLIDING) and config.sliding_window == 4
    if name == "qwen2-sliding":  # transformers: layers from max_window_layers on slide
        assert config.layer_types == ("full_attention", SLIDING)
    if name == "gemma2":
        assert config.layer_types == (SLIDING, "full_attention", SLIDING)
        assert (config.attn_logit_softcapping, config.final_logit_softcapping) == (0.5, 0.3)


def test_family_export_round_trip(family_dir, tmp_path):
    """export_hf writes the family's own config; transformers and our loader reload it with equal logits."""
    name, model_dir = family_dir
    model, config = load_decoder(str(model_dir))
    # Move every parameter (as fine-tuning would), so that nothing is reloaded from the source by accident.
    _, params = ModelDef.split(model)
    params = {k: v * 1.1 for k, v in params.items()}
    model = ModelDef.split(model)[0].merge(params)
    out = export_hf(model, tmp_path / "export")
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == config.family
    ids, mask = _padded_batch(seed=1)
    ours = _assert_matches(model, out, ids, mask)
    again, again_config = load_decoder(str(out))
    assert dataclasses.replace(again_config, dtype=config.dtype) == config
    np.testing.assert_allclose(again(jnp.asarray(ids), jnp.asarray(mask)), ours, atol=1e-6)


def test_sliding_window_matters(tmp_path):
    """Mistral's window changes the logits of tokens further than the window from the start."""
    model_dir = _save(tmp_path, "MistralConfig", "MistralForCausalLM", sliding_window=4)
    model, config = load_decoder(str(model_dir))
    full = DecoderLM(dataclasses.replace(config, sliding_window=None, layer_types=()), rngs=nnx.Rngs(0))
    model_def, params = ModelDef.split(model)
    ids = jnp.asarray(np.random.default_rng(2).integers(3, VOCAB, (1, 10)))
    windowed, unwindowed = model(ids), ModelDef.split(full)[0].merge(params)(ids)
    np.testing.assert_allclose(windowed[:, :4], unwindowed[:, :4], atol=1e-6)
    assert float(jnp.abs(windowed[:, 4:] - unwindowed[:, 4:]).max()) > 1e-2
    # sliding_window: null is full attention, as in transformers.
    cfg = json.loads((model_dir / "config.json").read_text())
    assert DecoderConfig.from_hf(dict(cfg, sliding_window=None)).layer_types == ()


# --- RoPE scaling -------------------------------------------------------------------------------------------

# head_dim 16, theta 1e4: wavelengths 6.3, 20, 63, ... so that llama3's high / medium / low bands are all used.
ROPE_BASE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=32)
ROPE_VARIANTS = {
    "linear": dict(rope_type="linear", factor=2.0),
    "dynamic": dict(rope_type="dynamic", factor=2.0),
    "llama3": dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32),
    "longrope": dict(rope_type="longrope", short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 3.5],
                     long_factor=[1.0, 1.5, 2.5, 4.0, 6.0, 8.0, 10.0, 12.0], original_max_position_embeddings=16),
}


@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
def test_rope_scaling_matches_transformers(variant, tmp_path):
    """Positions up to 47, beyond the original 32 (16 for longrope): scaled frequencies differ from plain RoPE."""
    rope = dict(ROPE_VARIANTS[variant], rope_theta=10000.0)
    extra = dict(ROPE_BASE, rope_parameters=rope)
    if variant == "longrope":
        extra["max_position_embeddings"] = 64  # factor 64 / 16 = 4: attention factor sqrt(1 + ln 4 / ln 16)
    model_dir = _save(tmp_path / "m", "LlamaConfig", "LlamaForCausalLM", **extra)
    model, config = load_decoder(str(model_dir))
    assert config.rope_type == variant
    ids, mask = _padded_batch(length=48, seed=3)
    ours = _assert_matches(model, model_dir, ids, mask)
    plain = ModelDef.split(DecoderLM(dataclasses.replace(config, rope_type="default", rope_scaling=()),
                                     rngs=nnx.Rngs(0)))[0].merge(ModelDef.split(model)[1])
    assert _max_diff(ours, np.asarray(plain(jnp.asarray(ids), jnp.asarray(mask))), mask) > 1e-3
    if variant in ("dynamic", "longrope"):  # length-dependent: a short sequence uses the original frequencies
        short_ids, short_mask = _padded_batch(length=10, seed=4)
        _assert_matches(model, model_dir, short_ids, short_mask)


def test_phi_longrope_partial_rotary(tmp_path):
    """Phi-4-mini's RoPE: longrope (top-level original_max_position_embeddings) on 3/4 of each head."""
    rope = dict(ROPE_VARIANTS["longrope"], rope_theta=10000.0, partial_rotary_factor=0.75)
    rope["short_factor"], rope["long_factor"] = rope["short_factor"][:6], rope["long_factor"][:6]
    del rope["original_max_position_embeddings"]
    model_dir = _save(tmp_path / "m", "Phi3Config", "Phi3ForCausalLM", **dict(
        ROPE_BASE, rope_parameters=rope, original_max_position_embeddings=16,
        max_position_embeddings=64))
    model, config = load_decoder(str(model_dir))
    assert (config.rope_type, config.rotary_dim, dict(config.rope_scaling)["original_max_position_embeddings"]) == (
        "longrope", 12, 16)
    for length, seed in ((40, 9), (12, 10)):  # long factors past 16 positions, short ones within
        ids, mask = _padded_batch(length=length, seed=seed)
        _assert_matches(model, model_dir, ids, mask)
    out = export_hf(model, tmp_path / "export")
    _assert_matches(model, out, *_padded_batch(length=40, seed=11))
    assert load_decoder(str(out))[1] == config


def test_gemma3_linear_rope_on_global_layers(tmp_path):
    """Gemma 3 (4B and up) scales RoPE linearly on its global layers only; sliding layers keep their own base."""
    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    model_dir = _save(tmp_path / "m", "Gemma3TextConfig", "Gemma3ForCausalLM", **dict(
        head_dim=8, query_pre_attn_scalar=8, sliding_window=4, num_hidden_layers=3, rope_parameters=rope,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"]))
    model, config = load_decoder(str(model_dir))
    assert (config.rope_type, config.rope_scaling, config.rope_local_theta) == ("linear", (("factor", 8.0),), 1e4)
    ids, mask = _padded_batch(length=24, seed=14)
    _assert_matches(model, model_dir, ids, mask)
    out = export_hf(model, tmp_path / "export")
    _assert_matches(model, out, ids, mask)
    bad = dict(json.loads((model_dir / "config.json").read_text()))
    bad["rope_parameters"] = dict(rope, sliding_attention={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="rope_parameters.sliding_attention"):
        DecoderConfig.from_hf(bad)


def test_old_rope_scaling_type_key_is_honoured(tmp_path):
    """`rope_scaling: {"type": "linear", "factor": 2.0}` (configs written before transformers 5) scales."""
    model_dir = _save(tmp_path / "m", "LlamaConfig", "LlamaForCausalLM", **ROPE_BASE)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 2.0})
    (model_dir / "config.json").write_text(json.dumps(cfg))
    model, config = load_decoder(str(model_dir))
    assert (config.rope_type, config.rope_scaling) == ("linear", (("factor", 2.0),))
    ids, mask = _padded_batch(length=20, seed=5)
    ours = _assert_matches(model, model_dir, ids, mask)
    plain, _ = load_decoder(str(_plain(model_dir, tmp_path)))
    assert _max_diff(ours, np.asarray(plain(jnp.asarray(ids), jnp.asarray(mask))), mask) > 1e-3


def _plain(model_dir, tmp_path):
    out = tmp_path / "plain"
    shutil.copytree(model_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("rope_scaling")
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_rope_scaling_export_round_trip(tmp_path):
    model_dir = _save(tmp_path / "m", "Qwen2Config", "Qwen2ForCausalLM",
                      **dict(ROPE_BASE, rope_parameters=dict(ROPE_VARIANTS["llama3"], rope_theta=10000.0)))
    model, config = load_decoder(str(model_dir))
    out = export_hf(model, tmp_path / "export")
    ids, mask = _padded_batch(length=40, seed=6)
    _assert_matches(model, out, ids, mask)
    assert load_decoder(str(out))[1] == config


# --- refusals: one line naming the key -----------------------------------------------------------------------

def _hf(**extra):
    return dict(BASE, model_type="llama", **extra)


@pytest.mark.parametrize("hf,key", [
    (_hf(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_type 'yarn'"),
    (_hf(rope_parameters={"rope_type": "su", "rope_theta": 1e4}), "rope_parameters: rope_type 'su'"),
    (_hf(rope_scaling={"type": "linear"}), "needs 'factor'"),
    (_hf(rope_scaling={"type": "linear", "factor": 2.0, "beta_fast": 32}), "beta_fast"),
    (_hf(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor"),
    (_hf(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "needs 'low_freq_factor'"),
    (dict(_hf(), model_type="qwen3", mlp_bias=True), "mlp_bias"),
    (dict(_hf(), model_type="phi"), "model_type 'phi'"),
])
def test_unsupported_options_are_refused(hf, key):
    with pytest.raises(ValueError, match=key) as error:
        DecoderConfig.from_hf(hf)
    assert "\n" not in str(error.value)


# --- LoRA on biased projections, cached generation -------------------------------------------------------------

def test_lora_on_biased_projections(tmp_path):
    """apply_lora keeps the base bias (a fresh adapter changes nothing); the merged export reloads equal."""
    model_dir = _save(tmp_path / "m", "Qwen2Config", "Qwen2ForCausalLM")
    model, _ = load_decoder(str(model_dir))
    q = model.layers[0].attn.q
    assert q.bias.get_metadata().get("out_sharding") == ("heads",)
    assert model.layers[0].attn.k.bias.get_metadata().get("out_sharding") == ("kv_heads",)
    ids, mask = _padded_batch(seed=7)
    before = model(jnp.asarray(ids), jnp.asarray(mask))
    names = apply_lora(model, r"attn/(q|k|v|o)$", rank=2, alpha=4.0, rngs=nnx.Rngs(0))
    assert "layers/0/attn/q" in names
    _, params = ModelDef.split(model)
    assert "layers/0/attn/q/bias" in params and "layers/0/attn/q/lora_a" in params
    np.testing.assert_array_equal(model(jnp.asarray(ids), jnp.asarray(mask)), before)
    for layer in model.layers:
        layer.attn.q.lora_b.value = jnp.full_like(layer.attn.q.lora_b.value, 0.3)
    tuned = model(jnp.asarray(ids), jnp.asarray(mask))
    assert _max_diff(tuned, np.asarray(before), mask) > 1e-3
    np.testing.assert_allclose(merge_lora(model)(jnp.asarray(ids), jnp.asarray(mask)), tuned, atol=1e-5)
    out = export_hf(model, tmp_path / "export")
    _assert_matches(model, out, ids, mask)


@pytest.mark.parametrize("name", ["mistral", "qwen3", "gemma2"])
def test_cached_decoding_equals_uncached(name, tmp_path):
    """Prefill then one token at a time through the KV cache, past the sliding window: equal to one full pass."""
    config_cls, model_cls, extra = FAMILIES[name]
    model, _ = load_decoder(str(_save(tmp_path / name, config_cls, model_cls, **extra)))
    ids, mask = _padded_batch(length=11, seed=8)
    mask[1] = 1  # row 0 left-padded, as generation pads prompts
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    full = model(ids, mask)
    cache = model.init_cache(2, 16)

    @nnx.jit  # compiled once per input length (prefill, then one token), not run op by op
    def step(model, ids, mask, cache):
        h, cache = model.hidden(ids, attention_mask=mask, cache=cache)
        return model.logits(h), cache

    logits, cache = step(model, ids[:, :5], mask[:, :5], cache)
    steps = [logits]
    for t in range(5, 11):
        logits, cache = step(model, ids[:, t:t + 1], mask[:, t:t + 1], cache)
        steps.append(logits)
    valid = np.asarray(mask).astype(bool)
    diff = np.abs(np.asarray(jnp.concatenate(steps, axis=1)) - np.asarray(full))[valid]
    assert diff.max() < 2e-5


def test_gemma2_softcap_gradients_match_torch(tmp_path):
    """Soft-capped attention is differentiated by autodiff: gradients equal torch's."""
    config_cls, model_cls, extra = FAMILIES["gemma2"]
    model_dir = _save(tmp_path / "g", config_cls, model_cls, **extra)
    model, _ = load_decoder(str(model_dir))
    ids, mask = _padded_batch(seed=12)
    targets = np.random.default_rng(13).integers(0, VOCAB, ids.shape)
    model_def, params = ModelDef.split(model)

    def loss(params):
        logits = model_def.merge(params)(jnp.asarray(ids), jnp.asarray(mask))
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(targets)[..., None], -1)[..., 0]
        return jnp.sum(nll * mask) / mask.sum()

    grads = jax.jit(jax.grad(loss))(params)  # one compilation, not an op-by-op backward pass
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    logits = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(_positions(mask))).logits
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), torch.tensor(targets).reshape(-1),
                                            reduction="none")
    (torch.sum(nll * torch.tensor(mask).reshape(-1)) / mask.sum()).backward()
    for ours, theirs in (("layers/0/attn/q/kernel", "model.layers.0.self_attn.q_proj.weight"),
                         ("layers/1/attn/k/kernel", "model.layers.1.self_attn.k_proj.weight")):
        expected = dict(ref.named_parameters())[theirs].grad.numpy().T
        np.testing.assert_allclose(grads[ours], expected, atol=1e-5, rtol=1e-3)
        assert np.abs(expected).max() > 1e-4


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
def test_generate_ids_equals_uncached_greedy(name, tmp_path):
    """The jitted KV-cached generation loop (left-padded prompts) against re-running the full forward."""
    from sft_jax import generate as gen

    config_cls, model_cls, extra = FAMILIES[name]
    model, _ = load_decoder(str(_save(tmp_path / name, config_cls, model_cls, **extra)))
    model_def, params = ModelDef.split(model)
    prompts, n = [[5, 17, 99], [3, 40, 41, 42, 43, 44, 45], [200, 7, 8, 9, 10]], 8
    tokens, lengths = gen.generate_ids(model_def, params, prompts, max_new_tokens=n, bucket=8)
    assert list(lengths) == [n] * len(prompts)
    forward = jax.jit(lambda ids, mask: model(ids, mask))
    seqs, length = [list(p) for p in prompts], max(map(len, prompts)) + n
    for _ in range(n):  # right-padded to one length: compiles once
        ids, mask = np.zeros((len(seqs), length), np.int32), np.zeros((len(seqs), length), np.int32)
        for i, s in enumerate(seqs):
            ids[i, :len(s)], mask[i, :len(s)] = s, 1
        logits = np.asarray(forward(ids, mask))
        for i, s in enumerate(seqs):
            s.append(int(logits[i, len(s) - 1].argmax()))
    expected = np.array([s[len(p):] for s, p in zip(seqs, prompts, strict=True)])
    assert len({tuple(row) for row in expected}) > 1 and len(set(expected[1])) > 1  # not one repeated token
    np.testing.assert_array_equal(tokens, expected)
