"""Data parallelism on 8 simulated CPU devices (conftest sets them) and one compilation per bucket."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest

from sft_jax import sharding

SHORT = ["good", "bad", "fun", "dull", "great", "boring", "nice", "awful"]
LONG = [f"a good movie, fun and great, with a story that holds up, number {i} of many" for i in range(8)]
LABELS = [1, 0, 1, 0, 1, 0, 1, 0]

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices; see conftest.py")


def _train_losses(workdir: pathlib.Path) -> list[float]:
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [row["train/loss"] for row in lines if "train/loss" in row]


def test_data_parallel_matches_single_device(tiny_config, tmp_path):
    """The same run (dropout on, same seed) on a {"data": 8} mesh and on one device: same losses."""
    from sft_jax.train import train_and_evaluate

    tiny_config.batch_size = 16
    tiny_config.max_steps = 3
    tiny_config.eval_every = 100
    tiny_config.checkpoint_every = 100
    assert tiny_config.head_dropout > 0
    losses = {}
    for data in (1, 8):
        tiny_config.mesh = {"data": data, "fsdp": 1, "tensor": 1}
        train_and_evaluate(tiny_config, str(tmp_path / f"data{data}"))
        losses[data] = _train_losses(tmp_path / f"data{data}")
    assert len(losses[1]) == 3
    np.testing.assert_allclose(losses[8], losses[1], atol=1e-5, rtol=0)
    assert len(set(losses[1])) == 3  # the steps did train (the losses are not one repeated value)


def test_batch_is_split_over_devices(tiny_trainer):
    t = tiny_trainer("full", mesh={"data": 8})
    assert t.mesh.devices.size == 8
    host = t.batch(LONG, LABELS)
    batch = sharding.put_batch(host, t.batch_sharding)
    for name, x in batch.items():
        assert len(x.sharding.device_set) == 8, name
        shapes = {s.data.shape for s in x.addressable_shards}
        assert shapes == {(1, *host[name].shape[1:])}, name  # 8 rows / 8 devices, not replicated
    # The compiled step itself takes the batch split over the data axis.
    compiled = t.train_fn.lower(t.state, batch).compile()
    batch_in = compiled.input_shardings[0][1]
    assert all(s.spec == t.batch_sharding.spec for s in jax.tree.leaves(batch_in))
    state, metrics = t.train_fn(t.state, batch)
    assert np.isfinite(float(metrics["loss"]))
    assert len(state.params["head/kernel"].sharding.device_set) == 8


def test_step_compiles_once_per_bucket(tiny_trainer):
    t = tiny_trainer("head", mesh={"data": 8})  # the strategy does not matter here; head compiles fastest
    batches = [t.batch(SHORT, LABELS), t.batch(LONG, LABELS)]
    assert [b["input_ids"].shape[1] for b in batches] == [16, 32]
    state = t.state
    for step in range(6):
        state, _ = t.train_fn(state, sharding.put_batch(batches[step % 2], t.batch_sharding))
    jax.block_until_ready(state)
    assert int(state.step) == 6
    assert t.train_fn._cache_size() == 2


# --- decoders: FSDP and tensor parallelism from the default logical axis rules (parameters and activations) ---

DECODER_MESHES = [{"data": 8}, {"fsdp": 8}, {"data": 2, "tensor": 4}, {"fsdp": 2, "tensor": 4}]


def _decoder_losses(model_dir, mesh_shape, steps=3):
    import jax
    import jax.numpy as jnp
    import optax

    from sft_jax import optim, sharding, strategies
    from sft_jax.data import lm as lm_data
    from sft_jax.losses import lm_loss
    from sft_jax.models.loading.lm import load_decoder, load_lm_tokenizer
    from sft_jax.state import ModelDef, TrainState
    from sft_jax.train_step import make_train_step

    tokenizer = load_lm_tokenizer(str(model_dir))
    model, _ = load_decoder(str(model_dir))
    model_def, params = ModelDef.split(model)
    labels = {name: strategies.TRAINABLE for name in model_def.names}
    tx = strategies.partition(labels, optim.adamw(optax.constant_schedule(1e-2)))
    mesh = sharding.make_mesh(mesh_shape)
    p_shard = sharding.param_shardings(model_def.names, mesh, shapes={k: v.shape for k, v in params.items()},
                                       axes=model_def.axes)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = {k: jax.device_put(v, p_shard[k]) for k, v in params.items()}
    opt_shard = sharding.tree_shardings(jax.eval_shape(tx.init, params), p_shard, mesh)
    state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params,
                       opt_state=jax.jit(tx.init, out_shardings=opt_shard)(params),
                       rng=jax.device_put(jax.random.key_data(jax.random.key(0)), replicated))
    state_shard = TrainState(step=replicated, params=p_shard, opt_state=opt_shard, rng=replicated)
    b_shard = sharding.batch_sharding(mesh)
    step_fn = make_train_step(model_def, tx, lm_loss, model_def.names, state_sharding=state_shard,
                              batch_sharding=b_shard, logical_rules=sharding.DEFAULT_LOGICAL_RULES)
    docs = [lm_data.Document(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}", f"d:{i}")
            for i in range(8)]
    ds = lm_data.encode_documents(docs, tokenizer, 32)
    losses = []
    for s in range(steps):
        batch = lm_data.make_lm_batch(ds, np.roll(np.arange(8), s), 8, (32,), tokenizer.pad_token_id)
        with jax.default_matmul_precision("highest"):
            if s == 0:  # the traced step, to look for the activation constraints
                text = step_fn.lower(state, sharding.put_batch(batch, b_shard)).as_text()
            state, m = step_fn(state, sharding.put_batch(batch, b_shard))
        losses.append(float(m["loss"]))

    def per_device_fraction(tree):
        leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "addressable_shards") and x.ndim]
        total = sum(x.nbytes for x in leaves)
        return sum(x.addressable_shards[0].data.nbytes for x in leaves) / total

    return losses, per_device_fraction(state.params), per_device_fraction(state.opt_state), text


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_decoder_meshes_match_one_device(family, tiny_llama_dir, tiny_gemma3_dir):
    """Data, FSDP, data x tensor and FSDP x tensor meshes give the single-device losses over 3 steps.

    Tolerance 2e-5 relative: the same float32 sums in a different order (sharded matmuls, all-reduces)."""
    model_dir = tiny_llama_dir if family == "llama" else tiny_gemma3_dir
    reference, _, _, _ = _decoder_losses(model_dir, {"data": 1})
    # Every mesh on the LLaMA; the combined FSDP x tensor mesh on Gemma 3 (QK norms, sliding windows).
    for mesh in DECODER_MESHES if family == "llama" else DECODER_MESHES[-1:]:
        losses, param_frac, opt_frac, text = _decoder_losses(model_dir, mesh)
        np.testing.assert_allclose(losses, reference, rtol=2e-5, err_msg=str(mesh))
        if mesh.get("tensor"):  # the vocabulary-parallel logits constraint is in the step (and so are the others)
            vocab = int(json.loads((model_dir / "config.json").read_text())["vocab_size"])
            logits = [line for line in text.splitlines() if "sharding_constraint" in line and f"x{vocab}xf32>" in line]
            assert any('{"tensor"}]> : tensor<' in line for line in logits), (mesh, logits)
        if mesh == {"fsdp": 8}:
            # Each device holds ~1/8 of the parameter and optimizer bytes (norm scales stay replicated).
            assert param_frac < 0.13 and opt_frac < 0.13, (param_frac, opt_frac)
    assert reference[2] < reference[0]  # it trains
