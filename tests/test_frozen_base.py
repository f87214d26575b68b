"""A language model's checkpoints hold what trains (adapters, optimizer state, step, rng) and a record of the
frozen base (`checkpoint.FrozenBase`), never the base itself: resumes, best/, generation and export rebuild it
from the pre-trained weights and the run's config.json, and refuse weights changed on disk since."""

from __future__ import annotations

import shutil

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import lm_config, resumed_after_crash


def _saved_names(workdir, which="latest"):
    """The parameter names the newest `which` checkpoint of `workdir` holds (read from orbax's metadata)."""
    root = workdir / "checkpoints" / which
    step = max(int(p.name) for p in root.iterdir() if p.name.isdigit())
    return set(ocp.StandardCheckpointer().metadata(root / str(step) / "params").item_metadata.keys())


def test_qlora_checkpoint_holds_adapters_and_resumes_bit_identically(tiny_llama_dir, tmp_path, monkeypatch):
    """NF4 base on an fsdp=2 mesh: latest/ and best/ hold the 28 adapter arrays alone; a run killed after its
    step-2 checkpoint and resumed (re-quantising the base) ends bit-identical to one never interrupted; the
    workdir, rebuilt on one device, generates and exports."""
    from sft_jax.generate import generate
    from sft_jax.models.loading.lm import export_hf
    from sft_jax.tasks.language_model import load_finetuned_lm, load_lm
    from sft_jax.train import train_and_evaluate

    c = lm_config(tiny_llama_dir, tmp_path, "lora")
    c.quantize_base, c.max_steps = "nf4", 4
    c.mesh = {"data": 1, "fsdp": 2, "tensor": 1}
    whole = train_and_evaluate(c, str(tmp_path / "whole"))
    adapters = {f"layers/{i}/{p}/lora_{ab}" for i in range(2) for p in
                ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down") for ab in "ab"}
    assert _saved_names(tmp_path / "whole") == adapters
    assert _saved_names(tmp_path / "whole", "best") == adapters

    resumed = resumed_after_crash(c, tmp_path / "resumed", monkeypatch, 2)
    assert resumed["params_fingerprint"] == whole["params_fingerprint"]
    assert resumed["eval/loss"] == whole["eval/loss"]

    lm, _, _ = load_finetuned_lm(str(tmp_path / "whole"))  # best/, its base re-quantised and checked
    assert lm.layers[0].attn.q.kernel.codes.value.dtype == jnp.uint8
    merged, tokenizer = load_lm(workdir=str(tmp_path / "whole"))
    assert generate(merged, tokenizer, ["First Citizen:"], max_new_tokens=3)[0] is not None
    out = export_hf(merged, tmp_path / "export", tokenizer=tokenizer)
    assert (out / "model.safetensors").is_file()


def test_a_base_changed_on_disk_is_refused(tiny_llama_dir, tmp_path):
    """Plain LoRA in bfloat16 storage (also left out: the frozen base is the pre-trained weights, cast). Weights
    edited on disk after the run (same file header) stop the resume and the workdir's loader, naming an array;
    a rewritten file header names the file."""
    from safetensors.numpy import load_file, save_file

    from sft_jax.tasks.language_model import load_finetuned_lm
    from sft_jax.train import train_and_evaluate

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    c = lm_config(model, tmp_path, "lora")
    c.param_dtype = "bfloat16"
    workdir = str(tmp_path / "run")
    train_and_evaluate(c, workdir)
    assert all(n.endswith(("/lora_a", "/lora_b")) for n in _saved_names(tmp_path / "run"))

    weights = load_file(model / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    edited = dict(weights, **{key: weights[key] * np.float32(1.5)})
    save_file(edited, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"differs from the one the run trained on .*layers/1/mlp/down/kernel"):
        train_and_evaluate(c, workdir)
    with pytest.raises(ValueError, match="differs from the one the run trained on"):
        load_finetuned_lm(workdir)

    save_file(weights, model / "model.safetensors", metadata={"format": "pt", "edited": "yes"})
    with pytest.raises(ValueError, match=r"model\.safetensors changed \(size:header"):
        train_and_evaluate(c, workdir)
