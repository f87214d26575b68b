"""Language-model runs (task sft / language_modeling) out: a merged Hugging Face folder, PEFT adapter files of
a LoRA run, or a GGUF file; each with a model card."""

from __future__ import annotations

import os
import pathlib

from sft_jax.export import model_card
from sft_jax.rundir import RunDir

_CAUSAL_USE = '''
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{out}")
tokenizer = AutoTokenizer.from_pretrained("{out}")'''


def export_hf(workdir: str, out: str | os.PathLike, checkpoint: str = "best") -> pathlib.Path:
    """The run's model, LoRA adapters merged, as a HF folder (`sft_jax.models.loading.lm.export_hf`). The
    weights are laid out over every device (of every process) by the run's sharding rules, and each process
    writes its own shards: no host holds more of the model than its devices' part."""
    import jax

    from sft_jax import sharding
    from sft_jax.models.loading.lm import export_hf as write_hf
    from sft_jax.tasks.language_model import load_finetuned_lm

    lm, config, tokenizer = load_finetuned_lm(workdir, checkpoint, merge=True, mesh=sharding.make_mesh({"fsdp": -1}))
    out = write_hf(lm, out, tokenizer=tokenizer)
    if jax.process_index() == 0:
        model_card.write(out, workdir, what=f"A {config.family} language model (adapters merged)",
                         usage=_CAUSAL_USE.format(out=out))
    return out


def export_peft(workdir: str, out: str | os.PathLike, checkpoint: str = "best") -> pathlib.Path:
    """The adapters of a strategy=lora run as a PEFT LoRA folder, for `peft.PeftModel.from_pretrained` on
    the base model."""
    from sft_jax.models.loading.peft import save_adapters
    from sft_jax.models.registry import resolve_checkpoint
    from sft_jax.state import ModelDef
    from sft_jax.tasks.language_model import load_finetuned_lm

    run = RunDir(workdir).read_config()
    if run.get("strategy") != "lora":
        raise ValueError(f"{workdir}: --format=peft writes LoRA adapters, and this run's strategy is "
                         f"{run.get('strategy')!r}; use --format=hf (or gguf) for the whole model")
    lm, config, _ = load_finetuned_lm(workdir, checkpoint)
    _, params = ModelDef.split(lm)
    base = resolve_checkpoint(run["model"])
    base_name = str(base.path) if base.kind == "hf" else run["model"]
    out = save_adapters(params, run["lora"], out, family=config.family, base_model=base_name)
    model_card.write(out, workdir, what=f"LoRA adapters (PEFT) for the {config.family} model `{base_name}`",
                     usage=f'''
from peft import PeftModel
from transformers import AutoModelForCausalLM

model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base_name}"), "{out}")''')
    return out


def export_gguf(workdir: str, out: str | os.PathLike, outtype: str = "f16", checkpoint: str = "best"
                ) -> pathlib.Path:
    """The run's model, LoRA adapters merged, as OUT/model-OUTTYPE.gguf (tokenizer and chat template in its
    metadata)."""
    try:
        from sft_jax.models.loading.gguf_export import OUTTYPES
        from sft_jax.models.loading.gguf_export import export_gguf as write_gguf
    except ImportError as e:
        raise ValueError(f"--format=gguf is unavailable in this installation ({e})") from None
    if outtype not in OUTTYPES:
        raise ValueError(f"--gguf_type={outtype}: expected one of {', '.join(OUTTYPES)}")
    from sft_jax.tasks.language_model import load_finetuned_lm

    lm, config, tokenizer = load_finetuned_lm(workdir, checkpoint, merge=True)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = pathlib.Path(write_gguf(lm, tokenizer, out / f"model-{outtype}.gguf", outtype))
    model_card.write(out, workdir, what=f"A {config.family} language model as GGUF ({outtype}, adapters merged)",
                     usage=f'''
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{out}", gguf_file="{path.name}")''')
    return path
