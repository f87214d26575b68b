"""The 8B recipes (configs/recipes/) fit where they say, by the planner, from the models' config.json alone:
LoRA and QLoRA on one 80 GB device, full fine-tuning over 8 with FSDP."""

from __future__ import annotations

import importlib
import pathlib

import jax
import pytest

from sft_jax.plan import plan

SHAPES = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "memory_plan" / "shapes"
RECIPES = {"llama31_8b": "llama-3.1-8b.json", "qwen3_8b": "qwen3-8b.json"}

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices; see conftest.py")


# Every method of the Llama recipe and QLoRA of the Qwen3 one: the recipes share their code and differ in the
# shapes read from config.json.
@pytest.mark.parametrize("recipe, method", [("llama31_8b", "lora"), ("llama31_8b", "qlora"), ("llama31_8b", "full"),
                                            ("qwen3_8b", "qlora")])
def test_recipe_fits_its_devices(recipe, method):
    config = importlib.import_module(f"configs.recipes.{recipe}").get_config(method)
    devices = 8 if method == "full" else 1
    assert config.mesh["fsdp"] == devices and config.scan_layers
    config.model = str(SHAPES / RECIPES[recipe])  # shapes only: nothing is downloaded or read but config.json
    planned = plan(config, device_memory_gb=80.0, devices=jax.devices()[:devices])
    assert planned.fits, planned.table()
    assert planned.total_params > 7.5e9
    if method == "qlora":
        assert planned.params < 0.2 * 4 * planned.total_params  # NF4 base + bfloat16 embeddings
