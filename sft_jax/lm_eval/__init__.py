"""The lm-evaluation-harness model `sft_jax`: a pre-trained model or a fine-tuning run's checkpoint, loaded
from `--model_args` and laid out on a device mesh (`sft_jax.evaluate.lm_harness.HarnessLM` answers the
requests). Importing this module registers it with the harness; `python -m sft_jax.lm_eval` is the harness's
own command line with it registered:

    python -m sft_jax.lm_eval --model sft_jax --model_args workdir=DIR --tasks hellaswag --batch_size 8
    python -m sft_jax.lm_eval --model sft_jax --model_args model=smollm2-135m-instruct,dtype=bfloat16 --tasks arc_easy

Model arguments (comma-separated KEY=VALUE, as for any harness model):
  workdir       a fine-tuning run (sft / language_modeling): its best checkpoint, LoRA adapters merged
  model         a short name, HF directory or hub id, or .gguf file (`pretrained` is a synonym); with workdir it
                must name the run's model
  dtype         compute dtype, float32 (default, or the run's) or bfloat16
  mesh          device mesh as AXIS:SIZE pairs joined by "/" (e.g. fsdp:4/tensor:2; one size may be -1: the
                remaining devices); default fsdp:-1, every device, weights split over them, batches too
  max_length, max_gen_toks, seed: as `HarnessLM`'s; the harness's --batch_size sets batch_size
"""

from __future__ import annotations

from typing import Any

import jax
from lm_eval.api.registry import register_model

from sft_jax import sharding
from sft_jax.evaluate.lm_harness import HarnessLM
from sft_jax.state import ModelDef
from sft_jax.tasks.language_model import load_lm


def parse_mesh(text: str) -> dict[str, int]:
    """"fsdp:4/tensor:2" -> {"fsdp": 4, "tensor": 2} (`sharding.make_mesh` checks the axes and sizes)."""
    try:
        return {axis: int(size) for axis, size in (part.split(":") for part in text.split("/") if part)}
    except ValueError:
        raise ValueError(f"lm_eval model_args mesh={text!r}: expected AXIS:SIZE pairs joined by '/', "
                         "e.g. fsdp:4/tensor:2") from None


@register_model("sft_jax")
class SftJaxLM(HarnessLM):
    """`HarnessLM` of `model` or of the run in `workdir`, its weights laid out on `mesh` by their logical axes."""

    def __init__(self, model: str | None = None, workdir: str | None = None, *, pretrained: str | None = None,
                 dtype: str | None = None, mesh: str = "fsdp:-1", batch_size: int | str | None = 8,
                 max_length: int | None = None, max_gen_toks: int = 256, seed: int = 0, **harness: Any) -> None:
        # The harness also passes max_batch_size and device (ignored: the mesh says where the model runs).
        unknown = sorted(k for k, v in harness.items() if k not in ("max_batch_size", "device") and v is not None)
        if unknown:
            raise ValueError(f"lm_eval model_args {unknown}: unknown to the sft_jax model; expected workdir, model, "
                             "dtype, mesh, max_length, max_gen_toks, seed")
        if model and pretrained and model != pretrained:
            raise ValueError(f"lm_eval model_args: model={model} and pretrained={pretrained}; give one")
        lm, tokenizer = load_lm(model or pretrained, workdir, dtype)
        model_def, params = ModelDef.split(lm)
        mesh_ = sharding.make_mesh(parse_mesh(mesh))
        placement = sharding.param_shardings(model_def.names, mesh_, shapes={k: v.shape for k, v in params.items()},
                                             axes=model_def.axes)
        params = {k: jax.device_put(v, placement[k]) for k, v in params.items()}
        size = 8 if batch_size in (None, "", "auto") or str(batch_size).startswith("auto") else int(batch_size)
        super().__init__(model_def, params, tokenizer, batch_size=size,
                         max_length=int(max_length) if max_length else None, max_gen_toks=int(max_gen_toks),
                         seed=int(seed))
