"""LoRA adapters written by sft_jax load through the `peft` library itself (`PeftModel.from_pretrained` onto the
transformers base model) and give sft_jax's logits: adapters on every projection (target_modules a list of
names) and on some layers only (a full-match regex), for LLaMA and Gemma 3 (whose norms and scalings differ).

Tolerance 1e-4 on float32 logits ~1 of the tiny random models (XLA matmul precision "highest"); the two differ
by summation order only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sft_jax.models.loading.lm import load_decoder
from sft_jax.models.loading.peft import save_adapters
from sft_jax.models.lora import DEFAULT_TARGETS, LoraConfig, LoRALinear, apply_lora
from sft_jax.state import ModelDef

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _inputs():
    """12 tokens (past Gemma's sliding window of 4); row 0 left-padded."""
    ids = np.random.default_rng(0).integers(3, 5000, (2, 12))
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


def _perturbed_lora_model(model_dir, targets: str, rank: int, alpha: float):
    """The pre-trained decoder with adapters whose A and B are random (as after training), so both matter."""
    model, _ = load_decoder(str(model_dir))
    apply_lora(model, targets, rank, alpha, 0.0, rngs=nnx.Rngs(0))
    key = jax.random.key(1)
    for i, (_, layer) in enumerate(nnx.iter_modules(model)):
        if isinstance(layer, LoRALinear):
            ka, kb = jax.random.split(jax.random.fold_in(key, i))
            layer.lora_a[...] = 0.3 * jax.random.normal(ka, layer.lora_a.shape)
            layer.lora_b[...] = 0.2 * jax.random.normal(kb, layer.lora_b.shape)
    return model


def _peft_logits(model_dir, adapter_dir) -> np.ndarray:
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    ids, mask = _inputs()
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


SOME_LAYERS = r"layers/0/attn/(q|v)$|layers/1/mlp/down$"


@pytest.mark.parametrize("family, targets", [("llama", DEFAULT_TARGETS), ("gemma3", DEFAULT_TARGETS),
                                             ("llama", SOME_LAYERS)],
                         ids=["llama-every_projection", "gemma3-every_projection", "llama-some_layers"])
def test_peft_library_loads_our_adapters_with_equal_logits(tiny_decoder_dir, tmp_path, family, targets):
    model_dir = tiny_decoder_dir(family)
    rank, alpha = 4, 8.0
    model = _perturbed_lora_model(model_dir, targets, rank, alpha)
    params = ModelDef.split(model)[1]
    adapter_dir = save_adapters(params, LoraConfig(rank=rank, alpha=alpha), tmp_path / "adapter", family=family,
                                base_model=str(model_dir))
    ids, mask = _inputs()
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    base = np.asarray(load_decoder(str(model_dir))[0](jnp.asarray(ids), jnp.asarray(mask)))
    valid = mask.astype(bool)
    assert np.abs(ours - base)[valid].max() > 1e-2  # the adapters matter

    theirs = _peft_logits(model_dir, adapter_dir)
    assert np.abs(theirs - ours)[valid].max() < 1e-4
