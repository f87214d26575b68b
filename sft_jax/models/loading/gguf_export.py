"""Write a decoder LM as a llama.cpp GGUF file (float32, float16, bfloat16 or Q8_0), tokenizer and chat template
in its metadata; the inverse of `gguf.read_gguf`.

What llama.cpp's `convert_hf_to_gguf.py` does to HF weights is done here to ours, so llama.cpp, transformers'
GGUF loader and `gguf.read_gguf` read the file back as the model:
- LLaMA q/k projection rows are permuted into interleaved rotary pairs (`_permute`).
- Gemma RMSNorm weights are stored as `1 + w` (llama.cpp computes `x * w`).
- Matrices take the chosen type; 1-D tensors (norms, biases) stay float32, as llama.cpp keeps them; a matrix
  whose rows are not a multiple of Q8_0's block of 32 falls back to float16.

Tensors are converted and written one at a time (the header is written first from the shapes alone), so the
file never needs a second whole copy of the weights in host memory.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx

from sft_jax.models.decoder import FULL, SLIDING, DecoderConfig, DecoderLM
from sft_jax.models.loading.gguf import _BLOCK_NAMES, _TOP_NAMES
from sft_jax.models.loading.gguf_vocab import tokenizer_metadata
from sft_jax.models.loading.lm import hf_name
from sft_jax.models.lora import has_lora, merge_lora
from sft_jax.models.scan import unscan_decoder

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# sft_jax family -> GGUF architecture; the families both llama.cpp and transformers' GGUF loader read.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3"}

_TO_GGUF_BLOCK = {hf: gguf for gguf, hf in _BLOCK_NAMES.items()}
_TO_GGUF_TOP = {hf: gguf for gguf, hf in _TOP_NAMES.items()}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `permute`: rows (head, 2, pair) -> (head, pair, 2); `gguf._unpermute` undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensor_name(hf: str, family: str) -> str:
    """HF tensor name -> GGUF tensor name ("model.layers.3.mlp.up_proj.weight" -> "blk.3.ffn_up.weight")."""
    module, leaf = hf.rsplit(".", 1)
    if module.startswith("model.layers."):
        layer, rest = module[len("model.layers."):].split(".", 1)
        ffn_norm = "pre_feedforward_layernorm" if family == "gemma3" else "post_attention_layernorm"
        name = "ffn_norm" if rest == ffn_norm else _TO_GGUF_BLOCK.get(rest)
        if name is None:
            raise KeyError(f"no GGUF name for {hf}")
        return f"blk.{layer}.{name}.{leaf}"
    return f"{_TO_GGUF_TOP[module]}.{leaf}"


def _check_expressible(config: DecoderConfig) -> str:
    """The GGUF architecture of `config`; a ValueError line for what its GGUF metadata cannot say."""
    family = config.family
    if family not in ARCHITECTURES:
        raise ValueError(f"GGUF export of {family} models is not supported (only {', '.join(ARCHITECTURES)})")
    problems = []
    if config.rope_type != "default":
        problems.append(f"RoPE scaling {config.rope_type!r}")
    if config.rotary_dim not in (None, config.head_dim):
        problems.append("partial rotary dimensions")
    if family == "gemma3":
        pattern = tuple(SLIDING if (i + 1) % 6 else FULL for i in range(config.num_layers))
        # Readers assume Gemma 3's published 5:1 sliding pattern, local RoPE base and query scale.
        if tuple(config.layer_types) != pattern:
            problems.append("a sliding/global layer pattern other than Gemma 3's 5 sliding : 1 global")
        if config.rope_local_theta != 10000.0:
            problems.append(f"local RoPE base {config.rope_local_theta} (readers assume 10000)")
        if (config.query_pre_attn_scalar or config.head_dim) != config.head_dim:
            problems.append("query_pre_attn_scalar != head_dim")
    else:
        if SLIDING in config.layer_types:
            problems.append("sliding-window layers")
        layout = (config.qkv_bias, config.o_bias, config.mlp_bias, config.qk_norm)
        expected = {"llama": (False, False, False, False), "qwen2": (True, False, False, False),
                    "qwen3": (False, False, False, True)}[family]
        if layout != expected:
            problems.append(f"(qkv_bias, o_bias, mlp_bias, qk_norm) = {layout}")
    if problems:
        raise ValueError(f"GGUF export: this {family} model has {'; '.join(problems)}, which GGUF metadata cannot "
                         "express")
    return ARCHITECTURES[family]


def _architecture_metadata(config: DecoderConfig, arch: str) -> dict[str, Any]:
    """{key after "<arch>.": value}, as convert_hf_to_gguf.py writes them."""
    meta = {
        "vocab_size": config.vocab_size, "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size, "block_count": config.num_layers,
        "feed_forward_length": config.intermediate_size, "attention.head_count": config.num_heads,
        "attention.head_count_kv": config.num_kv_heads, "attention.key_length": config.head_dim,
        "attention.value_length": config.head_dim, "rope.freq_base": float(config.rope_theta),
        "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
    }
    if arch == "llama":
        meta["rope.dimension_count"] = config.head_dim
    if arch == "gemma3":
        meta["attention.sliding_window"] = config.sliding_window
    return meta


def _tensor_type(outtype: str, shape: tuple[int, ...]):
    import gguf

    q = gguf.GGMLQuantizationType
    if len(shape) < 2 or outtype == "f32":
        return q.F32
    if outtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[q.Q8_0][0]:
        return q.F16
    return {"f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0}[outtype]


def _encode(value: np.ndarray, qtype) -> np.ndarray:
    """`value` (float32) in GGML type `qtype`, as the bytes the file holds (float32/float16 as themselves)."""
    import gguf

    out = gguf.quants.quantize(value, qtype)
    return out if out.dtype in (np.float32, np.float16) else out.view(np.uint8)


def _plain_model(model: DecoderLM) -> DecoderLM:
    if getattr(model, "segments", None):  # scanned: per-layer parameters again, under their HF names
        model = unscan_decoder(nnx.clone(model))
    return merge_lora(model) if has_lora(model) else model


def _tensors(model: DecoderLM) -> list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
    """(GGUF name, numpy shape, a function giving its float32 value) of every weight, in llama.cpp's order
    (embedding, blocks, final norm, head)."""
    config = model.config
    entries = []
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        hf, transpose = hf_name("/".join(str(p) for p in path), config.family)
        name = gguf_tensor_name(hf, config.family)
        shape = tuple(variable.value.shape)[::-1] if transpose else tuple(variable.value.shape)

        def value(v=variable, transpose=transpose, name=name, hf=hf):
            w = np.asarray(jax.device_get(v.value), np.float32)
            w = np.ascontiguousarray(w.T) if transpose else w
            if config.family == "llama" and name.endswith(".attn_q.weight"):
                w = _permute(w, config.num_heads)
            elif config.family == "llama" and name.endswith(".attn_k.weight"):
                w = _permute(w, config.num_kv_heads)
            if config.gemma and hf.endswith("norm.weight"):
                w = w + 1.0
            return w

        entries.append((name, shape, value))

    def order(entry):
        name = entry[0]
        if name.startswith("blk."):
            return (1, int(name.split(".")[1]), name)
        return ({"token_embd.weight": 0, "output_norm.weight": 2}.get(name, 3), 0, name)

    return sorted(entries, key=order)


def _add(writer, key: str, value: Any) -> None:
    import gguf

    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif key.endswith("token_type"):
        writer.add_array(key, value)  # int32
    elif key.endswith("scores"):
        writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.FLOAT32)
    else:
        writer.add_array(key, value)


def export_gguf(model: DecoderLM, tokenizer, out_path: str | os.PathLike, outtype: str = "f16", *,
                name: str | None = None) -> str:
    """Writes `model` (LoRA adapters merged, scanned layers unscanned) with `tokenizer`'s vocabulary and chat
    template as a GGUF file at `out_path`; returns the path.

    Args:
      outtype: "f32", "f16", "bf16" or "q8_0": the type of the matrices (1-D tensors stay float32).
      name: `general.name` (default: the file's stem).
    """
    import gguf

    if outtype not in OUTTYPES:
        raise ValueError(f"GGUF export: outtype {outtype!r} is not supported (one of {', '.join(OUTTYPES)})")
    model = _plain_model(model)
    config = model.config
    arch = _check_expressible(config)
    vocab = tokenizer_metadata(tokenizer, config.vocab_size, config.family)
    out = pathlib.Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(name or out.stem)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value in _architecture_metadata(config, arch).items():
            _add(writer, f"{arch}.{key}", value)
        for key, value in vocab.items():
            _add(writer, f"tokenizer.{key}", value)
        tensors = _tensors(model)
        for tensor_name, shape, _ in tensors:
            qtype = _tensor_type(outtype, shape)
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            nbytes = int(np.prod(shape[:-1])) * shape[-1] // block * size
            byte_shape = (*shape[:-1], shape[-1] // block * size)
            plain = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}
            if qtype in plain:
                writer.add_tensor_info(tensor_name, shape, np.dtype(plain[qtype]), nbytes)
            else:
                writer.add_tensor_info(tensor_name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, shape, value in _iter_values(tensors):
            writer.write_tensor_data(_encode(value, _tensor_type(outtype, shape)))
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return str(out)


def _iter_values(tensors) -> Iterator[tuple[str, tuple[int, ...], np.ndarray]]:
    for tensor_name, shape, value in tensors:
        yield tensor_name, shape, value()
