"""Scanned decoder layers (`config.scan_layers`, `sft_jax.models.scan`): the same model computed under a scan,
program size flat in depth, remat that takes effect on CPU too, and runs that train, freeze and export alike."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sft_jax.models import remat
from sft_jax.models.decoder import DecoderConfig, DecoderLM
from sft_jax.models.scan import scan_decoder, unscan_decoder
from sft_jax.state import ModelDef

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=1e4)
FAMILIES = {
    "llama": dict(model_type="llama", num_hidden_layers=5),
    "gemma2": dict(model_type="gemma2", num_hidden_layers=7, sliding_window=4, query_pre_attn_scalar=8,
                   attn_logit_softcapping=5.0),  # local / global: period 2, 3 groups, 1 layer left over
    "gemma3": dict(model_type="gemma3_text", num_hidden_layers=7, sliding_window=4, query_pre_attn_scalar=8,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2
                   + ["sliding_attention"]),
}


def _model(family, **extra):
    config = DecoderConfig.from_hf(dict(BASE, **FAMILIES[family], **extra))
    return DecoderLM(config, rngs=nnx.Rngs(0))


def _ids(seed=0, length=12):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 64, (2, length)))


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.mark.parametrize("splits", [(), (2,)])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_scanned_equals_unscanned(family, splits):
    model = _model(family)
    ids, mask = _ids(), jnp.ones((2, 12), jnp.int32).at[0, :3].set(0)
    want = model(ids, mask)
    scan_decoder(model, splits)
    shapes = [segment.shape for segment in model.segments]
    assert any(s.groups >= 2 for s in shapes) and not model.layers
    if family != "llama" and not splits:  # the local / global pattern is the period
        assert max(s.period for s in shapes) == (2 if family == "gemma2" else 3)
    np.testing.assert_allclose(model(ids, mask), want, atol=1e-5)
    # Decoding (KV cache) runs the same blocks one at a time.
    cache = model.init_cache(2, 16)
    h, cache = model.hidden(ids[:, :6], attention_mask=mask[:, :6], cache=cache)
    h2, _ = model.hidden(ids[:, 6:], attention_mask=mask[:, 6:], cache=cache)
    valid = np.asarray(mask).astype(bool)  # padding positions attend to nothing: garbage either way
    np.testing.assert_allclose(np.asarray(model.logits(jnp.concatenate([h, h2], 1)))[valid], np.asarray(want)[valid],
                               atol=1e-5)
    names = ModelDef.split(model)[1]
    assert any(n.startswith("segments/") and "/stacks/" in n for n in names)
    unscan_decoder(model)
    np.testing.assert_array_equal(model(ids, mask), ModelDef.split(_model(family))[0].merge(
        ModelDef.split(model)[1])(ids, mask))


def test_gradients_equal_and_stacked_axes():
    model = _model("gemma2")
    ids = _ids(1)
    model_def, params = ModelDef.split(model)

    def loss(params, model_def):
        return jnp.mean(jnp.sin(model_def.merge(params)(ids)))

    want = jax.grad(loss)(params, model_def)
    scanned = scan_decoder(_model("gemma2"))
    s_def, s_params = ModelDef.split(scanned)
    grads = jax.grad(loss)(s_params, s_def)
    back = ModelDef.split(unscan_decoder(s_def.merge(grads)))[1]
    assert set(back) == set(want)
    for name in want:
        np.testing.assert_allclose(back[name], want[name], atol=1e-6, err_msg=name)
    stacked = [n for n in s_def.axes if "/stacks/" in n]
    assert stacked and all(s_def.axes[n][0] == "layers" for n in stacked)


def _hlo_size(layers: int, scan: bool) -> int:
    config = DecoderConfig.from_hf(dict(BASE, model_type="llama", num_hidden_layers=layers))
    model = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
    if scan:
        scan_decoder(model)
    model_def, params = ModelDef.split(model)

    def loss(params, ids):
        return jnp.mean(model_def.merge(params)(ids) ** 2)

    return len(jax.jit(jax.grad(loss)).lower(params, jax.ShapeDtypeStruct((2, 16), jnp.int32)).as_text())


def test_program_size_flat_in_depth():
    assert _hlo_size(32, scan=True) < 1.2 * _hlo_size(4, scan=True)
    assert _hlo_size(32, scan=False) > 4 * _hlo_size(4, scan=False)


def test_remat_under_scan_halves_compiled_temporaries():
    """Llama-3.2-1B shape at sequence 2048: with scanned layers, `full` remat's compiled temporaries (XLA:CPU's
    memory analysis) are under half of none's. (Unrolled, XLA:CPU merges the recomputation back.)"""
    config = DecoderConfig.from_hf(dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=5e5, tie_word_embeddings=True))

    def temp_bytes(policy):
        model = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
        remat.set_remat(model, policy)
        scan_decoder(model)
        model_def, params = ModelDef.split(model)

        def loss(params, ids):
            hidden, _ = model_def.merge(params).hidden(ids)
            return jnp.mean(hidden**2)

        compiled = jax.jit(jax.grad(loss)).lower(params, jax.ShapeDtypeStruct((1, 2048), jnp.int32)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    none, full = temp_bytes("none"), temp_bytes("full")
    assert full < none / 2, (none, full)


@pytest.mark.parametrize("strategy", ["partial"])  # its two stacks: the hardest layout
def test_scanned_runs_train_like_unscanned(strategy, tiny_decoder_dir, tmp_path):
    """A tiny 4-layer Llama: scanned (with remat) and unscanned runs reach the same evaluation loss; partial
    (frozen_layers=2) keeps its frozen stack bit-identical and out of the optimizer; the workdir gives back a
    per-layer model."""
    from conftest import lm_config

    from sft_jax.models.loading.lm import load_decoder
    from sft_jax.rundir import RunDir
    from sft_jax.tasks.language_model import LanguageModel, load_finetuned_lm
    from sft_jax.train import train_and_evaluate

    model_dir = tiny_decoder_dir("llama4")
    results = {}
    for scan in (False, True):
        (tmp_path / str(scan)).mkdir()
        c = lm_config(model_dir, tmp_path / str(scan), strategy)
        c.scan_layers, c.remat, c.frozen_layers = scan, "full" if scan else "none", 2
        results[scan] = train_and_evaluate(c, str(tmp_path / str(scan) / "run"))
    np.testing.assert_allclose(results[True]["eval/loss"], results[False]["eval/loss"], rtol=1e-4)
    assert results[True]["trainable_params"] == results[False]["trainable_params"]
    task = LanguageModel(c, RunDir(str(tmp_path / "probe")))
    assert any("/stacks/" in n for n in task.params)
    if strategy == "partial":  # two stacks: layers 0-1 (frozen, with the embedding) and 2-3
        assert task.layout.unit_sizes == (2, 2)
    before = ModelDef.split(load_decoder(str(model_dir))[0])[1]
    after = ModelDef.split(load_finetuned_lm(str(tmp_path / "True" / "run"), "latest")[0])[1]
    assert set(after) >= set(before)
    if strategy == "partial":
        for name in before:
            same = np.array_equal(np.asarray(after[name]), np.asarray(before[name]))
            assert same == name.startswith(("embed/", "layers/0/", "layers/1/")), name


def test_refusals(tiny_config, tiny_llama_dir, tmp_path):
    from conftest import lm_config

    from sft_jax.config_defaults import validate

    c = lm_config(tiny_llama_dir, tmp_path, "full")
    c.scan_layers, c.llrd = True, 0.8
    with pytest.raises(ValueError, match="config.llrd=0.8: per-layer optimizer groups"):
        validate(c)
    tiny_config.scan_layers = True
    with pytest.raises(ValueError, match="scan_layers"):
        validate(tiny_config)


def test_resume_with_the_other_setting_is_refused(tiny_llama_dir, tmp_path):
    from conftest import lm_config

    from sft_jax.train import train_and_evaluate

    c = lm_config(tiny_llama_dir, tmp_path, "full")
    train_and_evaluate(c, str(tmp_path / "run"))
    c.scan_layers = True
    with pytest.raises(ValueError, match="scan_layers: False -> True"):
        train_and_evaluate(c, str(tmp_path / "run"))


def test_export_of_a_scanned_model(tmp_path):
    pytest.importorskip("transformers")
    from sft_jax.models.loading.lm import export_hf, load_decoder

    model = scan_decoder(_model("llama"))
    ids = _ids(2)
    out = export_hf(model, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5
    again, _ = load_decoder(str(out))
    np.testing.assert_allclose(again(ids), model(ids), atol=1e-5)
    assert model.segments  # export leaves the model scanned
