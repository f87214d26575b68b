"""Read a llama.cpp GGUF file (llama, qwen2, qwen3, gemma3) as a Hugging Face config dict plus HF-named float32
weights.

Quantized tensors are dequantized with the `gguf` package. Two conversions of llama.cpp's
`convert_hf_to_gguf.py` are undone here, so the result is what the original HF checkpoint held:
- LLaMA q/k projection rows are permuted (interleaved rotary pairs); `_unpermute` restores HF's
  half-split layout.
- Gemma RMSNorm weights are stored as `1 + w` (llama.cpp computes `x * w`); we subtract 1.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
from typing import Any

import numpy as np

from sft_jax.models.loading.files import DamagedFile, damaged_weights

# GGUF tensor name (after "blk.N.") -> HF module name (after "model.layers.N.").
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# The norm before the MLP: LLaMA calls it post_attention_layernorm, Gemma pre_feedforward_layernorm.
_FFN_NORM = {"llama": "post_attention_layernorm", "gemma3": "pre_feedforward_layernorm"}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: rows (head, pair, 2) -> (head, 2, pair)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_config_from_gguf(reader) -> dict[str, Any]:
    """The HF `config.json` dict implied by the GGUF metadata (llama, qwen2, qwen3 and gemma3 architectures)."""
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2", "qwen3", "gemma3"):
        raise ValueError(f"GGUF architecture {arch!r} is not supported (llama, qwen2, qwen3, gemma3)")

    def get(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = get("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    cfg = dict(
        vocab_size=int(vocab), hidden_size=hidden, num_hidden_layers=int(get("block_count")),
        num_attention_heads=heads, num_key_value_heads=int(get("attention.head_count_kv", heads)),
        intermediate_size=int(get("feed_forward_length")),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(get("context_length", 2048)),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
    )
    if arch in ("qwen2", "qwen3"):
        name = "Qwen2ForCausalLM" if arch == "qwen2" else "Qwen3ForCausalLM"
        return dict(cfg, model_type=arch, architectures=[name], hidden_act="silu",
                    head_dim=int(get("attention.key_length", hidden // heads)),
                    rope_theta=float(get("rope.freq_base", 10000.0)))
    if arch == "llama":
        head_dim = int(get("rope.dimension_count", hidden // heads))
        return dict(cfg, model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
                    head_dim=head_dim, rope_theta=float(get("rope.freq_base", 10000.0)))
    head_dim = int(get("attention.key_length", hidden // heads))
    # Not stored in GGUF: Gemma 3's local RoPE base (10k), the 5:1 sliding pattern, and the query scale
    # (head_dim for the 270M/1B/4B/12B models) take their published values, as transformers does.
    return dict(cfg, model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
                hidden_activation="gelu_pytorch_tanh", head_dim=head_dim, query_pre_attn_scalar=head_dim,
                sliding_window=int(get("attention.sliding_window")), sliding_window_pattern=6,
                rope_theta=float(get("rope.freq_base", 1e6)), rope_local_base_freq=10000.0)


def open_gguf(path: str | os.PathLike):
    """A `gguf.GGUFReader` of `path`; a file that is not a whole GGUF (empty, truncated, another format) is
    one DamagedFile naming it: the reader's own errors say only what went wrong inside numpy."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 (ValueError, IndexError, struct.error, OSError ... of the parser)
        raise damaged_weights(path, e, "GGUF") from None
    size = os.path.getsize(path)
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise DamagedFile(f"{path}: not a readable GGUF file ({size} bytes, its tensors need {end}); "
                          "is it truncated? download it again")
    return reader


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(HF config dict, {HF tensor name: float32 array}) of a GGUF file."""
    import gguf

    reader = open_gguf(path)
    config = hf_config_from_gguf(reader)
    family = "gemma3" if config["model_type"] == "gemma3_text" else "llama"
    permuted = config["model_type"] == "llama"  # llama.cpp permutes q/k rows of LLaMA only
    weights = {}
    for tensor in reader.tensors:
        match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", tensor.name)
        if match:
            layer, name, leaf = match.groups()
            module = _FFN_NORM[family] if name == "ffn_norm" else _BLOCK_NAMES.get(name)
            if module is None:
                raise ValueError(f"{path}: unexpected GGUF tensor {tensor.name}")
            hf_name = f"model.layers.{layer}.{module}.{leaf}"
        else:
            top = tensor.name.removesuffix(".weight")
            if top not in _TOP_NAMES:
                if tensor.name.startswith("rope_"):
                    continue  # precomputed rope tables of some converters; we compute RoPE ourselves
                raise ValueError(f"{path}: unexpected GGUF tensor {tensor.name}")
            hf_name = _TOP_NAMES[top] + ".weight"
        # numpy shape is GGML's reversed: [out, in] for matrices, like torch.nn.Linear.weight.
        value = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        value = value.reshape([int(d) for d in reversed(tensor.shape)])
        if permuted and match and name == "attn_q":
            value = _unpermute(value, config["num_attention_heads"])
        elif permuted and match and name == "attn_k":
            value = _unpermute(value, config["num_key_value_heads"])
        if family == "gemma3" and hf_name.endswith("norm.weight"):
            value = value - 1.0
        weights[hf_name] = value
    return config, weights


def load_gguf_tokenizer(path: str | os.PathLike, cache: str | os.PathLike | None = None):
    """A transformers fast tokenizer built from the GGUF's vocabulary, merges and chat template.

    Building it from GGUF metadata takes seconds (15 s for Gemma's 262k vocabulary), so the result is
    saved under `cache` (default: `registry.cache_dir()/tokenizers`), keyed by the file's size and mtime.
    """
    import hashlib

    from transformers import AutoTokenizer

    from sft_jax.models.registry import cache_dir

    path = pathlib.Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    saved = pathlib.Path(cache or cache_dir() / "tokenizers") / f"{path.stem}-{key}"
    if (saved / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(saved))
    open_gguf(path)  # a damaged file is named as such, not as a tokenizer transformers cannot build
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tmp = saved.with_name(saved.name + f".tmp{os.getpid()}")
    tokenizer.save_pretrained(str(tmp))
    try:
        os.replace(tmp, saved)  # atomic publish; a concurrent writer's identical copy may win
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer
