"""ModernBERT encoder (pre-LN, rotary positions, GeGLU, alternating local / global attention) in Flax NNX.

The parameter tree keeps BERT's names where the parts are the same, so freezing rules and `bert_layout`
hold::

    embeddings/word_embeddings/embedding, embeddings/norm/scale             (no position table: rotary)
    layers/{i}/attention_norm/scale                                         (none in layer 0: identity)
    layers/{i}/attention/{query,key,value,out}/kernel                       (HF's fused Wqkv, split on load)
    layers/{i}/mlp_norm/scale, layers/{i}/mlp/{gate,up,down}/kernel         (HF's fused Wi: gate, then up)
    final_norm/scale

plus `bias` leaves where `norm_bias`, `attention_bias` or `mlp_bias` are set (all off in the released
models). Layer i attends globally when `layer_types[i]` is "full_attention", else to the tokens at most
`local_attention // 2` positions away, as transformers' `create_bidirectional_sliding_window_mask`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sft_jax.models.bert import _ACTIVATIONS, attention_bias
from sft_jax.models.dropout import dropout
from sft_jax.models.mixed import Linear, linear_kwargs
from sft_jax.models.remat import run_block
from sft_jax.sharding import constrain, logical

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclasses.dataclass(frozen=True)
class ModernBertConfig:
    """Hyper-parameters of a ModernBERT encoder (transformers' names; defaults are ModernBERT-base's).

    `dtype` is the compute dtype of the matmuls; parameters are float32, norms, rotary and softmax float32.
    """

    vocab_size: int = 50368
    hidden_size: int = 768
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    intermediate_size: int = 1152
    hidden_activation: str = "gelu"
    max_position_embeddings: int = 8192
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    layer_types: tuple[str, ...] = ()  # per layer FULL or SLIDING; () = every third layer global, from 0
    local_attention: int = 128  # window width: a local layer sees up to local_attention // 2 on each side
    global_rope_theta: float = 160000.0
    local_rope_theta: float = 10000.0
    embedding_dropout: float = 0.0
    attention_dropout: float = 0.0
    mlp_dropout: float = 0.0
    pad_token_id: int = 50283
    model_type: str = "modernbert"
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        if self.model_type != "modernbert":
            raise ValueError(f"model_type {self.model_type!r} is not supported by ModernBERT (only 'modernbert')")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_activation not in _ACTIVATIONS:
            raise ValueError(f"hidden_activation {self.hidden_activation!r} is not supported; "
                             f"use one of {sorted(_ACTIVATIONS)}")
        if not self.layer_types:
            object.__setattr__(self, "layer_types", tuple(FULL if i % 3 == 0 else SLIDING
                                                          for i in range(self.num_hidden_layers)))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - {FULL, SLIDING}:
            raise ValueError(f"layer_types {list(self.layer_types)} must name {FULL!r} or {SLIDING!r} for each of "
                             f"the {self.num_hidden_layers} layers")

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def position_offset(self) -> int:
        """Rotary positions start at 0 whatever the pad id."""
        return 0

    @property
    def max_length(self) -> int:
        """The longest sequence the model was trained for."""
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any], **overrides: Any) -> ModernBertConfig:
        """Builds a config from a Hugging Face `config.json` dict, in transformers 5's form (`layer_types`,
        `rope_parameters`) or the Hub's original one (`global_attn_every_n_layers`, `global_rope_theta`,
        `local_rope_theta`). Keys of heads and kernels (classifier_*, decoder_bias, flash attention) are
        ignored; a rotary scaling is refused."""
        hf = dict(hf_config)
        kwargs = {k: hf[k] for k in {f.name for f in dataclasses.fields(cls)} - {"dtype", "layer_types"}
                  if hf.get(k) is not None}
        if hf.get("layer_types"):
            kwargs["layer_types"] = tuple(hf["layer_types"])
        else:
            every = hf.get("global_attn_every_n_layers", 3)
            if not isinstance(every, int) or every < 1:
                raise ValueError(f"global_attn_every_n_layers {every!r} must be a positive integer")
            n = hf.get("num_hidden_layers", cls.num_hidden_layers)
            kwargs["layer_types"] = tuple(FULL if i % every == 0 else SLIDING for i in range(n))
        if hf.get("rope_scaling"):
            raise ValueError(f"rope_scaling {hf['rope_scaling']!r} is not supported (plain rotary only)")
        rope = hf.get("rope_parameters") or {}
        for layer_type, key in ((FULL, "global_rope_theta"), (SLIDING, "local_rope_theta")):
            params = rope.get(layer_type) or {}
            if params.get("rope_type", "default") != "default":
                raise ValueError(f"rope_parameters.{layer_type}.rope_type {params['rope_type']!r} is not "
                                 "supported (only 'default')")
            if "rope_theta" in params:
                kwargs[key] = params["rope_theta"]
        kwargs.update(overrides)
        return cls(**kwargs)


def _linear(in_features: int, out_features: int, config: ModernBertConfig, rngs: nnx.Rngs,
            axes: tuple[str, str], use_bias: bool) -> Linear:
    bias_axis = "norm" if axes[1] == "embed" else axes[1]
    return Linear(in_features, out_features, use_bias=use_bias, dtype=config.dtype, param_dtype=jnp.float32,
                  kernel_init=nnx.initializers.normal(0.02), rngs=rngs, kernel_metadata=logical(*axes),
                  bias_metadata=logical(bias_axis), **linear_kwargs(config.dtype))


def _layer_norm(config: ModernBertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(config.hidden_size, epsilon=config.norm_eps, use_bias=config.norm_bias,
                         dtype=jnp.float32, rngs=rngs, scale_metadata=logical("norm"),
                         bias_metadata=logical("norm"))


def rotary(x: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding of x [B, T, N, D] at positions 0..T-1, in float32: the two halves of the last axis
    are rotated together (transformers' `rotate_half`, not interleaved pairs)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * inv_freq[None, :]
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def window_bias(attention_mask: jax.Array, half_window: int) -> jax.Array:
    """Additive bias [B, 1, T, T] (float32): 0 where the key is a token at most `half_window` away."""
    t = attention_mask.shape[1]
    pos = jnp.arange(t)
    near = jnp.abs(pos[:, None] - pos[None, :]) <= half_window
    keep = near[None, None] & attention_mask[:, None, None, :].astype(bool)
    return jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


class ModernBertAttention(nnx.Module):
    """Bidirectional multi-head self-attention with rotary positions."""

    def __init__(self, config: ModernBertConfig, theta: float, *, rngs: nnx.Rngs):
        h, bias = config.hidden_size, config.attention_bias
        self.num_heads, self.head_dim, self.theta = config.num_attention_heads, config.head_dim, theta
        self.dropout_rate = config.attention_dropout
        self.query = _linear(h, h, config, rngs, ("embed", "heads"), bias)
        self.key = _linear(h, h, config, rngs, ("embed", "heads"), bias)
        self.value = _linear(h, h, config, rngs, ("embed", "heads"), bias)
        self.out = _linear(h, h, config, rngs, ("heads", "embed"), bias)

    def __call__(self, x: jax.Array, bias: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        b, t, _ = x.shape
        split = (b, t, self.num_heads, self.head_dim)
        heads = ("batch", "length", "heads", "head_dim")
        q = constrain(rotary(self.query(x).reshape(split), self.theta), *heads)
        k = constrain(rotary(self.key(x).reshape(split), self.theta), *heads)
        v = constrain(self.value(x).reshape(split), *heads)
        logits = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits * (self.head_dim**-0.5) + bias, axis=-1)
        probs_key = out_key = None
        if dropout_rng is not None:
            probs_key, out_key = jax.random.split(dropout_rng)
        probs = dropout(probs, self.dropout_rate, probs_key)
        ctx = jnp.einsum("bnts,bsnd->btnd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
        # HF drops the output projection with the attention rate too (its out_drop).
        return dropout(self.out(ctx.astype(v.dtype).reshape(b, t, -1)), self.dropout_rate, out_key)


class ModernBertMlp(nnx.Module):
    """GeGLU: down(act(gate(x)) * up(x)); HF's fused Wi holds gate (activated) then up."""

    def __init__(self, config: ModernBertConfig, *, rngs: nnx.Rngs):
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.activation = _ACTIVATIONS[config.hidden_activation]
        self.dropout_rate = config.mlp_dropout
        self.gate = _linear(h, i, config, rngs, ("embed", "mlp"), bias)
        self.up = _linear(h, i, config, rngs, ("embed", "mlp"), bias)
        self.down = _linear(i, h, config, rngs, ("mlp", "embed"), bias)

    def __call__(self, x: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        h = constrain(self.activation(self.gate(x)) * self.up(x), "batch", "length", "mlp")
        return self.down(dropout(h, self.dropout_rate, dropout_rng))


class ModernBertLayer(nnx.Module):
    """One pre-LN block: x += Attn(LN(x)); x += MLP(LN(x)). Layer 0 has no attention norm (the embedding
    norm comes right before it)."""

    def __init__(self, config: ModernBertConfig, index: int, *, rngs: nnx.Rngs):
        self.is_global = config.layer_types[index] == FULL
        theta = config.global_rope_theta if self.is_global else config.local_rope_theta
        self.attention_norm = _layer_norm(config, rngs) if index else None
        self.attention = ModernBertAttention(config, theta, rngs=rngs)
        self.mlp_norm = _layer_norm(config, rngs)
        self.mlp = ModernBertMlp(config, rngs=rngs)

    def __call__(self, x: jax.Array, bias: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        attn_key = mlp_key = None
        if dropout_rng is not None:
            attn_key, mlp_key = jax.random.split(dropout_rng)
        h = x if self.attention_norm is None else self.attention_norm(x)
        x = x + self.attention(h, bias, dropout_rng=attn_key)
        return x + self.mlp(self.mlp_norm(x), dropout_rng=mlp_key)


class ModernBertEmbeddings(nnx.Module):
    """Token embeddings followed by layer norm (positions enter as rotations in attention)."""

    def __init__(self, config: ModernBertConfig, *, rngs: nnx.Rngs):
        self.word_embeddings = nnx.Embed(config.vocab_size, config.hidden_size,
                                         embedding_init=nnx.initializers.normal(0.02), rngs=rngs,
                                         embedding_metadata=logical("vocab", "embed"))
        self.norm = _layer_norm(config, rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        return constrain(self.norm(self.word_embeddings(input_ids)), "batch", "length", "embed")


class ModernBertEncoder(nnx.Module):
    """ModernBERT returning the final-normed last hidden states (no head): the interface of `BertEncoder`
    that `EncoderClassifier` calls."""

    def __init__(self, config: ModernBertConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = ModernBertEmbeddings(config, rngs=rngs)
        self.layers = nnx.List([ModernBertLayer(config, i, rngs=rngs) for i in range(config.num_hidden_layers)])
        self.final_norm = _layer_norm(config, rngs)
        self.remat = "none"  # per-block activation rematerialisation (models/remat.py)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, *,
                 dropout_rng: jax.Array | None = None) -> jax.Array:
        """Encodes a batch.

        Args:
          input_ids: int [B, T] token ids.
          attention_mask: [B, T], 1 for real tokens and 0 for padding (right padding: positions are 0..T-1).
          dropout_rng: a PRNG key; dropout (at the config's rates) only when it is given.

        Returns:
          float32 [B, T, hidden_size] hidden states after the final norm.
        """
        full = attention_bias(attention_mask)
        local = (window_bias(attention_mask, self.config.local_attention // 2)
                 if not all(layer.is_global for layer in self.layers) else None)
        x = self.embeddings(input_ids)
        if dropout_rng is not None:
            x = dropout(x, self.config.embedding_dropout, jax.random.fold_in(dropout_rng, len(self.layers)))
        for i, layer in enumerate(self.layers):
            layer_key = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
            bias = full if layer.is_global else local
            x = constrain(run_block(layer, self.remat, x, bias, dropout_rng=layer_key), "batch", "length", "embed")
        return self.final_norm(x).astype(jnp.float32)
