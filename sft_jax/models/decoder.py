"""Decoder-only language models in Flax NNX: the LLaMA family and Gemma 3, one implementation.

The two families share everything but a few switches (see `DecoderConfig`): Gemma 3 adds QK norm,
post-attention / post-MLP norms, RMSNorm weights stored as an offset from 1, a sqrt(hidden) embedding
scale, and interleaved sliding-window / global attention layers with their own RoPE bases.

Parameter paths (what strategy and sharding rules match on)::

    embed/embedding                                   [vocab, hidden]
    layers/{i}/attn_norm/scale, layers/{i}/mlp_norm/scale
    layers/{i}/post_attn_norm/scale, layers/{i}/post_mlp_norm/scale      (Gemma 3)
    layers/{i}/attn/{q,k,v,o}/kernel                  [in, out]
    layers/{i}/attn/{q_norm,k_norm}/scale             (Gemma 3)
    layers/{i}/mlp/{gate,up,down}/kernel
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
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sft_jax.models.mixed import linear_dot, linear_kwargs
from sft_jax.sharding import constrain, logical

FAMILIES = ("llama", "gemma3")
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

    @property
    def gemma(self) -> bool:
        return self.family == "gemma3"

    def layer_type(self, i: int) -> str:
        return self.layer_types[i] if self.layer_types else FULL

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return tuple(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else (self.eos_token_id,)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> DecoderConfig:
        """From a Hugging Face `config.json` dict of `LlamaForCausalLM` or `Gemma3ForCausalLM`."""
        model_type = hf.get("model_type", "")
        if model_type in ("gemma3", "gemma3_text"):
            hf = hf.get("text_config", hf) if model_type == "gemma3" else hf
            family = "gemma3"
        elif model_type in ("llama", "mistral") or "LlamaForCausalLM" in hf.get("architectures", ()):
            family = "llama"
        else:
            raise ValueError(f"model_type {model_type!r} is not a supported decoder (llama, gemma3_text)")
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                raise ValueError(f"{key}=True is not supported")
        rope = _rope_parameters(hf)
        heads = hf["num_attention_heads"]
        kwargs = dict(
            family=family, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"], num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            intermediate_size=hf["intermediate_size"],
            hidden_act=hf.get("hidden_activation") or hf.get("hidden_act", "silu"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_embeddings=hf.get("tie_word_embeddings", family == "gemma3"),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=_ids(hf.get("eos_token_id")),
            pad_token_id=hf.get("pad_token_id"),
        )
        if family == "gemma3":
            window = hf.get("sliding_window")
            types = hf.get("layer_types") or [
                SLIDING if (i + 1) % hf.get("sliding_window_pattern", 6) else FULL
                for i in range(hf["num_hidden_layers"])]
            kwargs.update(rope_theta=rope.get(FULL, {}).get("rope_theta", 1e6),
                          rope_local_theta=rope.get(SLIDING, {}).get("rope_theta", 1e4),
                          query_pre_attn_scalar=hf.get("query_pre_attn_scalar", kwargs["head_dim"]),
                          sliding_window=window, layer_types=tuple(types))
            if hf.get("final_logit_softcapping") or hf.get("attn_logit_softcapping"):
                raise ValueError("logit soft-capping is not supported (Gemma 3 does not use it)")
        else:
            kwargs["rope_theta"] = rope.get("rope_theta", 10000.0)
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
        if self.gemma:
            return dict(common, architectures=["Gemma3ForCausalLM"], model_type="gemma3_text",
                        hidden_activation=self.hidden_act, sliding_window=self.sliding_window,
                        layer_types=list(self.layer_types) or [FULL] * self.num_layers,
                        query_pre_attn_scalar=self.query_pre_attn_scalar or self.head_dim,
                        rope_parameters={FULL: {"rope_type": "default", "rope_theta": self.rope_theta},
                                         SLIDING: {"rope_type": "default", "rope_theta": self.rope_local_theta}},
                        final_logit_softcapping=None, attn_logit_softcapping=None)
        return dict(common, architectures=["LlamaForCausalLM"], model_type="llama", hidden_act=self.hidden_act,
                    attention_bias=False, mlp_bias=False,
                    rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta})


def _ids(value):
    return tuple(value) if isinstance(value, list) else value


def _json_ids(value):
    return list(value) if isinstance(value, tuple) else value


def _rope_parameters(hf: Mapping[str, Any]) -> dict:
    """RoPE settings from either the transformers 5 `rope_parameters` or the older `rope_theta` keys."""
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling")
    if not rope:
        rope = {"rope_theta": hf.get("rope_theta", 10000.0), "rope_type": (scaling or {}).get("rope_type", "default")}
        if "rope_local_base_freq" in hf:
            rope = {FULL: rope, SLIDING: {"rope_theta": hf["rope_local_base_freq"], "rope_type": "default"}}
    for params in (rope.values() if FULL in rope else [rope]):
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise ValueError(f"rope_type {kind!r} is not supported (only 'default')")
    return rope


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


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding (the half-split layout of Hugging Face) of x [B, T, N, D] at positions [B, T]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _linear(n_in: int, n_out: int, config: DecoderConfig, rngs: nnx.Rngs, axes: tuple[str, str]) -> nnx.Linear:
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


def causal_attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                  window: int | None = None, block: int | None = None) -> jax.Array:
    """`attend` for self-attention whose mask is causal by array index (mask[:, t, s] is False for s > t,
    and for t - s >= window if set), in blocks of query rows that read only the keys the mask can let
    through: [start - window + 1, end) for rows [start, end). Causal attention over T tokens then costs
    about (1 + block / T) / 2 of the full T x T product. Rows that attend to nothing (padding) average the
    values of their block's keys instead of all keys: garbage either way, and without gradient."""
    block = block or ATTENTION_BLOCK
    t = q.shape[1]
    if t <= block:
        return attend(q, k, v, mask, scale)
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        first = max(0, start - window + 1) if window else 0
        outs.append(attend(q[:, start:end], k[:, first:end], v[:, first:end], mask[:, start:end, first:end],
                           scale))
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
    """Grouped-query attention with RoPE (and Gemma's QK norm)."""

    def __init__(self, config: DecoderConfig, layer_type: str, *, rngs: nnx.Rngs):
        h, n, k, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, d
        self.scale = float(config.query_pre_attn_scalar or d) ** -0.5
        self.window = config.sliding_window if layer_type == SLIDING else None
        self.theta = config.rope_local_theta if layer_type == SLIDING and config.gemma else config.rope_theta
        self.q = _linear(h, n * d, config, rngs, ("embed", "heads"))
        self.k = _linear(h, k * d, config, rngs, ("embed", "kv_heads"))
        self.v = _linear(h, k * d, config, rngs, ("embed", "kv_heads"))
        self.o = _linear(n * d, h, config, rngs, ("heads", "embed"))
        if config.gemma:
            self.q_norm = RMSNorm(d, config.rms_norm_eps, offset=True, axis="head_dim")
            self.k_norm = RMSNorm(d, config.rms_norm_eps, offset=True, axis="head_dim")
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
        q, k = rope(q, positions, self.theta), rope(k, positions, self.theta)
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
        mask = attention_mask(segments, index, k_segments, k_index, self.window)
        q = q.reshape(b, t, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)
        if cache is None:  # slot index = sequence index: causal by position in the arrays
            ctx = causal_attend(q, k_all.astype(dtype), v_all.astype(dtype), mask, self.scale, self.window)
        else:
            ctx = attend(q, k_all.astype(dtype), v_all.astype(dtype), mask, self.scale)
        return _project(self.o, ctx.reshape(b, t, -1), rng, 3), new_cache


class Mlp(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)) (SwiGLU for LLaMA, GeGLU for Gemma)."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        self.activation = _ACTIVATIONS[config.hidden_act]
        self.gate = _linear(config.hidden_size, config.intermediate_size, config, rngs, ("embed", "mlp"))
        self.up = _linear(config.hidden_size, config.intermediate_size, config, rngs, ("embed", "mlp"))
        self.down = _linear(config.intermediate_size, config.hidden_size, config, rngs, ("mlp", "embed"))

    def __call__(self, x, rng=None):
        h = constrain(self.activation(_project(self.gate, x, rng, 0)) * _project(self.up, x, rng, 1),
                      "batch", "length", "mlp")
        return _project(self.down, h, rng, 2)


class Block(nnx.Module):
    """Pre-norm block; Gemma 3 also normalises each sub-block's output before the residual add."""

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
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else dict(cache, layer=i)
            rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
            x, layer_cache = layer(x, positions, segment_ids, index, layer_cache, rng)
            x = constrain(x, "batch", "length", "embed")
            if cache is not None:
                cache = {k: v for k, v in layer_cache.items() if k != "layer"}
        new_cache = None if cache is None else dict(cache, end=offset + t)
        return self.final_norm(x), new_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 [.., vocab] logits of final hidden states (matmul in the compute dtype)."""
        out = self._logits(hidden)
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
