"""Frozen bfloat16 weights cast once (`train_step.compute_cast_plan` / `with_compute_params`): which
parameters qualify, and training with the copies is bit-identical to casting them in every step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sft_jax import optim, strategies
from sft_jax.losses import classification_loss, lm_loss
from sft_jax.state import ModelDef, TrainState
from sft_jax.train_step import compute_cast_plan, make_train_step, with_compute_params

LORA = {"targets": r"layers/\d+/(attn/(q|k|v|o)|mlp/(gate|up|down))$"}


def _bert(model_dir, dtype):
    from sft_jax.models.classifier import EncoderClassifier, bert_layout
    from sft_jax.models.loading.hf import load_bert

    encoder, config = load_bert(model_dir, dtype=dtype)
    module = EncoderClassifier(encoder, config.hidden_size, 2, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 1000, (4, 16), dtype=np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": np.array([0, 1, 1, 0], np.int32),
             "weights": np.ones(4, np.float32)}
    return module, bert_layout(config.num_hidden_layers), classification_loss, batch


def _decoder(model_dir, dtype, strategy):
    from sft_jax.models.finetuned import build_lm, decoder_layout

    lm, config = build_lm(str(model_dir), strategy, "bfloat16" if dtype == jnp.bfloat16 else "float32", lora=LORA)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 1000, (2, 16), dtype=np.int32)
    batch = {"input_ids": ids, "targets": np.roll(ids, -1, 1), "loss_mask": np.ones(ids.shape, np.float32),
             "segment_ids": np.ones_like(ids), "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1))}
    return lm, decoder_layout(config.num_layers), lm_loss, batch


def _setup(family, strategy, dtype, dirs):
    if family == "bert":
        module, layout, loss_fn, batch = _bert(dirs["bert"], dtype)
    else:
        module, layout, loss_fn, batch = _decoder(dirs[family], dtype, strategy)
    model_def, params = ModelDef.split(module)
    labels = strategies.label_params(model_def.names, strategies.strategy_rules(strategy, layout, 1))
    trainable = strategies.trainable_names(labels)
    tx = strategies.partition(labels, optim.adamw(optax.constant_schedule(1e-2), weight_decay=0.01, clip_norm=1.0))
    return model_def, params, loss_fn, batch, trainable, tx


@pytest.fixture
def dirs(tiny_bert_dir, tiny_llama_dir, tiny_gemma3_dir):
    return {"bert": tiny_bert_dir, "llama": tiny_llama_dir, "gemma3": tiny_gemma3_dir}


def test_plan_takes_frozen_bfloat16_matmul_weights_only(dirs):
    """Frozen kernels that the bfloat16 model only reads cast qualify; trainable ones, norm scales, biases,
    the float32 classifier head and embeddings read in float32 (BERT's sum, the decoder's lookup, which
    also serves as the tied LM head) do not; in float32 nothing does."""
    model_def, params, loss_fn, batch, trainable, _ = _setup("llama", "partial", jnp.bfloat16, dirs)
    plan = compute_cast_plan(model_def, loss_fn, params, batch, trainable)
    frozen_kernels = {n for n in params if n.startswith("layers/0/") and n.endswith("/kernel")}
    assert frozen_kernels and set(plan) == frozen_kernels, sorted(plan)
    assert all(d == jnp.bfloat16 for d in plan.values())

    model_def, params, loss_fn, batch, trainable, _ = _setup("bert", "head", jnp.bfloat16, dirs)
    plan = compute_cast_plan(model_def, loss_fn, params, batch, trainable)
    assert plan and all(n.endswith("/kernel") and "layers/" in n for n in plan), sorted(plan)
    assert not any("embedding" in n or n.startswith("head/") for n in plan)
    assert len(plan) == sum(1 for n in params if "layers/" in n and n.endswith("/kernel"))

    model_def, params, loss_fn, batch, trainable, _ = _setup("llama", "partial", jnp.float32, dirs)
    assert compute_cast_plan(model_def, loss_fn, params, batch, trainable) == {}


@pytest.mark.parametrize("family,strategy", [("bert", "partial"), ("bert", "head"), ("llama", "partial"),
                                             ("llama", "lora"), ("gemma3", "head"), ("gemma3", "lora")])
def test_training_with_cast_once_copies_is_bit_identical(dirs, family, strategy):
    """Three bfloat16 steps with the copies and three casting in the step give bit-identical losses and
    parameters; the float32 masters of frozen parameters are untouched and the copies pass through."""
    model_def, params, loss_fn, batch, trainable, tx = _setup(family, strategy, jnp.bfloat16, dirs)
    plan = compute_cast_plan(model_def, loss_fn, params, batch, trainable)
    assert plan
    host = {k: np.asarray(v) for k, v in params.items()}
    step = make_train_step(model_def, tx, loss_fn, trainable)
    runs = []
    for cached in (False, True):
        p = {k: jnp.asarray(v) for k, v in host.items()}
        state = TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                           rng=jax.random.key_data(jax.random.key(0)))
        if cached:
            state = with_compute_params(state, plan)
            assert {k: v.dtype for k, v in state.compute_params.items()} == plan
        losses = []
        for _ in range(3):
            state, m = step(state, batch)
            losses.append(np.asarray(m["loss"]))
        runs.append((losses, {k: np.asarray(v) for k, v in state.params.items()}))
        if cached:
            for k in plan:
                np.testing.assert_array_equal(np.asarray(state.compute_params[k]), host[k].astype(jnp.bfloat16))
    (loss_a, params_a), (loss_b, params_b) = runs
    np.testing.assert_array_equal(loss_a, loss_b)
    for k in host:
        np.testing.assert_array_equal(params_a[k], params_b[k], err_msg=k)
        if k not in trainable:
            np.testing.assert_array_equal(params_b[k], host[k], err_msg=k)
    assert any(not np.array_equal(params_b[k], host[k]) for k in trainable)


def test_state_sharding_gets_the_copies_layouts(dirs):
    model_def, params, loss_fn, batch, trainable, tx = _setup("llama", "partial", jnp.bfloat16, dirs)
    plan = compute_cast_plan(model_def, loss_fn, params, batch, trainable)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shard = TrainState(step=rep, params={k: rep for k in params}, opt_state=None, rng=rep)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=None, rng=jnp.zeros(2, jnp.uint32))
    state, shard = with_compute_params(state, plan, shard)
    assert set(shard.compute_params) == set(plan) == set(state.compute_params)


def test_bfloat16_partial_run_uses_copies_and_resumes_bit_identical(tiny_config, tmp_path, monkeypatch):
    """train_and_evaluate in bfloat16 with a frozen lower half casts those blocks' kernels once (the copies
    are rebuilt after a restore, never saved) and a run killed after its step-2 checkpoint resumes to the
    same parameters as an uninterrupted one; the frozen float32 masters end bit-identical."""
    from conftest import CrashAfterSave, crash_after_save

    from sft_jax.train import train_and_evaluate
    from sft_jax.trainer import setup

    tiny_config.dtype, tiny_config.strategy, tiny_config.frozen_layers = "bfloat16", "partial", 1
    plans = []
    real = setup.with_compute_params

    def record(state, plan, state_sharding=None):
        plans.append(dict(plan))
        return real(state, plan, state_sharding)

    monkeypatch.setattr(setup, "with_compute_params", record)
    whole = train_and_evaluate(tiny_config, str(tmp_path / "whole"))
    assert plans and plans[0] and all("layers/0/" in n and n.endswith("/kernel") for n in plans[0]), plans
    with monkeypatch.context() as m:
        crash_after_save(m, 2)
        with pytest.raises(CrashAfterSave):
            train_and_evaluate(tiny_config, str(tmp_path / "resumed"))
    resumed = train_and_evaluate(tiny_config, str(tmp_path / "resumed"))
    assert len(plans) == 3 and plans[2] == plans[0]
    assert resumed["params_fingerprint"] == whole["params_fingerprint"]
    # The checkpoint holds the model's parameters only, the frozen ones exactly as loaded.
    from sft_jax.rundir import RunDir

    _, pretrained = ModelDef.split(_bert(tiny_config.model, jnp.float32)[0])
    saved = RunDir(tmp_path / "whole").restore_params(pretrained, "latest")
    assert set(saved) == set(pretrained)
    for name in plans[0]:
        np.testing.assert_array_equal(np.asarray(saved[name]), np.asarray(pretrained[name]))


def test_copies_are_dropped_from_use_when_a_phase_unfreezes(tiny_config, tmp_path, monkeypatch):
    """LP-FT in bfloat16: the encoder is frozen for the first two steps (its kernels read from the copies),
    then trains (read from the masters): the run ends bit-identical to one without copies."""
    from sft_jax.train import train_and_evaluate
    from sft_jax.trainer import setup

    tiny_config.dtype, tiny_config.strategy = "bfloat16", "full"
    tiny_config.lp_ft.head_steps = 2
    plans = []
    real = setup.compute_cast_plan
    monkeypatch.setattr(setup, "compute_cast_plan", lambda *args, **kwargs: plans.append(real(*args, **kwargs))
                        or plans[-1])
    with_copies = train_and_evaluate(tiny_config, str(tmp_path / "copies"))
    assert plans[0] and all(n.startswith("encoder/layers/") for n in plans[0]), plans
    monkeypatch.setattr(setup, "compute_cast_plan", lambda *args, **kwargs: {})
    without = train_and_evaluate(tiny_config, str(tmp_path / "none"))
    assert with_copies["params_fingerprint"] == without["params_fingerprint"]
    assert with_copies["eval/accuracy"] == without["eval/accuracy"]
