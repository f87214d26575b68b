"""Decoder-only language models in Flax NNX: LLaMA, Mistral, Qwen2/2.5, Qwen3, Phi-3, Gemma 2 and Gemma 3,
one implementation.

The families share everything but a few switches (see `DecoderConfig`): Mistral (and Phi-3, whose fused
projections are split on load) attends within a sliding window on every layer; Qwen2 adds biases to the
q, k, v projections; Qwen3 normalises each query and key head (QK norm, before RoPE) and decouples
head_dim from hidden / heads; Gemma 2 and 3 add post-attention / post-MLP norms, RMSNorm weights stored as
an offset from 1, a sqrt(hidden) embedding scale, and interleaved sliding-window / global attention layers;
Gemma 2 soft-caps attention and output logits, Gemma 3 adds QK norm and a RoPE base of its own on the
sliding layers. RoPE scaling
(`linear`, `dynamic` NTK, `llama3`, `longrope`) computes its frequencies as transformers'
`ROPE_INIT_FUNCTIONS` do.

Parameter paths (what strategy and sharding rules match on)::

    embed/embedding                                   [vocab, hidden]
    layers/{i}/attn_norm/scale, layers/{i}/mlp_norm/scale
    layers/{i}/post_attn_norm/scale, layers/{i}/post_mlp_norm/scale      (Gemma 2, 3)
    layers/{i}/attn/{q,k,v,o}/kernel                  [in, out]
    layers/{i}/attn/{q,k,v}/bias                      (Qwen2; LLaMA / Qwen3 with attention_bias, o too)
    layers/{i}/attn/{q_norm,k_norm}/scale             (Qwen3, Gemma 3)
    layers/{i}/mlp/{gate,up,down}/kernel              (and bias: LLaMA with mlp_bias)
    final_norm/scale
    lm_head/kernel                                    [hidden, vocab]; only when embeddings are untied
    layers/{i}/{attn,mlp}/*/lora_{a,b}                LoRA adapters, once `models.lora.apply_lora` added them

Masks: a token attends to earlier tokens of its own segment (`segment_ids`, 0 = padding), within the
sliding window on local layers. Padding and packed examples are both expressed through segment ids.
Positions (for RoPE) are explicit, so left-padded prompts and packed rows get per-example positions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sft_jax.models.fused_attention import dot_product_attend, splash_attend
from sft_jax.models.mixed import Linear, linear_dot, linear_kwargs
from sft_jax.models.remat import run_block
from sft_jax.sharding import constrain, logical

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")
FULL, SLIDING = "full_attention", "sliding_attention"

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}

# A finite "minus infinity": a query with nothing to attend to (a padding row) stays finite, not NaN.
_NEG = float(jnp.finfo(jnp.float32).min)
_HEADS, _KV_HEADS = ("batch", "length", "heads", "head_dim"), ("batch", "length", "kv_heads", "head_dim")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters of a decoder LM. Parameters are float32; `dtype` is the matmul compute dtype."""

    family: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 576
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    intermediate_size: int = 1536
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_local_theta: float = 10000.0  # Gemma 3 sliding-window layers
    max_position_embeddings: int = 2048
    tie_embeddings: bool = True
    query_pre_attn_scalar: float | None = None  # queries are scaled by its -1/2 power; None: head_dim
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # per layer FULL or SLIDING; empty: all FULL
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2; attention_bias of LLaMA / Qwen3)
    o_bias: bool = False  # bias on the output projection (attention_bias of LLaMA / Qwen3)
    mlp_bias: bool = False  # biases on gate, up, down (mlp_bias of LLaMA)
    qk_norm: bool = False  # RMSNorm over head_dim of each query / key head before RoPE (Qwen3; Gemma 3 always)
    # RoPE scaling of the (global) layers: a type of transformers' ROPE_INIT_FUNCTIONS and its parameters as
    # sorted (key, value) pairs (hashable: the config is static). Gemma 3's sliding layers never scale.
    rope_type: str = "default"
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    attn_logit_softcapping: float | None = None  # Gemma 2: attention logits cap * tanh(logits / cap)
    final_logit_softcapping: float | None = None  # Gemma 2: output logits cap * tanh(logits / cap)
    rotary_dim: int | None = None  # RoPE on the first rotary_dim dims of each head only (Phi's partial_rotary_factor)
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown decoder family {self.family!r}; expected one of {FAMILIES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ValueError("sliding_attention layers need a sliding_window")
        if self.rotary_dim is not None and (self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim):
            raise ValueError(f"rotary_dim {self.rotary_dim} must be even and in (0, head_dim={self.head_dim}]")
        if self.rope_type not in _ROPE_KEYS:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported; use one of {sorted(_ROPE_KEYS)}")

    @property
    def gemma(self) -> bool:
        """Gemma's layout: norm weights as offsets from 1, post-sub-block norms, sqrt(hidden) embedding scale."""
        return self.family in ("gemma2", "gemma3")

    def layer_type(self, i: int) -> str:
        return self.layer_types[i] if self.layer_types else FULL

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return tuple(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else (self.eos_token_id,)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> DecoderConfig:
        """From a Hugging Face `config.json` dict of `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`,
        `Qwen3ForCausalLM`, `Phi3ForCausalLM`, `Gemma2ForCausalLM` or `Gemma3ForCausalLM`. An option this
        implementation lacks is refused with one ValueError line naming the key, never loaded as something else."""
        model_type = hf.get("model_type", "")
        if model_type in ("gemma3", "gemma3_text"):
            hf = hf.get("text_config", hf) if model_type == "gemma3" else hf
            family = "gemma3"
        elif model_type in ("mistral", "qwen2", "qwen3", "phi3", "gemma2"):
            family = model_type
        elif model_type == "llama" or "LlamaForCausalLM" in hf.get("architectures", ()):
            family = "llama"
        else:
            raise ValueError(f"model_type {model_type!r} is not a supported decoder "
                             "(llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3_text)")
        n = hf["num_hidden_layers"]
        # Which projections carry biases: transformers reads attention_bias / mlp_bias for some families and
        # hard-codes the rest (Qwen2: q, k, v always; Mistral: none).
        attention_bias, mlp_bias = bool(hf.get("attention_bias")), bool(hf.get("mlp_bias"))
        if family in ("gemma2", "gemma3") and (attention_bias or mlp_bias):
            raise ValueError(f"{'attention_bias' if attention_bias else 'mlp_bias'}=True is not supported")
        if family == "qwen3" and mlp_bias:
            raise ValueError("mlp_bias=True is not supported for qwen3 (transformers' Qwen3 has no MLP biases)")
        full_rope, local_rope = _rope_parameters(hf)
        if family == "phi3":
            # transformers' Phi3Config: original_max_position_embeddings is an attribute (default 4096) that wins
            # over the RoPE dict's, and the pre-release names "su" / "yarn" mean longrope.
            hf = dict(hf, original_max_position_embeddings=hf.get("original_max_position_embeddings", 4096))
            if full_rope["rope_type"] in ("su", "yarn"):
                full_rope["rope_type"] = "longrope"
        heads = hf["num_attention_heads"]
        kwargs = dict(
            family=family, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            num_layers=n, num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            intermediate_size=hf["intermediate_size"],
            hidden_act=hf.get("hidden_activation") or hf.get("hidden_act", "silu"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_embeddings=hf.get("tie_word_embeddings", family in ("gemma2", "gemma3")),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=_ids(hf.get("eos_token_id")),
            pad_token_id=hf.get("pad_token_id"),
            qkv_bias=family == "qwen2" or (family in ("llama", "qwen3") and attention_bias),
            o_bias=family in ("llama", "qwen3") and attention_bias,
            mlp_bias=family == "llama" and mlp_bias, qk_norm=family == "qwen3",
        )
        kwargs["rope_type"], kwargs["rope_scaling"], partial = _rope_scaling(full_rope, hf)
        if partial != 1.0:
            if family != "phi3":  # only Phi's attention rotates part of each head in transformers
                raise ValueError(f"{full_rope['_source']}: partial_rotary_factor={partial!r} is not supported "
                                 f"for {model_type} (RoPE on the whole head only)")
            kwargs["rotary_dim"] = int(kwargs["head_dim"] * partial)
        if family == "gemma3":
            window = hf.get("sliding_window")
            types = hf.get("layer_types") or [
                SLIDING if (i + 1) % hf.get("sliding_window_pattern", 6) else FULL for i in range(n)]
            if _rope_scaling(local_rope, hf)[0] != "default":
                raise ValueError(f"rope_parameters.{SLIDING}.rope_type {local_rope.get('rope_type')!r} is not "
                                 "supported (Gemma 3's sliding layers use plain RoPE)")
            kwargs.update(rope_theta=full_rope.get("rope_theta", 1e6),
                          rope_local_theta=local_rope.get("rope_theta", 1e4),
                          query_pre_attn_scalar=hf.get("query_pre_attn_scalar", kwargs["head_dim"]),
                          sliding_window=window, layer_types=tuple(types))
            if hf.get("final_logit_softcapping") or hf.get("attn_logit_softcapping"):
                raise ValueError("logit soft-capping is not supported (Gemma 3 does not use it)")
        elif family == "gemma2":
            # One RoPE for all layers; sliding on even layers; transformers' defaults for absent keys.
            if local_rope["_source"].endswith(SLIDING) and (
                    _rope_scaling(local_rope, hf)[:2], local_rope.get("rope_theta")) != (
                    (kwargs["rope_type"], kwargs["rope_scaling"]), full_rope.get("rope_theta")):
                raise ValueError(f"rope_parameters.{SLIDING}: differs from {FULL}'s (Gemma 2 has one RoPE)")
            types = hf.get("layer_types") or [SLIDING if (i + 1) % 2 else FULL for i in range(n)]
            window = hf.get("sliding_window", 4096)
            kwargs.update(rope_theta=full_rope.get("rope_theta", 10000.0),
                          query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
                          sliding_window=window, layer_types=tuple(types) if window else (),
                          attn_logit_softcapping=hf.get("attn_logit_softcapping", 50.0),
                          final_logit_softcapping=hf.get("final_logit_softcapping", 30.0))
        else:
            kwargs["rope_theta"] = full_rope.get("rope_theta", 10000.0)
            window = hf.get("sliding_window")
            if family in ("mistral", "phi3") and window:  # every layer attends within the window
                kwargs.update(sliding_window=window, layer_types=(SLIDING,) * n)
            elif family in ("qwen2", "qwen3") and hf.get("use_sliding_window") and window:
                # transformers: layers from max_window_layers on slide (unless layer_types says otherwise)
                types = hf.get("layer_types") or [
                    SLIDING if i >= hf.get("max_window_layers", 28) else FULL for i in range(n)]
                if SLIDING in types:
                    kwargs.update(sliding_window=window, layer_types=tuple(types))
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face `config.json` dict of this model (for export)."""
        common = dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim,
            intermediate_size=self.intermediate_size, rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=self.tie_embeddings,
            bos_token_id=self.bos_token_id, eos_token_id=_json_ids(self.eos_token_id),
            pad_token_id=self.pad_token_id, torch_dtype="float32",
        )
        rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta,
                **{k: list(v) if isinstance(v, tuple) else v for k, v in self.rope_scaling}}
        if self.rotary_dim is not None and self.rotary_dim != self.head_dim:
            if self.family != "phi3":
                raise ValueError(f"{self.family}: rotary_dim {self.rotary_dim} has no Hugging Face config")
            rope["partial_rotary_factor"] = self.rotary_dim / self.head_dim
        if self.family == "gemma2":
            return dict(common, architectures=["Gemma2ForCausalLM"], model_type="gemma2",
                        hidden_activation=self.hidden_act, sliding_window=self.sliding_window,
                        layer_types=list(self.layer_types) or [FULL] * self.num_layers,
                        query_pre_attn_scalar=self.query_pre_attn_scalar or self.head_dim, rope_parameters=rope,
                        final_logit_softcapping=self.final_logit_softcapping,
                        attn_logit_softcapping=self.attn_logit_softcapping)
        if self.gemma:
            return dict(common, architectures=["Gemma3ForCausalLM"], model_type="gemma3_text",
                        hidden_activation=self.hidden_act, sliding_window=self.sliding_window,
                        layer_types=list(self.layer_types) or [FULL] * self.num_layers,
                        query_pre_attn_scalar=self.query_pre_attn_scalar or self.head_dim,
                        rope_parameters={FULL: rope,
                                         SLIDING: {"rope_type": "default", "rope_theta": self.rope_local_theta}},
                        final_logit_softcapping=None, attn_logit_softcapping=None)
        # A family whose fixed layout transformers hard-codes can hold only that layout.
        fixed = {"mistral": (False, False, False, False), "phi3": (False, False, False, False),
                 "qwen2": (True, False, False, False),
                 "qwen3": (self.o_bias, self.o_bias, False, True)}.get(self.family)
        layout = (self.qkv_bias, self.o_bias, self.mlp_bias, self.qk_norm)
        if fixed is not None and layout != fixed or self.family == "llama" and (
                self.qkv_bias != self.o_bias or self.qk_norm):
            raise ValueError(f"{self.family}: (qkv_bias, o_bias, mlp_bias, qk_norm) = {layout} has no Hugging Face "
                             "config of that model_type")
        sliding = SLIDING in self.layer_types
        out = dict(common, hidden_act=self.hidden_act, rope_parameters=rope)
        if self.family in ("mistral", "phi3"):
            if sliding and set(self.layer_types) != {SLIDING}:
                raise ValueError(f"{self.family}: a mix of sliding and full layers has no Hugging Face config")
            out = dict(out, sliding_window=self.sliding_window if sliding else None)
            if self.family == "mistral":
                return dict(out, architectures=["MistralForCausalLM"], model_type="mistral")
            original = dict(self.rope_scaling).get("original_max_position_embeddings", self.max_position_embeddings)
            return dict(out, architectures=["Phi3ForCausalLM"], model_type="phi3",
                        original_max_position_embeddings=original)
        if self.family in ("qwen2", "qwen3"):
            name = "Qwen2ForCausalLM" if self.family == "qwen2" else "Qwen3ForCausalLM"
            out = dict(out, architectures=[name], model_type=self.family, use_sliding_window=sliding,
                       sliding_window=self.sliding_window if sliding else None,
                       layer_types=list(self.layer_types) or [FULL] * self.num_layers,
                       max_window_layers=self.layer_types.index(SLIDING) if sliding else self.num_layers)
            return dict(out, attention_bias=self.o_bias) if self.family == "qwen3" else out
        if sliding:
            raise ValueError("llama: sliding-window layers have no Hugging Face LLaMA config")
        return dict(out, architectures=["LlamaForCausalLM"], model_type="llama",
                    attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)


def _ids(value):
    return tuple(value) if isinstance(value, list) else value


def _json_ids(value):
    return list(value) if isinstance(value, tuple) else value


# rope_type -> (required keys, optional keys) of its parameters; transformers' ROPE_INIT_FUNCTIONS names.
_ROPE_KEYS = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "longrope": (("short_factor", "long_factor", "original_max_position_embeddings"), ("factor", "attention_factor")),
}


def _rope_parameters(hf: Mapping[str, Any]) -> tuple[dict, dict]:
    """(RoPE parameters of the global layers, of Gemma 3's sliding layers), each a dict with `rope_theta`
    (where given), `rope_type` and the scaling keys, from transformers 5's `rope_parameters` (flat or per
    layer type) or the older `rope_theta` + `rope_scaling` keys. `_source` names where they came from."""
    rope = hf.get("rope_parameters")
    if rope:
        if FULL in rope or SLIDING in rope:
            full = dict(rope.get(FULL) or {}, _source=f"rope_parameters.{FULL}")
            local = dict(rope.get(SLIDING) or {}, _source=f"rope_parameters.{SLIDING}")
        else:
            full, local = dict(rope, _source="rope_parameters"), {"_source": "rope_parameters"}
    else:
        full = dict(hf.get("rope_scaling") or {}, _source="rope_scaling")
        local = {"_source": "rope_local_base_freq"}
        if "rope_local_base_freq" in hf:
            local["rope_theta"] = hf["rope_local_base_freq"]
    if "rope_theta" not in full and "rope_theta" in hf:
        full["rope_theta"] = hf["rope_theta"]
    for params in (full, local):  # transformers: `rope_type`, else the older `type`, else default
        params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return full, local


def _rope_scaling(params: Mapping[str, Any], hf: Mapping[str, Any]) -> tuple[str, tuple[tuple[str, Any], ...], float]:
    """(rope_type, sorted (key, value) scaling parameters, partial_rotary_factor) as transformers resolves
    them; refuses, one line naming the key, any type or option that the frequencies below do not implement."""
    source, kind = params["_source"], params["rope_type"]
    if kind not in _ROPE_KEYS:
        raise ValueError(f"{source}: rope_type {kind!r} is not supported (supported: {', '.join(_ROPE_KEYS)})")
    required, optional = _ROPE_KEYS[kind]
    p = {k: v for k, v in params.items() if k not in ("_source", "rope_type", "type", "rope_theta")}
    partial = float(p.pop("partial_rotary_factor", None) or hf.get("partial_rotary_factor") or 1.0)
    if kind in ("llama3", "longrope"):
        # transformers: a top-level original_max_position_embeddings (Phi-3) wins, else max_position_embeddings
        if "original_max_position_embeddings" in hf:
            p["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        p.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
    for key in p:
        if key not in required + optional:
            raise ValueError(f"{source}: {key}={p[key]!r} is not supported with rope_type {kind!r}")
    for key in required:
        if p.get(key) is None:
            raise ValueError(f"{source}: rope_type {kind!r} needs {key!r}")
    if kind == "longrope":
        original = p["original_max_position_embeddings"]
        if p.get("factor") is None:
            p["factor"] = hf.get("max_position_embeddings", 2048) / original
        if p.get("attention_factor") is None:
            f = p["factor"]
            p["attention_factor"] = 1.0 if f <= 1.0 else math.sqrt(1 + math.log(f) / math.log(original))
        if len(p["short_factor"]) != len(p["long_factor"]):
            raise ValueError(f"{source}: short_factor and long_factor differ in length")
    return kind, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in p.items())), partial


class RMSNorm(nnx.Module):
    """x / rms(x) * w (LLaMA) or * (1 + w) (Gemma, whose weights are stored as an offset), in float32."""

    def __init__(self, dim: int, eps: float, *, offset: bool, axis: str = "norm"):
        self.eps, self.offset = eps, offset
        self.scale = nnx.Param(jnp.zeros((dim,), jnp.float32) if offset else jnp.ones((dim,), jnp.float32),
                               **logical(axis))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = self.scale.value + 1.0 if self.offset else self.scale.value
        return y * w


def rope_frequencies(dim: int, theta: float, rope_type: str = "default", scaling: tuple = (),
                     positions: jax.Array | None = None, max_position_embeddings: int = 2048):
    """(inverse frequencies float32 [dim / 2], attention factor) of a RoPE type, computed as transformers'
    `ROPE_INIT_FUNCTIONS` compute them (float32, same operation order).

    `dynamic` (NTK) and `longrope` depend on the sequence length seen, max(positions) + 1 over the batch,
    as transformers' `dynamic_rope_update` does for a call. transformers also keeps a grown dynamic base
    between calls of one module instance; here every call starts afresh (the same as a fresh model, and as
    generation, whose lengths only grow). The attention factor multiplies cos and sin (longrope's).
    """
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    inv_freq = 1.0 / (theta ** exponents)
    p = dict(scaling)
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / p["factor"], 1.0
    if rope_type == "llama3":
        factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old = p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        return jnp.where(medium, smoothed, scaled), 1.0
    seq_len = jnp.max(positions) + 1
    if rope_type == "dynamic":
        factor, m = p["factor"], max_position_embeddings
        seq = jnp.maximum(seq_len, m).astype(jnp.float32)
        base = theta * ((factor * seq / m) - (factor - 1)) ** (dim / (dim - 2))
        return jnp.where(seq_len > m, 1.0 / (base ** exponents), inv_freq), 1.0
    if rope_type == "longrope":
        pows = theta ** exponents
        short = 1.0 / (jnp.asarray(p["short_factor"], jnp.float32) * pows)
        long = 1.0 / (jnp.asarray(p["long_factor"], jnp.float32) * pows)
        return jnp.where(seq_len > p["original_max_position_embeddings"], long, short), p["attention_factor"]
    raise ValueError(f"rope_type {rope_type!r} is not supported")


def rope(x: jax.Array, positions: jax.Array, theta: float, inv_freq: jax.Array | None = None,
         attention_factor: float = 1.0) -> jax.Array:
    """Rotary embedding (the half-split layout of Hugging Face) of x [B, T, N, D] at positions [B, T];
    `inv_freq` [R / 2] (default: plain RoPE of base `theta`, R = D), cos and sin times `attention_factor`.
    With R < D only the first R dims of each head rotate (Phi's partial rotary), the rest pass through."""
    d = x.shape[-1]
    if inv_freq is not None and 2 * inv_freq.shape[-1] < d:
        r = 2 * inv_freq.shape[-1]
        return jnp.concatenate([rope(x[..., :r], positions, theta, inv_freq, attention_factor), x[..., r:]], -1)
    if inv_freq is None:
        inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _linear(n_in: int, n_out: int, config: DecoderConfig, rngs: nnx.Rngs, axes: tuple[str, str],
            bias: bool = False) -> nnx.Linear:
    if bias:  # mixed.Linear: in bfloat16 the bias is added inside the float32-accumulating dot
        return Linear(n_in, n_out, use_bias=True, dtype=config.dtype, param_dtype=jnp.float32,
                      kernel_init=nnx.initializers.normal(0.02), rngs=rngs, kernel_metadata=logical(*axes),
                      bias_metadata=logical(axes[1]), **linear_kwargs(config.dtype))
    return nnx.Linear(n_in, n_out, use_bias=False, dtype=config.dtype, param_dtype=jnp.float32,
                      kernel_init=nnx.initializers.normal(0.02), rngs=rngs, kernel_metadata=logical(*axes),
                      **linear_kwargs(config.dtype))


def _project(linear: nnx.Module, x: jax.Array, rng: jax.Array | None, index: int) -> jax.Array:
    """linear(x). Only LoRA layers use randomness (adapter dropout); each gets its own key from `rng`."""
    if rng is None or isinstance(linear, nnx.Linear):
        return linear(x)
    return linear(x, jax.random.fold_in(rng, index))


def attention_mask(q_segments, q_index, k_segments, k_index, window: int | None) -> jax.Array:
    """[B, T, S] bool: same non-zero segment, causal (k_index <= q_index), and within `window` if set.

    `*_index` are slot indices [B, T] / [B, S] along the sequence (or KV cache), not RoPE positions.
    """
    same = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] != 0)
    diff = q_index[:, :, None] - k_index[:, None, :]
    mask = same & (diff >= 0)
    if window:
        mask &= diff < window
    return mask


def _attention_probs(q, k, mask, scale):
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    return jax.nn.softmax(jnp.where(mask[:, None, None], logits * scale, _NEG), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Grouped-query attention: q [B, T, K, G, D] (query head k * G + g reads kv head k), k and v
    [B, S, K, D], mask [B, T, S] -> [B, T, K, G, D]; logits and softmax in float32.

    Its backward is written out (the FlashAttention form): dS = P * (dP - rowsum(dO * O)), where
    autodiff of the softmax sums dP * P over the S keys of every [T, S] row; here the row sum runs over the
    D values of the output instead, and masked entries of dS are zero by the mask rather than by a select
    on the logits' gradient: fewer passes over the [T, S] blocks than autodiff's backward.
    The probabilities stay unnormalised (E = exp(logits - max)): the 1 / row-sum scales the [T, D] output and
    output gradient instead of every [T, S] entry. Measurements: experiments/benchmarks/notes.md.
    """
    return _attend_fwd(q, k, v, mask, scale)[0]


# Query rows per block of `causal_attend`; shorter sequences are one block.
ATTENTION_BLOCK = 128


def capped_attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                  softcap: float | None = None) -> jax.Array:
    """`attend` with Gemma 2's soft-capped logits, cap * tanh(logits * scale / cap), capped before the mask
    as transformers does; without a cap it is `attend`. The capped form is differentiated by autodiff (the
    hand-written backward of `attend` knows no tanh)."""
    if not softcap:
        return attend(q, k, v, mask, scale)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    logits = softcap * jnp.tanh(logits / softcap)
    probs = jax.nn.softmax(jnp.where(mask[:, None, None], logits, _NEG), axis=-1)
    return jnp.einsum("bkgts,bskd->btkgd", probs.astype(q.dtype), v, preferred_element_type=jnp.float32
                      ).astype(q.dtype)


def causal_attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                  window: int | None = None, block: int | None = None, softcap: float | None = None) -> jax.Array:
    """`attend` for self-attention whose mask is causal by array index (mask[:, t, s] is False for s > t,
    and for t - s >= window if set), in blocks of query rows that read only the keys the mask can let
    through: [start - window + 1, end) for rows [start, end). Causal attention over T tokens then costs
    about (1 + block / T) / 2 of the full T x T product. Rows that attend to nothing (padding) average the
    values of their block's keys instead of all keys: garbage either way, and without gradient."""
    block = block or ATTENTION_BLOCK
    t = q.shape[1]
    if t <= block:
        return capped_attend(q, k, v, mask, scale, softcap)
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        first = max(0, start - window + 1) if window else 0
        outs.append(capped_attend(q[:, start:end], k[:, first:end], v[:, first:end],
                                  mask[:, start:end, first:end], scale, softcap))
    return jnp.concatenate(outs, axis=1)


def _attend_fwd(q, k, v, mask, scale):
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    logits = jnp.where(mask[:, None, None], logits * scale, _NEG)
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # unnormalised probabilities
    inv = jnp.moveaxis(1.0 / jnp.sum(e, axis=-1), 3, 1)[..., None]  # 1 / row sum, as [B, T, K, G, 1]
    e = e.astype(q.dtype)
    o = (jnp.einsum("bkgts,bskd->btkgd", e, v, preferred_element_type=jnp.float32) * inv).astype(q.dtype)
    return o, (q, k, v, mask, e, inv, o)


def _attend_bwd(scale, res, do):
    q, k, v, mask, e, inv, o = res
    f32 = jnp.float32
    # With P = E / rowsum(E): dV = P^T dO = E^T (dO / rowsum) and P * (dP - rowsum(dO * O)) =
    # E * (dP' - rowsum(dO' * O)) for dO' = dO / rowsum, so the [T, S] probabilities are never normalised.
    do = (do.astype(f32) * inv).astype(q.dtype)
    dv = jnp.einsum("bkgts,btkgd->bskd", e, do, preferred_element_type=f32).astype(v.dtype)
    dp = jnp.einsum("btkgd,bskd->bkgts", do, v, preferred_element_type=f32)
    row = jnp.einsum("btkgd,btkgd->bkgt", do.astype(f32), o.astype(f32))  # rowsum(dP' * P) = rowsum(dO' * O)
    # Rows with no key to attend to (padding) softmax to uniform weights; their gradient stays zero, as
    # autodiff through the masked logits gives.
    ds = jnp.where(mask[:, None, None], e.astype(f32) * (dp - row[..., None]) * scale, 0.0).astype(q.dtype)
    dq = jnp.einsum("bkgts,bskd->btkgd", ds, k, preferred_element_type=f32).astype(q.dtype)
    dk = jnp.einsum("bkgts,btkgd->bskd", ds, q, preferred_element_type=f32).astype(k.dtype)
    return dq, dk, dv, None


attend.defvjp(_attend_fwd, _attend_bwd)


class Attention(nnx.Module):
    """Grouped-query attention with RoPE (and the QK norm of Qwen3 and Gemma 3)."""

    def __init__(self, config: DecoderConfig, layer_type: str, *, rngs: nnx.Rngs):
        h, n, k, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, d
        self.scale = float(config.query_pre_attn_scalar or d) ** -0.5
        self.window = config.sliding_window if layer_type == SLIDING else None
        local = layer_type == SLIDING and config.family == "gemma3"  # own base, no scaling
        self.theta = config.rope_local_theta if local else config.rope_theta
        self.rope_type, self.rope_scaling = ("default", ()) if local else (config.rope_type, config.rope_scaling)
        self.max_position_embeddings = config.max_position_embeddings
        self.rotary_dim = config.rotary_dim or d
        self.q = _linear(h, n * d, config, rngs, ("embed", "heads"), config.qkv_bias)
        self.k = _linear(h, k * d, config, rngs, ("embed", "kv_heads"), config.qkv_bias)
        self.v = _linear(h, k * d, config, rngs, ("embed", "kv_heads"), config.qkv_bias)
        self.o = _linear(n * d, h, config, rngs, ("heads", "embed"), config.o_bias)
        self.softcap = config.attn_logit_softcapping
        self.attention_kernel = "blocked"  # or "dot_product" / "splash" (models/fused_attention.py); set per run
        if config.family == "gemma3" or config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps, offset=config.gemma, axis="head_dim")
            self.k_norm = RMSNorm(d, config.rms_norm_eps, offset=config.gemma, axis="head_dim")
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x, positions, segments, index, cache=None, rng=None):
        b, t, _ = x.shape
        dtype = x.dtype
        q = constrain(_project(self.q, x, rng, 0).reshape(b, t, self.num_heads, self.head_dim), *_HEADS)
        k = constrain(_project(self.k, x, rng, 1).reshape(b, t, self.num_kv_heads, self.head_dim), *_KV_HEADS)
        v = constrain(_project(self.v, x, rng, 2).reshape(b, t, self.num_kv_heads, self.head_dim), *_KV_HEADS)
        if self.q_norm is not None:
            q, k = self.q_norm(q).astype(q.dtype), self.k_norm(k).astype(k.dtype)
        if self.rope_type == "default" and self.rotary_dim == self.head_dim:
            q, k = rope(q, positions, self.theta), rope(k, positions, self.theta)
        else:
            freq, factor = rope_frequencies(self.rotary_dim, self.theta, self.rope_type, self.rope_scaling, positions,
                                            self.max_position_embeddings)
            q, k = rope(q, positions, self.theta, freq, factor), rope(k, positions, self.theta, freq, factor)
        if cache is None:
            k_all, v_all, k_segments, k_index = k, v, segments, index
            new_cache = None
        else:
            # Write the new keys/values at slots [end, end + t) of this layer's slice of the stacked
            # [layers, B, S, ...] buffers: updating the stack in place (no per-layer slice + re-stack) lets
            # XLA keep one buffer across decode steps instead of copying the whole cache every token.
            layer, start = cache["layer"], cache["end"]
            new_cache = dict(cache)
            for name, new in (("k", k), ("v", v)):
                new_cache[name] = jax.lax.dynamic_update_slice(
                    cache[name], new.astype(cache[name].dtype)[None], (layer, 0, start, 0, 0))
            k_all, v_all = new_cache["k"][layer], new_cache["v"][layer]
            k_segments = cache["segments"]  # already holds the new tokens' segments (written by DecoderLM)
            k_index = jnp.broadcast_to(jnp.arange(k_all.shape[1]), k_segments.shape)
        q = q.reshape(b, t, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)
        if cache is None and self.attention_kernel == "splash":  # masks from the segments, causal by index
            ctx = splash_attend(q, k_all.astype(dtype), v_all.astype(dtype), segments, self.scale, self.window,
                                self.softcap)
            return _project(self.o, ctx.reshape(b, t, -1), rng, 3), new_cache
        mask = attention_mask(segments, index, k_segments, k_index, self.window)
        if cache is None and self.attention_kernel == "dot_product" and not self.softcap:
            ctx = dot_product_attend(q, k_all.astype(dtype), v_all.astype(dtype), mask, self.scale)
        elif cache is None:  # slot index = sequence index: causal by position in the arrays
            ctx = causal_attend(q, k_all.astype(dtype), v_all.astype(dtype), mask, self.scale, self.window,
                                softcap=self.softcap)
        else:
            ctx = capped_attend(q, k_all.astype(dtype), v_all.astype(dtype), mask, self.scale, self.softcap)
        return _project(self.o, ctx.reshape(b, t, -1), rng, 3), new_cache


class Mlp(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)) (SwiGLU for LLaMA, GeGLU for Gemma)."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        self.activation = _ACTIVATIONS[config.hidden_act]
        h, m, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate = _linear(h, m, config, rngs, ("embed", "mlp"), bias)
        self.up = _linear(h, m, config, rngs, ("embed", "mlp"), bias)
        self.down = _linear(m, h, config, rngs, ("mlp", "embed"), bias)

    def __call__(self, x, rng=None):
        h = constrain(self.activation(_project(self.gate, x, rng, 0)) * _project(self.up, x, rng, 1),
                      "batch", "length", "mlp")
        return _project(self.down, h, rng, 2)


class Block(nnx.Module):
    """Pre-norm block; Gemma 2 and 3 also normalise each sub-block's output before the residual add."""

    def __init__(self, config: DecoderConfig, layer_type: str, *, rngs: nnx.Rngs):
        norm = dict(dim=config.hidden_size, eps=config.rms_norm_eps, offset=config.gemma)
        self.dtype = config.dtype
        self.attn_norm = RMSNorm(**norm)
        self.attn = Attention(config, layer_type, rngs=rngs)
        self.mlp_norm = RMSNorm(**norm)
        self.mlp = Mlp(config, rngs=rngs)
        self.post_attn_norm = RMSNorm(**norm) if config.gemma else None
        self.post_mlp_norm = RMSNorm(**norm) if config.gemma else None

    def __call__(self, x, positions, segments, index, cache=None, rng=None):
        attn_rng, mlp_rng = (None, None) if rng is None else jax.random.split(rng)
        # The residual stream x stays float32; only sub-block inputs are cast to the compute dtype.
        h, cache = self.attn(self.attn_norm(x).astype(self.dtype), positions, segments, index, cache, attn_rng)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h.astype(jnp.float32)
        h = self.mlp(self.mlp_norm(x).astype(self.dtype), mlp_rng)
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + h.astype(jnp.float32), cache


class DecoderLM(nnx.Module):
    """A causal language model: embeddings, pre-norm blocks, final norm, LM head (tied or not)."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Embed(config.vocab_size, config.hidden_size, param_dtype=jnp.float32,
                               embedding_init=nnx.initializers.normal(0.02), rngs=rngs,
                               embedding_metadata=logical("vocab", "embed"))
        self.layers = nnx.List([Block(config, config.layer_type(i), rngs=rngs) for i in range(config.num_layers)])
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset=config.gemma)
        self.lm_head = None if config.tie_embeddings else _linear(config.hidden_size, config.vocab_size, config, rngs,
                                                                  ("embed", "vocab"))
        self.remat = "none"  # per-block activation rematerialisation in training (models/remat.py)
        self.segments = nnx.List([])  # the layers, when scanned (models/scan.py); then `layers` is empty

    def hidden(self, input_ids: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, attention_mask: jax.Array | None = None,
               cache: dict | None = None, dropout_rng: jax.Array | None = None) -> tuple[jax.Array, dict | None]:
        """Final-norm hidden states float32 [B, T, H] and the updated cache (None without one).

        Args:
          input_ids: int [B, T].
          positions: RoPE positions [B, T]; default: the count of earlier non-padding tokens, so left
            padding shifts nothing.
          segment_ids: int [B, T]; tokens attend only within their segment; 0 marks padding. Default:
            `attention_mask` (1 = token), or all ones.
          cache: from `init_cache`; the T new tokens are written at slots [end, end + T). The caller keeps
            end + T <= the cache length (beyond it, writes would be clamped onto the last slots).
          dropout_rng: key for dropout in LoRA adapters (folded in per layer); None: no dropout.
        """
        if segment_ids is None:
            segment_ids = (jnp.ones_like(input_ids) if attention_mask is None
                           else attention_mask.astype(jnp.int32))
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.cumsum(segment_ids != 0, axis=1) - 1
            if cache is not None:  # continue after the real tokens already in the cache
                positions = positions + jnp.sum(cache["segments"] != 0, axis=1, keepdims=True)
            positions = jnp.maximum(positions, 0)
        offset = 0 if cache is None else cache["end"]
        index = jnp.broadcast_to(offset + jnp.arange(t), (b, t))
        if cache is not None:
            # Writing past the end would be clamped by dynamic_update_slice (silently overwriting the last
            # slots); callers size the cache for prompt + new tokens (see `init_cache`).
            cache = dict(cache, segments=jax.lax.dynamic_update_slice(cache["segments"], segment_ids, (0, offset)))
        x = self.embed(input_ids).astype(jnp.float32)
        if self.config.gemma:
            x = x * jnp.float32(self.config.hidden_size**0.5)
        x = constrain(x, "batch", "length", "embed")
        if self.segments and cache is None:  # scanned layers (models/scan.py)
            for segment in self.segments:
                x = segment(x, positions, segment_ids, index, dropout_rng, self.remat)
            return self.final_norm(x), None
        for i, layer in enumerate(self._blocks()):
            layer_cache = None if cache is None else dict(cache, layer=i)
            rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
            if cache is None:  # training and scoring; decoding keeps everything (no backward pass)
                x, layer_cache = run_block(layer, self.remat, x, positions, segment_ids, index, None, rng)
            else:
                x, layer_cache = layer(x, positions, segment_ids, index, layer_cache, rng)
            x = constrain(x, "batch", "length", "embed")
            if cache is not None:
                cache = {k: v for k, v in layer_cache.items() if k != "layer"}
        new_cache = None if cache is None else dict(cache, end=offset + t)
        return self.final_norm(x), new_cache

    def _blocks(self) -> list[Block]:
        """The blocks in order; those of scanned segments sliced out of their stacks (decoding runs them
        one at a time with the KV cache)."""
        if not self.segments:
            return list(self.layers)
        return [segment.layer(i) for segment in self.segments for i in range(segment.shape.size)]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 [.., vocab] logits of final hidden states (matmul in the compute dtype)."""
        out = self._logits(hidden)
        cap = self.config.final_logit_softcapping
        if cap:
            out = cap * jnp.tanh(out / cap)
        return constrain(out, "batch", "length", "vocab") if out.ndim == 3 else out

    def _logits(self, hidden: jax.Array) -> jax.Array:
        dtype = self.config.dtype
        # linear_dot: float32 accumulation backward too, and the weight gradient as its own dot (models/mixed.py)
        if self.lm_head is None:
            return linear_dot(hidden.astype(dtype), self.embed.embedding.value.astype(dtype).T, jnp.float32)
        return linear_dot(hidden.astype(dtype), self.lm_head.kernel.value.astype(dtype), jnp.float32)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 dropout_rng: jax.Array | None = None) -> jax.Array:
        """float32 logits [B, T, vocab]. The pre-trained layers use no dropout (they were trained without);
        `dropout_rng` only reaches LoRA adapters with `dropout` > 0 (see `sft_jax.models.lora`)."""
        h, _ = self.hidden(input_ids, positions=positions, segment_ids=segment_ids, attention_mask=attention_mask,
                           dropout_rng=dropout_rng)
        return self.logits(h)

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = None) -> dict:
        """An empty KV cache for `max_len` slots: k, v [layers, B, max_len, kv_heads, head_dim]."""
        c = self.config
        shape = (c.num_layers, batch_size, max_len, c.num_kv_heads, c.head_dim)
        dtype = dtype or c.dtype
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
                "segments": jnp.zeros((batch_size, max_len), jnp.int32), "end": jnp.zeros((), jnp.int32)}

    def untie_head(self) -> None:
        """Gives a tied model its own LM head, initialised to the embedding (outputs are unchanged)."""
        if self.lm_head is not None:
            return
        c = self.config
        head = nnx.Linear(c.hidden_size, c.vocab_size, use_bias=False, dtype=c.dtype, param_dtype=jnp.float32,
                          rngs=nnx.Rngs(0), kernel_metadata=logical("embed", "vocab"), **linear_kwargs(c.dtype))
        head.kernel.value = jnp.asarray(self.embed.embedding.value).T
        self.lm_head = nnx.data(head)  # the attribute was created as static None
        self.config = dataclasses.replace(c, tie_embeddings=False)
