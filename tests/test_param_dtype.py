"""Where a run's parameters come from and how they are stored: safetensors decoders stream straight onto the
run's mesh and layout (`build_lm` with a placement), and `config.param_dtype` stores pre-trained weights in
bfloat16 while new ones (LoRA adapters, a classifier head) stay float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import lm_config

from sft_jax import sharding
from sft_jax.models import finetuned
from sft_jax.models.loading.lm import load_decoder
from sft_jax.rundir import RunDir
from sft_jax.state import ModelDef

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices; see conftest.py")


def _host_loading(monkeypatch):
    """build_lm as before streaming: the whole checkpoint read on the host, then placed by the trainer."""
    real = finetuned.build_lm
    monkeypatch.setattr(finetuned, "build_lm", lambda *a, placement=None, **k: real(*a, **k))
    import sft_jax.tasks.language_model as lm_task

    monkeypatch.setattr(lm_task, "build_lm", finetuned.build_lm)


def test_streamed_run_equals_host_loaded_run(tiny_llama_dir, tmp_path, monkeypatch):
    """On an fsdp x tensor mesh: the task's parameters arrive as global arrays already laid out as the trainer
    lays them out (so placing them copies nothing), and the run is bit-identical to one that loaded on the host."""
    from sft_jax.tasks.language_model import LanguageModel
    from sft_jax.train import train_and_evaluate

    def config(name):
        (tmp_path / name).mkdir()
        c = lm_config(tiny_llama_dir, tmp_path / name, "full")
        c.mesh = {"data": 1, "fsdp": 4, "tensor": 2}
        c.batch_size = c.eval_batch_size = 4
        return c

    c = config("streamed")
    task = LanguageModel(c, RunDir(str(tmp_path / "probe")))
    mesh = sharding.make_mesh(c.mesh.to_dict())
    want = sharding.run_param_shardings(c, mesh, task.model_def.names, {k: v.shape for k, v in task.params.items()},
                                        task.model_def.axes)
    split = 0
    for name, value in task.params.items():
        assert isinstance(value, jax.Array) and value.sharding == want[name], name
        assert jax.device_put(value, want[name]) is value, name  # the trainer's placement is a no-op
        split += len(value.sharding.spec) > 0
    assert split >= 7 * 2  # the kernels of both blocks are split over the mesh
    _, host = ModelDef.split(load_decoder(str(tiny_llama_dir))[0])
    for name, value in task.params.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(host[name]), err_msg=name)
    del task

    streamed = train_and_evaluate(c, str(tmp_path / "streamed"))
    _host_loading(monkeypatch)
    hosted = train_and_evaluate(config("hosted"), str(tmp_path / "hosted"))
    assert streamed["params_fingerprint"] == hosted["params_fingerprint"]
    assert streamed["eval/loss"] == hosted["eval/loss"]


def _final_params(workdir, base_params):
    return RunDir(str(workdir)).restore_params(base_params, "latest")


def test_bfloat16_storage_lora(tiny_llama_dir, tmp_path):
    """param_dtype=bfloat16 with LoRA: the frozen base is stored (and checkpointed) in bfloat16, bit-identical
    to the float32 weights rounded once; the adapters are float32 and learn."""
    from sft_jax.train import train_and_evaluate

    c = lm_config(tiny_llama_dir, tmp_path, "lora")
    c.param_dtype = "bfloat16"
    c.mesh = {"data": 1, "fsdp": 2, "tensor": 1}
    results = train_and_evaluate(c, str(tmp_path / "run"))
    assert np.isfinite(results["eval/loss"])
    lm, _ = finetuned.build_lm(str(tiny_llama_dir), "lora", lora=c.lora)
    model_def, fresh = ModelDef.split(lm)
    target = {k: (v.astype(jnp.bfloat16) if not k.endswith(("lora_a", "lora_b")) else v) for k, v in fresh.items()}
    after = _final_params(tmp_path / "run", target)
    for name, value in after.items():
        if name.endswith(("lora_a", "lora_b")):
            assert value.dtype == jnp.float32, name
        else:
            assert value.dtype == jnp.bfloat16, name
            np.testing.assert_array_equal(np.asarray(value), np.asarray(fresh[name].astype(jnp.bfloat16)), name)
    assert not np.array_equal(np.asarray(after["layers/0/attn/q/lora_b"]), np.asarray(fresh["layers/0/attn/q/lora_b"]))


def test_bfloat16_storage_classifier_head_stays_float32(tiny_config, tmp_path):
    """A text classifier with param_dtype=bfloat16, strategy=partial: the encoder's weights are bfloat16 (the
    frozen ones unchanged), the new head float32."""
    from sft_jax.tasks.text import TextClassification
    from sft_jax.train import train_and_evaluate
    from sft_jax.trainer import setup

    tiny_config.strategy, tiny_config.frozen_layers, tiny_config.param_dtype = "partial", 1, "bfloat16"
    (tmp_path / "probe").mkdir()
    task = TextClassification(tiny_config, RunDir(str(tmp_path / "probe")))
    stored = setup.in_storage_dtype(task.params, "bfloat16", task.layout)
    heads = [n for n in stored if n.startswith("head/")]
    assert heads and all(stored[n].dtype == np.float32 for n in heads)
    assert all(stored[n].dtype == jnp.bfloat16 for n in stored if n not in heads)
    results = train_and_evaluate(tiny_config, str(tmp_path / "run"))
    assert np.isfinite(results["eval/loss"])
    after = _final_params(tmp_path / "run", stored)
    for name in stored:
        assert after[name].dtype == stored[name].dtype, name
        if name.startswith(("encoder/embeddings/", "encoder/layers/0/")):
            np.testing.assert_array_equal(np.asarray(after[name]), np.asarray(stored[name]), err_msg=name)


def test_param_dtype_is_validated_and_fixed_for_a_run(tiny_config, tmp_path):
    from sft_jax.config_defaults import validate
    from sft_jax.train import train_and_evaluate

    tiny_config.param_dtype = "float16"
    with pytest.raises(ValueError, match="config.param_dtype"):
        validate(tiny_config)
    tiny_config.param_dtype = "float32"
    tiny_config.max_steps = 2
    train_and_evaluate(tiny_config, str(tmp_path / "run"))
    tiny_config.param_dtype = "bfloat16"
    with pytest.raises(ValueError, match="param_dtype: 'float32' -> 'bfloat16'"):
        train_and_evaluate(tiny_config, str(tmp_path / "run"))
