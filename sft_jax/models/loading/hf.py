"""Load Hugging Face BERT-family checkpoints (safetensors, or pytorch_model.bin via torch).

HF names are mapped onto ours by rules on the module path plus a leaf rename, so one table
serves `BertModel` / `RobertaModel` / `XLMRobertaModel` (no prefix; sentence-transformers),
`BertFor*` ("bert."), `RobertaFor*` / `XLMRobertaFor*` ("roberta.") and exports that use "model.".
ModernBERT has its own table (fused Wqkv / Wi split into our query, key, value / gate, up); `load_encoder`
picks the family from config.json's `model_type`.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file

from sft_jax.models.bert import MODEL_TYPES as BERT_MODEL_TYPES
from sft_jax.models.bert import BertConfig, BertEncoder
from sft_jax.models.loading.files import DamagedFile, damaged_weights, read_json_object
from sft_jax.models.loading.unused import describe_unused, non_weights, unused_tensors
from sft_jax.models.modernbert import ModernBertConfig, ModernBertEncoder

# Prefixes that wrap the encoder in published checkpoints, tried in this order.
_PREFIXES = ("", "bert.", "roberta.", "model.")

# (our module path regex, HF module name template); matched with re.fullmatch.
_MODULE_RULES = (
    (r"embeddings/(word|position|token_type)_embeddings", r"embeddings.\1_embeddings"),
    (r"embeddings/norm", r"embeddings.LayerNorm"),
    (
        r"layers/(\d+)/attention/(query|key|value)",
        r"encoder.layer.\1.attention.self.\2",
    ),
    (r"layers/(\d+)/attention/out", r"encoder.layer.\1.attention.output.dense"),
    (r"layers/(\d+)/attention_norm", r"encoder.layer.\1.attention.output.LayerNorm"),
    (r"layers/(\d+)/mlp/up", r"encoder.layer.\1.intermediate.dense"),
    (r"layers/(\d+)/mlp/down", r"encoder.layer.\1.output.dense"),
    (r"layers/(\d+)/mlp_norm", r"encoder.layer.\1.output.LayerNorm"),
)

# Our leaf name -> HF leaf names, newest first (gamma/beta are the pre-2020 LayerNorm names).
_LEAF_NAMES = {
    "embedding": ("weight",),
    "kernel": ("weight",),
    "scale": ("weight", "gamma"),
    "bias": ("bias", "beta"),
}


def weights_file(model_dir: str | os.PathLike) -> pathlib.Path:
    """The file `read_weights` reads first: `model.safetensors`, the shards' index, or `pytorch_model.bin`."""
    model_dir = pathlib.Path(model_dir)
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        if (model_dir / name).is_file():
            return model_dir / name
    return model_dir


def read_weights(model_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads every tensor of a HF checkpoint directory into numpy (floating tensors as float32).

    Looks for `model.safetensors`, a sharded `model.safetensors.index.json`, then
    `pytorch_model.bin` (which needs torch).
    """
    model_dir = pathlib.Path(model_dir)
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    torch_bin = model_dir / "pytorch_model.bin"
    if single.is_file():
        weights = _load_safetensors(single)
    elif index.is_file():
        shards = shard_files(index)
        weights = {}
        for shard in shards:
            weights.update(_load_safetensors(model_dir / shard))
    elif torch_bin.is_file():
        weights = _load_torch_bin(torch_bin)
    else:
        raise FileNotFoundError(
            f"{model_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
        )
    return {
        k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v
        for k, v in weights.items()
    }


def shard_files(index: pathlib.Path) -> list[str]:
    """The shard file names a `model.safetensors.index.json` maps its tensors to."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise DamagedFile(f"{index}: no 'weight_map' of tensor names to shard files")
    return sorted(set(weight_map.values()))


def _load_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (listed by the shard index)")
    try:
        try:
            return load_file(path)
        except TypeError:
            # numpy has no bfloat16; go through jax, which does, and upcast once here.
            from safetensors.flax import load_file as load_file_jax

            return {
                k: np.asarray(v.astype(jnp.float32)) for k, v in load_file_jax(path).items()
            }
    except (SafetensorError, OSError, TypeError, ValueError) as e:
        raise damaged_weights(path, e, "safetensors") from None


def _load_torch_bin(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{path} is a PyTorch checkpoint and torch is not installed; install torch or "
            "convert the checkpoint to model.safetensors"
        ) from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:  # zip / pickle readers
        raise damaged_weights(path, e, "PyTorch checkpoint") from None
    return {
        k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state.items()
    }


# ModernBERT: (our module path regex, HF module name template, (chunk, of n) of HF's fused tensor or None).
_MODERNBERT_PREFIXES = ("", "model.")
_MODERNBERT_RULES = (
    (r"embeddings/word_embeddings", r"embeddings.tok_embeddings", None),
    (r"embeddings/norm", r"embeddings.norm", None),
    (r"layers/(\d+)/attention_norm", r"layers.\1.attn_norm", None),
    (r"layers/(\d+)/attention/query", r"layers.\1.attn.Wqkv", (0, 3)),
    (r"layers/(\d+)/attention/key", r"layers.\1.attn.Wqkv", (1, 3)),
    (r"layers/(\d+)/attention/value", r"layers.\1.attn.Wqkv", (2, 3)),
    (r"layers/(\d+)/attention/out", r"layers.\1.attn.Wo", None),
    (r"layers/(\d+)/mlp_norm", r"layers.\1.mlp_norm", None),
    (r"layers/(\d+)/mlp/gate", r"layers.\1.mlp.Wi", (0, 2)),  # Wi = [gate (activated); up]
    (r"layers/(\d+)/mlp/up", r"layers.\1.mlp.Wi", (1, 2)),
    (r"layers/(\d+)/mlp/down", r"layers.\1.mlp.Wo", None),
    (r"final_norm", r"final_norm", None),
)


def _hf_module(path: str, rules=None) -> tuple[str, tuple[int, int] | None]:
    for pattern, template, *chunk in rules or _MODULE_RULES:
        match = re.fullmatch(pattern, path)
        if match:
            return match.expand(template), (chunk[0] if chunk else None)
    raise KeyError(f"no Hugging Face name rule for parameter {path!r}")


def _detect_prefix(weights: dict[str, Any], prefixes=_PREFIXES, probe="embeddings.word_embeddings.weight") -> str:
    for prefix in prefixes:
        if f"{prefix}{probe}" in weights:
            return prefix
    return ""  # Nothing matches; the missing-key report below names what was expected.


def _fill_state(weights: dict[str, np.ndarray], abstract_state: nnx.State, *, prefix: str, rules, source: str,
                family: str, allow: tuple[str, ...], ignore=(), where: str = "the checkpoint") -> nnx.State:
    """`abstract_state` filled from HF-named `weights` by `rules`; one ValueError names every problem: tensors
    missing or mis-shaped, and tensors of `weights` left unread that neither `allow` nor `ignore` matches."""
    missing, mismatched, filled, used = [], [], [], set()
    for path, variable in nnx.to_flat_state(abstract_state):
        *module, leaf = (str(p) for p in path)
        hf_module, chunk = _hf_module("/".join(module), rules)
        names = [f"{prefix}{hf_module}.{name}" for name in _LEAF_NAMES[leaf]]
        name = next((n for n in names if n in weights), None)
        if name is None:
            missing.append(names[0])
            continue
        used.add(name)
        value = weights[name]
        if chunk is not None and value.shape[0] % chunk[1] == 0:  # a fused tensor: rows [k*n/N, (k+1)*n/N)
            rows = value.shape[0] // chunk[1]
            value = value[chunk[0] * rows:(chunk[0] + 1) * rows]
        if leaf == "kernel":
            value = value.T  # torch Linear stores [out, in]
        if value.shape != tuple(variable.shape):
            part = f" (part {chunk[0] + 1} of {chunk[1]})" if chunk else ""
            mismatched.append(
                f"{name}{part}: checkpoint {tuple(weights[name].shape)}, expected "
                f"{tuple(variable.shape)}{' (transposed)' if leaf == 'kernel' else ''}"
            )
            continue
        filled.append((path, variable.replace(value=jnp.asarray(value, jnp.float32))))
    unused = unused_tensors(weights, used, allow=allow, ignore=ignore)
    if missing or mismatched or unused:
        problems = []
        if missing:
            problems.append(f"missing keys: {', '.join(missing)}")
        if mismatched:
            problems.append(f"shape mismatches: {'; '.join(mismatched)}")
        if unused:
            problems.append(describe_unused(unused, where))
        raise ValueError(f"{source}: cannot load {family} weights; {'. '.join(problems)}")
    return nnx.from_flat_state(filled)


def bert_state_from_hf(
    weights: dict[str, np.ndarray],
    abstract_state: nnx.State,
    *,
    source: str = "checkpoint",
    ignore=(),
    where: str = "the checkpoint",
) -> nnx.State:
    """Fills `abstract_state` (from `nnx.eval_shape`) with HF-named `weights`.

    Linear weights are transposed to [in, out]. The pooler, index buffers and pre-training heads are not
    weights of the encoder (`unused.NON_WEIGHTS["bert"]`); any other tensor left unread is an error unless a
    regex of `ignore` matches it (a task head of another task, say).

    Raises:
      ValueError: naming every expected key that is missing or whose shape does not match, and the tensors
        (of `where`, the weights file) not used.
    """
    return _fill_state(weights, abstract_state, prefix=_detect_prefix(weights), rules=_MODULE_RULES,
                       source=source, family="BERT-family", allow=non_weights("bert"), ignore=ignore, where=where)


def modernbert_state_from_hf(
    weights: dict[str, np.ndarray], abstract_state: nnx.State, *, source: str = "checkpoint", ignore=(),
    where: str = "the checkpoint",
) -> nnx.State:
    """Fills a `ModernBertEncoder`'s `abstract_state` with HF-named `weights` (`ModernBertModel`, or
    "model."-prefixed `ModernBertFor*`): the fused Wqkv and Wi are split; the MLM head is not a weight of the
    encoder (`unused.NON_WEIGHTS["modernbert"]`), any other tensor left unread an error unless `ignore` matches.

    Raises:
      ValueError: naming every expected key that is missing or whose shape does not match, and the unused ones.
    """
    prefix = _detect_prefix(weights, _MODERNBERT_PREFIXES, "embeddings.tok_embeddings.weight")
    return _fill_state(weights, abstract_state, prefix=prefix, rules=_MODERNBERT_RULES, source=source,
                       family="ModernBERT", allow=non_weights("modernbert"), ignore=ignore, where=where)


def _read_config(model_dir: str | os.PathLike) -> tuple[pathlib.Path, dict]:
    config_path = pathlib.Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json")
    return config_path, read_json_object(config_path)


def load_bert_config(model_dir: str | os.PathLike, *, dtype: Any = jnp.float32) -> BertConfig:
    """The `BertConfig` of a Hugging Face BERT, RoBERTa or XLM-RoBERTa checkpoint directory (its config.json).

    Raises:
      ValueError: one line naming the file and the unsupported key and value (e.g. `model_type 'gpt2'`).
    """
    return _config_from_hf(BertConfig, model_dir, dtype)


def load_bert(
    model_dir: str | os.PathLike, *, dtype: Any = jnp.float32, ignore=()
) -> tuple[BertEncoder, BertConfig]:
    """Loads a Hugging Face BERT, RoBERTa or XLM-RoBERTa checkpoint directory as a `BertEncoder`.

    Args:
      model_dir: a directory with `config.json` and weights (see `read_weights`). Use
        `sft_jax.models.registry.resolve_model_dir` to turn a short name or hub id into one.
      dtype: compute dtype of the matmuls; parameters are float32 regardless.
      ignore: regexes (re.search) of checkpoint tensors to drop unread (`config.ignore_weights`); any other
        tensor the encoder does not use, beyond `unused.NON_WEIGHTS["bert"]`, is an error.

    Returns:
      The module holding the checkpoint's weights, and its config.
    """
    config = load_bert_config(model_dir, dtype=dtype)
    return _encoder_from_hf(BertEncoder, config, bert_state_from_hf, model_dir, ignore), config


def load_modernbert_config(model_dir: str | os.PathLike, *, dtype: Any = jnp.float32) -> ModernBertConfig:
    """The `ModernBertConfig` of a Hugging Face ModernBERT checkpoint directory (its config.json).

    Raises:
      ValueError: one line naming the file and the unsupported key and value.
    """
    return _config_from_hf(ModernBertConfig, model_dir, dtype)


def load_modernbert(
    model_dir: str | os.PathLike, *, dtype: Any = jnp.float32, ignore=()
) -> tuple[ModernBertEncoder, ModernBertConfig]:
    """Loads a Hugging Face ModernBERT checkpoint directory as a `ModernBertEncoder` (see `load_bert`)."""
    config = load_modernbert_config(model_dir, dtype=dtype)
    return _encoder_from_hf(ModernBertEncoder, config, modernbert_state_from_hf, model_dir, ignore), config


def _config_from_hf(config_cls, model_dir: str | os.PathLike, dtype: Any):
    """`config_cls.from_hf` of the directory's config.json; its errors name the file."""
    config_path, hf_config = _read_config(model_dir)
    try:
        return config_cls.from_hf(hf_config, dtype=dtype)
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from None


def _encoder_from_hf(module_cls, config, state_from_hf, model_dir: str | os.PathLike, ignore=()):
    """`module_cls(config)` holding the directory's weights, mapped by `state_from_hf`."""
    weights = read_weights(model_dir)
    # Shapes only: the random init would be thrown away, and for big models it is not free.
    abstract = nnx.eval_shape(lambda: module_cls(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    return nnx.merge(graphdef, state_from_hf(weights, abstract_state, source=str(model_dir), ignore=ignore,
                                             where=weights_file(model_dir).name))


ENCODER_MODEL_TYPES = (*BERT_MODEL_TYPES, "modernbert")


def load_encoder_config(
    model_dir: str | os.PathLike, *, dtype: Any = jnp.float32
) -> BertConfig | ModernBertConfig:
    """The config of any supported encoder checkpoint, by its `model_type` (none: BERT).

    Raises:
      ValueError: one line naming config.json and an unsupported `model_type` or option.
    """
    config_path, hf_config = _read_config(model_dir)
    model_type = hf_config.get("model_type", "bert")
    if model_type == "modernbert":
        return load_modernbert_config(model_dir, dtype=dtype)
    if model_type not in BERT_MODEL_TYPES:
        raise ValueError(f"{config_path}: model_type {model_type!r} is not a supported encoder; "
                         f"use one of {list(ENCODER_MODEL_TYPES)}")
    return load_bert_config(model_dir, dtype=dtype)


def load_encoder(
    model_dir: str | os.PathLike, *, dtype: Any = jnp.float32, ignore=()
) -> tuple[BertEncoder | ModernBertEncoder, BertConfig | ModernBertConfig]:
    """Loads a BERT, RoBERTa, XLM-RoBERTa or ModernBERT checkpoint directory, by its `model_type`; `ignore`
    as in `load_bert`.

    Returns the encoder (called as `encoder(input_ids, attention_mask, dropout_rng=...)`) and its config
    (`hidden_size`, `num_hidden_layers`, `max_length`, `position_offset`, `pad_token_id`).
    """
    if isinstance(load_encoder_config(model_dir), ModernBertConfig):
        return load_modernbert(model_dir, dtype=dtype, ignore=ignore)
    return load_bert(model_dir, dtype=dtype, ignore=ignore)


def load_tokenizer(model_dir: str | os.PathLike, tokenizer: str = "") -> Any:
    """The checkpoint's tokenizer, via `transformers.AutoTokenizer`, or the one `tokenizer` names instead
    (`config.tokenizer`: a directory with tokenizer files, a short model name, a .gguf file or a hub id).

    Raises:
      ValueError: one line naming the directory when it has no usable tokenizer (see `tokenizers.load`).
    """
    from sft_jax.models.loading import tokenizers  # Heavy import (transformers), only paid by callers that tokenize.

    return tokenizers.load(model_dir, tokenizer)
