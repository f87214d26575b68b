"""LoRA: adapters start as a no-op, only they train, they merge, export to transformers, and round-trip in
PEFT's format (checked against the PEFT formula W + alpha / r * B @ A applied to the transformers model).

Tolerances: float32 with XLA matmul precision "highest"; merged vs unmerged (and ours vs transformers)
differ by summation order only, well below 1e-5 on logits ~1 of the tiny random models.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import lm_config
from flax import nnx

from sft_jax.models.loading.lm import export_hf, load_decoder
from sft_jax.models.loading.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapters, save_adapters
from sft_jax.models.lora import DEFAULT_TARGETS, LoraConfig, LoRALinear, apply_lora, has_lora, merge_lora
from sft_jax.state import ModelDef

PROJECTIONS = ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down")


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture
def model_dir(request, tiny_llama_dir, tiny_gemma3_dir):
    return tiny_llama_dir if request.param == "llama" else tiny_gemma3_dir


def _inputs():
    """12 tokens (past Gemma's sliding window of 4); row 0 left-padded."""
    ids = np.random.default_rng(0).integers(3, 5000, (2, 12))
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


def _logits(model, **kwargs):
    ids, mask = _inputs()
    return np.asarray(model(ids, mask, **kwargs))


def _lora_model(model_dir, targets=DEFAULT_TARGETS, rank=4, alpha=8.0, dropout=0.0, seed=1):
    """The pre-trained model with adapters whose B is random (as after training), so they matter."""
    model, _ = load_decoder(str(model_dir))
    apply_lora(model, targets, rank, alpha, dropout, rngs=nnx.Rngs(0))
    key = jax.random.key(seed)
    for i, (_, layer) in enumerate(nnx.iter_modules(model)):
        if isinstance(layer, LoRALinear):
            layer.lora_b.value = 0.2 * jax.random.normal(jax.random.fold_in(key, i), layer.lora_b.value.shape)
    return model


@pytest.mark.parametrize("model_dir", ["llama", "gemma3"], indirect=True)
def test_fresh_adapters_change_nothing(model_dir):
    model, config = load_decoder(str(model_dir))
    _, base_params = ModelDef.split(model)
    base = _logits(model)
    # Without adapters a dropout key changes nothing either: the pre-trained layers use no dropout.
    np.testing.assert_array_equal(_logits(model, dropout_rng=jax.random.key(3)), base)

    adapted = apply_lora(model, DEFAULT_TARGETS, rank=4, alpha=8.0, dropout=0.5, rngs=nnx.Rngs(0))
    assert sorted(adapted) == sorted(f"layers/{i}/{p}" for i in range(config.num_layers) for p in PROJECTIONS)
    _, params = ModelDef.split(model)
    # Base paths and values are unchanged; each adapted projection gains lora_a [in, r] and lora_b [r, out].
    assert set(params) == set(base_params) | {f"{m}/lora_{x}" for m in adapted for x in "ab"}
    for name, value in base_params.items():
        assert params[name] is value
    for m in adapted:
        n_in, n_out = params[f"{m}/kernel"].shape
        assert params[f"{m}/lora_a"].shape == (n_in, 4) and params[f"{m}/lora_b"].shape == (4, n_out)
        assert not np.any(params[f"{m}/lora_b"])
        a = np.asarray(params[f"{m}/lora_a"])
        assert 0 < np.abs(a).max() <= n_in**-0.5  # PEFT's kaiming-uniform bound
    # B = 0: outputs are bit-identical to the base model's, with or without adapter dropout.
    np.testing.assert_array_equal(_logits(model), base)
    np.testing.assert_array_equal(_logits(model, dropout_rng=jax.random.key(3)), base)


def test_targets_select_projections(tiny_llama_dir):
    model, config = load_decoder(str(tiny_llama_dir))
    adapted = apply_lora(model, r"attn/(q|v)$", rank=2, alpha=4.0, rngs=nnx.Rngs(0))
    assert sorted(adapted) == sorted(f"layers/{i}/attn/{p}" for i in range(config.num_layers) for p in "qv")
    _, params = ModelDef.split(model)
    assert sorted(n for n in params if "lora" in n) == sorted(f"{m}/lora_{x}" for m in adapted for x in "ab")
    assert isinstance(model.layers[0].attn.k, nnx.Linear) and isinstance(model.layers[1].mlp.up, nnx.Linear)

    with pytest.raises(ValueError, match="matches no linear layer"):
        apply_lora(load_decoder(str(tiny_llama_dir))[0], r"attn/qq$", 2, 4.0, rngs=nnx.Rngs(0))
    untied, _ = load_decoder(str(tiny_llama_dir))
    untied.untie_head()
    with pytest.raises(ValueError, match="lm_head"):
        apply_lora(untied, r"lm_head|attn/q$", 2, 4.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="lora.rank"):
        LoraConfig(rank=0)


def test_dropout_only_with_a_key(tiny_llama_dir):
    model = _lora_model(tiny_llama_dir, dropout=0.5)
    plain = _logits(model)
    np.testing.assert_array_equal(_logits(model), plain)  # no key: deterministic, no dropout
    k1, k2 = jax.random.key(1), jax.random.key(2)
    with_k1 = _logits(model, dropout_rng=k1)
    assert np.abs(with_k1 - plain).max() > 1e-3
    np.testing.assert_array_equal(_logits(model, dropout_rng=k1), with_k1)  # reproducible per key
    assert np.abs(_logits(model, dropout_rng=k2) - with_k1).max() > 1e-3
    # dropout=0: a key changes nothing.
    no_dropout = _lora_model(tiny_llama_dir, dropout=0.0)
    np.testing.assert_array_equal(_logits(no_dropout, dropout_rng=k1), _logits(no_dropout))


@pytest.mark.parametrize("model_dir", ["llama", "gemma3"], indirect=True)
def test_merge_matches_unmerged_and_exports_to_transformers(model_dir, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    model = _lora_model(model_dir)
    base_names = ModelDef.split(load_decoder(str(model_dir))[0])[0].names
    ours = _logits(model)
    assert np.abs(ours - _logits(load_decoder(str(model_dir))[0])).max() > 1e-3  # the adapters matter

    merged = merge_lora(model)
    assert not has_lora(merged) and has_lora(model)  # merging copies; the LoRA model is left as it was
    merged_def, merged_params = ModelDef.split(merged)
    assert merged_def.names == base_names
    np.testing.assert_allclose(_logits(merged), ours, atol=1e-5, rtol=0)
    # The same fold on a flat parameter dict (alpha given, as the scale is not a parameter).
    dict_merged = merge_lora(ModelDef.split(model)[1], alpha=8.0)
    assert set(dict_merged) == set(merged_params)
    for name, value in merged_params.items():
        np.testing.assert_allclose(dict_merged[name], value, atol=1e-7, rtol=0)

    export_hf(model, tmp_path / "hf")  # merges on the way out
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids, mask = _inputs()
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(np.asarray(ids)), attention_mask=torch.tensor(np.asarray(mask))).logits
    valid = np.asarray(mask).astype(bool)
    assert np.abs(theirs.numpy() - ours)[valid].max() < 1e-5


def _peft_reference_logits(model_dir, adapter_dir):
    """transformers' model with PEFT's LoRA formula applied by hand: W[out, in] += lora_alpha / r * B @ A."""
    import torch
    import transformers
    from safetensors.numpy import load_file

    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    modules = dict(ref.named_modules())
    scale = config["lora_alpha"] / config["r"]
    with torch.no_grad():
        for name, a in tensors.items():
            if name.endswith(".lora_A.weight"):
                module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                b = tensors[name.replace("lora_A", "lora_B")]
                modules[module].weight += scale * torch.tensor(b.astype(np.float64) @ a.astype(np.float64)).float()
        ids, mask = _inputs()
        out = ref(input_ids=torch.tensor(np.asarray(ids)), attention_mask=torch.tensor(np.asarray(mask))).logits
    return out.numpy(), np.asarray(mask).astype(bool)


def test_adapters_round_trip_in_peft_format(tiny_llama_dir, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from safetensors.numpy import load_file

    model = _lora_model(tiny_llama_dir)
    params = ModelDef.split(model)[1]
    cfg = LoraConfig(rank=4, alpha=8.0, dropout=0.05)
    out = save_adapters(params, cfg, tmp_path / "adapter", base_model=str(tiny_llama_dir))
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["lora_dropout"] == 0.05 and config["base_model_name_or_path"] == str(tiny_llama_dir)
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"])
    tensors = load_file(str(out / ADAPTER_WEIGHTS))
    assert len(tensors) == 2 * 7 * 2  # only adapters: A and B of 7 projections in 2 layers
    q_a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    k_b = tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"]
    np.testing.assert_array_equal(q_a, np.asarray(params["layers/0/attn/q/lora_a"]).T)  # [r, in]
    assert k_b.shape == (params["layers/1/attn/k/kernel"].shape[1], 4)  # [out, r]

    # PEFT's formula on transformers' model gives our logits.
    theirs, valid = _peft_reference_logits(tiny_llama_dir, out)
    ours = _logits(model)
    assert np.abs(theirs - ours)[valid].max() < 1e-5

    # Back into a fresh base model: the same adapters, bit for bit.
    fresh, _ = load_decoder(str(tiny_llama_dir))
    loaded_cfg = load_adapters(fresh, out)
    assert (loaded_cfg.rank, loaded_cfg.alpha, loaded_cfg.dropout) == (4, 8.0, 0.05)
    loaded = ModelDef.split(fresh)[1]
    assert set(loaded) == set(params)
    for name in params:
        np.testing.assert_array_equal(np.asarray(loaded[name]), np.asarray(params[name]))
    np.testing.assert_array_equal(_logits(fresh), ours)

    # Adapters on some layers only: target_modules becomes a regex that PEFT full-matches on exactly those.
    partial = _lora_model(tiny_llama_dir, targets=r"layers/0/attn/(q|v)$")
    out = save_adapters(ModelDef.split(partial)[1], cfg, tmp_path / "partial")
    pattern = json.loads((out / ADAPTER_CONFIG).read_text())["target_modules"]
    names = [f"model.layers.{i}.{kind}.{p}_proj" for i in range(2) for kind, ps in
             (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down"))) for p in ps]
    assert [n for n in names if re.fullmatch(pattern, n)] == ["model.layers.0.self_attn.q_proj",
                                                               "model.layers.0.self_attn.v_proj"]
    fresh, _ = load_decoder(str(tiny_llama_dir))
    load_adapters(fresh, out)
    np.testing.assert_array_equal(_logits(fresh), _logits(partial))


def _lm_config(model_dir, tmp_path):
    """A 2-step language-modelling run (conftest.lm_config) with strategy=lora."""
    c = lm_config(model_dir, tmp_path, "lora")
    c.lora.rank, c.lora.alpha = 4, 8.0
    c.lora.dropout = 0.1
    return c


def test_lora_run_trains_only_adapters(tiny_llama_dir, tmp_path):
    from sft_jax import optim, strategies
    from sft_jax.checkpoint import Checkpoints
    from sft_jax.models.finetuned import decoder_layout
    from sft_jax.state import TrainState, count_params
    from sft_jax.tasks.language_model import load_finetuned_lm
    from sft_jax.train import train_and_evaluate

    config = _lm_config(tiny_llama_dir, tmp_path)
    workdir = tmp_path / "run"
    results = train_and_evaluate(config, str(workdir))
    assert np.isfinite(results["eval/loss"])

    _, before = ModelDef.split(load_decoder(str(tiny_llama_dir))[0])
    lm, _, _ = load_finetuned_lm(str(workdir), "latest")  # rebuilt with adapters from config.json's "lora"
    model_def, after = ModelDef.split(lm)
    adapters = [n for n in after if n.endswith(("/lora_a", "/lora_b"))]
    assert len(adapters) == 2 * 7 * 2
    assert set(after) == set(before) | set(adapters)
    for name in before:  # every pre-trained weight bit-identical
        assert np.asarray(after[name]).tobytes() == np.asarray(before[name]).tobytes(), name
    initial = ModelDef.split(_fresh(config))[1]
    for name in adapters:  # every adapter moved (A by its update once B is non-zero, and by weight decay)
        assert not np.array_equal(np.asarray(after[name]), np.asarray(initial[name])), name
    assert all(np.any(np.asarray(after[n])) for n in adapters if n.endswith("lora_b"))
    assert results["trainable_params"] == count_params(after, adapters)
    assert results["total_params"] == count_params(after)

    # The strategy: adapters trainable, everything else frozen, with no optimizer moments.
    labels = strategies.label_params(model_def.names, strategies.strategy_rules("lora", decoder_layout(2)))
    assert sorted(strategies.trainable_names(labels)) == sorted(adapters)
    tx = strategies.partition(labels, optim.adamw(optax.constant_schedule(1e-2), weight_decay=config.weight_decay,
                                                  clip_norm=config.clip_norm))
    target = TrainState(step=jnp.zeros((), jnp.int32), params=after, opt_state=tx.init(after),
                        rng=jax.random.key_data(jax.random.key(0)))
    ckpt = Checkpoints(str(workdir))
    try:
        state, _ = ckpt.restore_latest(target)
    finally:
        ckpt.close()
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    (adam,) = [x for x in jax.tree.leaves(state.opt_state, is_leaf=is_adam) if is_adam(x)]
    for moments in (adam.mu, adam.nu):
        for name, label in labels.items():
            if label == strategies.FROZEN:
                assert isinstance(moments[name], optax.MaskedNode), name
            else:
                assert moments[name].shape == after[name].shape and np.any(np.asarray(moments[name]))
    moment_size = sum(x.size for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0)
    assert moment_size == 2 * results["trainable_params"]

    # Generation-ready: merged weights give the LoRA model's logits.
    merged, _, _ = load_finetuned_lm(str(workdir), "latest", merge=True)
    assert not has_lora(merged)
    np.testing.assert_allclose(_logits(merged), _logits(lm), atol=1e-5, rtol=0)


def _fresh(config):
    """The run's model at initialisation (same seed, same adapters before training)."""
    from sft_jax.models.finetuned import build_lm

    return build_lm(config.model, "lora", config.dtype, lora=config.lora.to_dict(), seed=config.seed)[0]
