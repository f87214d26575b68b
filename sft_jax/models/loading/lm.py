"""Load decoder LMs (LLaMA, Mistral, Qwen2/2.5, Qwen3, Phi-3, Gemma 2, Gemma 3) from GGUF files or HF safetensors
directories; export to HF.

Both sources go through Hugging Face tensor names (`model.layers.3.self_attn.q_proj.weight`), so one
name table serves loading and export. Phi-3's fused `qkv_proj` / `gate_up_proj` weights are split into
those names on load and fused again on export (`hf_tensors`).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sft_jax.models.decoder import DecoderConfig, DecoderLM
from sft_jax.models.loading import tokenizers
from sft_jax.models.loading.files import read_json_object
from sft_jax.models.loading.gguf import read_gguf
from sft_jax.models.loading.hf import read_weights, weights_file
from sft_jax.models.loading.safetensors_stream import Tensor, write_safetensors
from sft_jax.models.loading.unused import describe_unused, non_weights, unused_tensors
from sft_jax.models.lora import has_lora, merge_lora
from sft_jax.models.registry import Checkpoint, resolve_checkpoint
from sft_jax.models.scan import unscan_decoder
from sft_jax.state import ModelDef

# (our module path regex, HF module template, family or None for all). re.fullmatch on the module path.
# "llama" rules hold for every family with LLaMA's norm names; "gemma3" ones for Gemma 2 and 3.
_MODULE_RULES = (
    (r"embed", r"model.embed_tokens", None),
    (r"final_norm", r"model.norm", None),
    (r"lm_head", r"lm_head", None),
    (r"layers/(\d+)/attn/(q|k|v|o)", r"model.layers.\1.self_attn.\2_proj", None),
    (r"layers/(\d+)/attn/(q|k)_norm", r"model.layers.\1.self_attn.\2_norm", None),
    (r"layers/(\d+)/attn_norm", r"model.layers.\1.input_layernorm", None),
    (r"layers/(\d+)/mlp/(gate|up|down)", r"model.layers.\1.mlp.\2_proj", None),
    (r"layers/(\d+)/mlp_norm", r"model.layers.\1.post_attention_layernorm", "llama"),
    (r"layers/(\d+)/mlp_norm", r"model.layers.\1.pre_feedforward_layernorm", "gemma3"),
    (r"layers/(\d+)/post_attn_norm", r"model.layers.\1.post_attention_layernorm", "gemma3"),
    (r"layers/(\d+)/post_mlp_norm", r"model.layers.\1.post_feedforward_layernorm", "gemma3"),
)


def hf_name(path: str, family: str) -> tuple[str, bool]:
    """Our parameter path ("layers/0/attn/q/kernel") -> (HF tensor name, whether to transpose)."""
    module, leaf = path.rsplit("/", 1)
    norms = "gemma3" if family in ("gemma2", "gemma3") else "llama"
    for pattern, template, only in _MODULE_RULES:
        if only in (None, norms):
            match = re.fullmatch(pattern, module)
            if match:
                return match.expand(template) + (".bias" if leaf == "bias" else ".weight"), leaf == "kernel"
    raise KeyError(f"no Hugging Face name for parameter {path!r}")


_FUSED = re.compile(r"model\.layers\.(\d+)\.(self_attn\.qkv_proj|mlp\.gate_up_proj)\.weight")


def _fused_parts(config: DecoderConfig, fused: str) -> tuple[tuple[str, int], ...]:
    """(unfused projection, rows) of a Phi-3 fused weight, in the order transformers slices it."""
    if fused == "self_attn.qkv_proj":
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        return ("self_attn.q_proj", q), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv)
    return ("mlp.gate_proj", config.intermediate_size), ("mlp.up_proj", config.intermediate_size)


_PART = re.compile(r"model\.layers\.(\d+)\.(self_attn\.[qkv]_proj|mlp\.(?:gate|up)_proj)\.weight")


def fused_rows(config: DecoderConfig, name: str) -> tuple[str, tuple[int, int]] | None:
    """For Phi-3: (the fused tensor that holds the unfused HF tensor `name`, its rows there); else None."""
    match = _PART.fullmatch(name) if config.family == "phi3" else None
    if not match:
        return None
    fused = "self_attn.qkv_proj" if match.group(2).startswith("self_attn") else "mlp.gate_up_proj"
    start = 0
    for part, rows in _fused_parts(config, fused):
        if part == match.group(2):
            return f"model.layers.{match.group(1)}.{fused}.weight", (start, start + rows)
        start += rows
    raise AssertionError(name)


def split_fused(config: DecoderConfig, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Phi-3's fused `qkv_proj` / `gate_up_proj` weights split into LLaMA's q, k, v / gate, up (by rows)."""
    out = {}
    for name, value in weights.items():
        match = _FUSED.fullmatch(name)
        if not match:
            out[name] = value
            continue
        parts = _fused_parts(config, match.group(2))
        if value.shape[0] != sum(rows for _, rows in parts):
            out[name] = value  # left for the shape check to report
            continue
        for (part, _), chunk in zip(parts, np.split(value, np.cumsum([r for _, r in parts])[:-1]), strict=True):
            out[f"model.layers.{match.group(1)}.{part}.weight"] = chunk
    return out


# Where a multimodal checkpoint (Gemma3ForConditionalGeneration) keeps its language model: (stored prefix, the
# text model's own prefix), in published and transformers >= 4.52 layouts.
_TEXT_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                  ("model.language_model.", "model."))


def text_model_names(names) -> dict[str, str]:
    """{HF name of the text model: stored name} of a checkpoint's tensor `names`: a multimodal checkpoint's
    language model is read under its text-only names; every other name maps to itself."""
    out = {}
    for name in names:
        prefix = next(((p, q) for p, q in _TEXT_PREFIXES if name.startswith(p)), None)
        out[prefix[1] + name[len(prefix[0]):] if prefix else name] = name
    return out


def decoder_non_weights(config: DecoderConfig) -> tuple[str, ...]:
    """The patterns of checkpoint tensors that are not weights of a `config` decoder (`unused.NON_WEIGHTS`)."""
    return non_weights("decoder", config.family)


def tied_copy_differs(config: DecoderConfig, has_head: bool, rows) -> str | None:
    """A tied model's stored `lm_head.weight` is exempt from the unused check only as a copy of the embedding:
    `rows(name, k)` reads k leading rows of a tensor. Returns the error clause when the copy differs."""
    if not (config.tie_embeddings and has_head):
        return None
    k = 64
    if np.array_equal(rows("lm_head.weight", k), rows("model.embed_tokens.weight", k)):
        return None
    return ("lm_head.weight differs from model.embed_tokens.weight though config.json ties them "
            "(tie_word_embeddings): the config and the weights disagree")


def decoder_from_hf_weights(config: DecoderConfig, weights: dict[str, np.ndarray], *, source: str, ignore=(),
                            where: str = "the checkpoint") -> DecoderLM:
    """A `DecoderLM` filled with HF-named weights; names every missing or mis-shaped tensor on failure, and every
    tensor of `weights` left unread (of `where`, the weights file) that is neither a non-weight of the family
    (`unused.NON_WEIGHTS`, a tied model's copy of its embedding as `lm_head.weight`) nor matched by a regex of
    `ignore` (re.search). Phi-3's fused projections are split first (our model keeps LLaMA's separate q, k, v,
    gate, up); a multimodal checkpoint's language model is read under its text names."""
    stored = text_model_names(weights)
    weights = {name: weights[s] for name, s in stored.items()}
    if config.family == "phi3":
        weights = split_fused(config, weights)
    abstract = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    missing, mismatched, filled, used = [], [], [], set()
    for path, variable in nnx.to_flat_state(abstract_state):
        name, transpose = hf_name("/".join(str(p) for p in path), config.family)
        if name not in weights:
            missing.append(name)
            continue
        used.add(name)
        value = weights[name].T if transpose else weights[name]
        if value.shape != tuple(variable.shape):
            mismatched.append(f"{name}: checkpoint {weights[name].shape}, expected {tuple(variable.shape)}"
                              f"{' (transposed)' if transpose else ''}")
            continue
        filled.append((path, variable.replace(value=jnp.asarray(value, jnp.float32))))
    tied = tied_copy_differs(config, {"lm_head.weight", "model.embed_tokens.weight"} <= weights.keys(),
                             lambda name, k: weights[name][:k])
    if config.tie_embeddings:  # a copy of the embedding, or reported as differing from it
        used.add("lm_head.weight")
    unused = [stored.get(n, n) for n in unused_tensors(weights, used, allow=decoder_non_weights(config),
                                                       ignore=ignore)]
    if missing or mismatched or unused or tied:
        problems = ([f"missing keys: {', '.join(missing)}"] if missing else []) + (
            [f"shape mismatches: {'; '.join(mismatched)}"] if mismatched else []) + (
            [tied] if tied else []) + ([describe_unused(unused, where)] if unused else [])
        raise ValueError(f"{source}: cannot load {config.family} weights; {'. '.join(problems)}")
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def read_checkpoint(checkpoint: Checkpoint) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(HF config dict, HF-named float32 weights) of a GGUF file or a HF directory."""
    if checkpoint.kind == "gguf":
        return read_gguf(checkpoint.path)
    config_path = checkpoint.path / "config.json"
    return read_json_object(config_path), read_weights(checkpoint.path)


def load_decoder(name_or_path: str | Checkpoint, *, dtype: Any = jnp.float32, ignore=()
                 ) -> tuple[DecoderLM, DecoderConfig]:
    """Loads a decoder LM from a short name, a .gguf path or a HF directory (LlamaForCausalLM,
    MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Phi3ForCausalLM, Gemma2ForCausalLM,
    Gemma3ForCausalLM, and the language model of Gemma3ForConditionalGeneration). Parameters are float32;
    `dtype` is the compute dtype. A checkpoint tensor the model does not use is an error unless it is a
    non-weight of the family (`unused.NON_WEIGHTS`) or a regex of `ignore` (re.search) matches it."""
    checkpoint = name_or_path if isinstance(name_or_path, Checkpoint) else resolve_checkpoint(str(name_or_path))
    hf_config, weights = read_checkpoint(checkpoint)
    config = DecoderConfig.from_hf(hf_config, dtype=dtype)
    where = checkpoint.path.name if checkpoint.kind == "gguf" else weights_file(checkpoint.path).name
    return decoder_from_hf_weights(config, weights, source=str(checkpoint.path), ignore=ignore, where=where), config


def load_lm_tokenizer(name_or_path: str | Checkpoint, tokenizer: str = ""):
    """The model's tokenizer (with its chat template, where it has one), via transformers, or the one
    `tokenizer` names instead (`config.tokenizer`); an unusable one is an error (`tokenizers.load`)."""
    checkpoint = name_or_path if isinstance(name_or_path, Checkpoint) else resolve_checkpoint(str(name_or_path))
    tokenizer = tokenizers.load(checkpoint, tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out; any id will do
    return tokenizer


def _hf_tensor(path: str, value, family: str) -> Tensor:
    """Our parameter `path` as its HF tensor, converted to float32 (and transposed) only when written; a
    `jax.Array` stays on its devices, in its sharding (`write_safetensors` writes it from its shards)."""
    name, transpose = hf_name(path, family)
    shape = tuple(value.shape)[::-1] if transpose else tuple(value.shape)

    def produce():
        x = value.astype(np.float32)
        return x.T if transpose else x

    return Tensor(name, shape, np.float32, produce)


def hf_tensors(config: DecoderConfig, params: dict[str, Any]) -> list[Tensor]:
    """{our path: array} of a plain (unscanned, merged) decoder as the HF tensors of its safetensors file; for
    Phi-3, q/k/v and gate/up fused again (the inverse of `split_fused`), each in the place of its first part."""
    tensors = [_hf_tensor(path, value, config.family) for path, value in params.items()]
    if config.family != "phi3":
        return tensors
    by_name = {t.name: t for t in tensors}
    out = []
    for t in tensors:
        place = fused_rows(config, t.name)
        if place is None:
            out.append(t)
        elif place[1][0] == 0:  # the first part: the fused tensor goes here
            match = _FUSED.fullmatch(place[0])
            parts = [by_name[f"model.layers.{match.group(1)}.{part}.weight"]
                     for part, _ in _fused_parts(config, match.group(2))]
            out.append(Tensor(place[0], (sum(p.shape[0] for p in parts), *parts[0].shape[1:]), np.float32,
                              lambda parts=parts: jnp.concatenate([p.produce() for p in parts], axis=0)))
    return out


def export_hf(model: DecoderLM, out_dir: str | os.PathLike, *, tokenizer=None,
              params: dict[str, Any] | None = None) -> pathlib.Path:
    """Writes a HF directory (config.json, model.safetensors, tokenizer files) that
    `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Args:
      model: the module (its config gives the architecture).
      params: flat {our path: array} to export instead of the module's own values (e.g. a
        fine-tuned train state's params).

    LoRA adapters (in the module or in `params`) are merged into their kernels first: the export is a
    plain model of the base architecture. `sft_jax.models.loading.peft.save_adapters` writes the adapters alone.
    The weights go out one tensor at a time from where they are: a model sharded over the devices of several
    processes is written by all of them (each calls this; `out_dir` on a file system they share), each writing
    its own shards; process 0 writes the other files.
    """
    if params is not None and has_lora(params):
        if not has_lora(model):
            raise ValueError("export_hf: params hold LoRA adapters but the model has none; pass the LoRA model")
        # The scale (alpha / r) of each adapter lives in its module: merge through the module.
        model, params = ModelDef.split(model)[0].merge(params), None
    if getattr(model, "segments", None):  # scanned: per-layer parameters again, under their HF names
        model = unscan_decoder(nnx.clone(model))
    if has_lora(model):
        model = merge_lora(model)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    if params is None:
        params = {"/".join(str(p) for p in path): v.value
                  for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    written = write_safetensors(out / "model.safetensors", hf_tensors(config, params))
    if jax.process_count() > 1:
        print(f"process {jax.process_index()} of {jax.process_count()}: wrote {written} bytes of weights (its "
              "shards)", file=sys.stderr)
    if jax.process_index() == 0:
        (out / "config.json").write_text(json.dumps(config.to_hf(), indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
    return out
