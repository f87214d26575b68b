"""BERT-family encoders (post-LN) in Flax NNX: BERT, RoBERTa and XLM-RoBERTa.

RoBERTa and XLM-RoBERTa are BERT with fairseq positions (see `fairseq_position_ids`) and one token type; the
module and its parameter tree are the same, `BertConfig.model_type` picks the position scheme.

The parameter tree mirrors the names the freezing rules match on::

    embeddings/{word,position,token_type}_embeddings/embedding, embeddings/norm/{scale,bias}
    layers/{i}/attention/{query,key,value,out}/{kernel,bias}, layers/{i}/attention_norm/...
    layers/{i}/mlp/{up,down}/{kernel,bias}, layers/{i}/mlp_norm/{scale,bias}

The module holds nothing but `nnx.Param`s: dropout takes an explicit key per call, so a
checkpoint of the params is a checkpoint of the whole model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sft_jax.models.dropout import dropout
from sft_jax.models.mixed import Linear, linear_kwargs
from sft_jax.models.remat import run_block
from sft_jax.sharding import constrain, logical

_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@jax.custom_vjp
def gelu_exact(x: jax.Array) -> jax.Array:
    """The exact (erf) GELU of HF's "gelu", with a one-pass backward that recomputes Phi(x) + x phi(x)
    from x in float32 (autodiff of `jax.nn.gelu(approximate=False)` goes through erf's polynomial)."""
    xf = x.astype(jnp.float32)
    return (0.5 * xf * (1.0 + jax.lax.erf(xf * _SQRT_HALF))).astype(x.dtype)


def _gelu_fwd(x):
    return gelu_exact(x), x


def _gelu_bwd(x, g):
    xf = x.astype(jnp.float32)
    cdf = 0.5 * (1.0 + jax.lax.erf(xf * _SQRT_HALF))
    pdf = jnp.exp(-0.5 * xf * xf) * _INV_SQRT_2PI
    return ((g.astype(jnp.float32) * (cdf + xf * pdf)).astype(x.dtype),)


gelu_exact.defvjp(_gelu_fwd, _gelu_bwd)

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # HF "gelu" is the exact erf form; jax.nn.gelu defaults to the tanh approximation.
    "gelu": gelu_exact,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}

# model_type -> whether positions follow fairseq (start at pad_token_id + 1, pads get pad_token_id).
MODEL_TYPES = {"bert": False, "roberta": True, "xlm-roberta": True}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyper-parameters of a BERT encoder.

    `dtype` is the compute dtype of the matmuls; parameters are always stored in float32, and
    layer norm and softmax statistics are computed in float32 whatever `dtype` is.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    model_type: str = "bert"
    pad_token_id: int = 0  # Read only by the fairseq position scheme (roberta, xlm-roberta).
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported by the BERT-family encoder; "
                f"use one of {sorted(MODEL_TYPES)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not supported; "
                f"use one of {sorted(_ACTIVATIONS)}"
            )

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def position_offset(self) -> int:
        """Index of the first real position: pad_token_id + 1 for RoBERTa-style positions, else 0."""
        return self.pad_token_id + 1 if MODEL_TYPES[self.model_type] else 0

    @property
    def max_length(self) -> int:
        """The longest sequence the position table covers (514 rows give RoBERTa 512 tokens)."""
        return self.max_position_embeddings - self.position_offset

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any], **overrides: Any) -> BertConfig:
        """Builds a config from a Hugging Face `config.json` dict; unknown keys are ignored.

        A config without `model_type` is read as BERT (the original Google checkpoints predate the
        key); any other `model_type` than those of `MODEL_TYPES` is refused.
        """
        position_type = hf_config.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(
                f"position_embedding_type {position_type!r} is not supported (only 'absolute')"
            )
        for key in ("is_decoder", "add_cross_attention"):
            if hf_config.get(key):
                raise ValueError(f"{key} {hf_config[key]!r} is not supported (an encoder only)")
        names = {f.name for f in dataclasses.fields(cls)} - {"dtype"}
        kwargs = {k: hf_config[k] for k in names if k in hf_config}
        if kwargs.get("pad_token_id") is None:  # BERT configs may say null: no pad id, none needed
            kwargs.pop("pad_token_id", None)
        kwargs.update(overrides)
        if MODEL_TYPES.get(kwargs.get("model_type", "bert")) and "pad_token_id" not in kwargs:
            # The pad id is where positions start: guessing it would shift every position.
            raise ValueError(f"pad_token_id is missing for model_type {kwargs['model_type']!r}")
        return cls(**kwargs)


def attention_bias(attention_mask: jax.Array) -> jax.Array:
    """Additive attention bias [B, 1, 1, S] (float32): 0 for tokens, a large negative for pads.

    A finite value rather than -inf keeps a fully padded row finite (uniform attention), not NaN.
    """
    mask = attention_mask[:, None, None, :].astype(bool)
    return jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


class BertEmbeddings(nnx.Module):
    """Word + position + token-type embeddings followed by layer norm."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        # Kept in float32: the residual stream stays float32 and only matmul inputs are cast.
        self.word_embeddings = nnx.Embed(
            config.vocab_size, config.hidden_size, embedding_init=init, rngs=rngs,
            embedding_metadata=logical("vocab", "embed"),
        )
        self.position_embeddings = nnx.Embed(
            config.max_position_embeddings,
            config.hidden_size,
            embedding_init=init,
            rngs=rngs,
            embedding_metadata=logical("position", "norm"),
        )
        self.token_type_embeddings = nnx.Embed(
            config.type_vocab_size, config.hidden_size, embedding_init=init, rngs=rngs,
            embedding_metadata=logical("token_type", "norm"),
        )
        self.norm = layer_norm(config.hidden_size, config.layer_norm_eps, rngs)
        self.fairseq_positions = MODEL_TYPES[config.model_type]
        self.pad_token_id = config.pad_token_id

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        if self.fairseq_positions:
            positions = fairseq_position_ids(input_ids, self.pad_token_id)
        else:
            positions = jnp.arange(input_ids.shape[1])[None, :]
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(token_type_ids)
        )
        return constrain(self.norm(x), "batch", "length", "embed")


def fairseq_position_ids(input_ids: jax.Array, padding_idx: int) -> jax.Array:
    """RoBERTa's positions (transformers' `create_position_ids_from_input_ids`): non-pad tokens count up
    from padding_idx + 1, pad tokens get padding_idx. Decided by the ids, not the attention mask, as in HF."""
    mask = (input_ids != padding_idx).astype(jnp.int32)
    return jnp.cumsum(mask, axis=1) * mask + padding_idx


def layer_norm(size: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """A float32 layer norm whose scale and bias are replicated model-width vectors."""
    return nnx.LayerNorm(size, epsilon=eps, dtype=jnp.float32, rngs=rngs,
                         scale_metadata=logical("norm"), bias_metadata=logical("norm"))


def _linear(
    in_features: int, out_features: int, config: BertConfig, rngs: nnx.Rngs, axes: tuple[str, str]
) -> Linear:
    # A bias added to the residual stream (output "embed") is a small vector: replicated like the norms.
    bias_axis = "norm" if axes[1] == "embed" else axes[1]
    return Linear(
        in_features,
        out_features,
        dtype=config.dtype,
        param_dtype=jnp.float32,
        kernel_init=nnx.initializers.normal(0.02),
        rngs=rngs,
        kernel_metadata=logical(*axes),
        bias_metadata=logical(bias_axis),
        **linear_kwargs(config.dtype),
    )


class BertAttention(nnx.Module):
    """Bidirectional multi-head self-attention over [B, T, heads, head_dim]."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.dropout_rate = config.attention_probs_dropout_prob
        self.query = _linear(h, h, config, rngs, ("embed", "heads"))
        self.key = _linear(h, h, config, rngs, ("embed", "heads"))
        self.value = _linear(h, h, config, rngs, ("embed", "heads"))
        self.out = _linear(h, h, config, rngs, ("heads", "embed"))

    def __call__(
        self, x: jax.Array, bias: jax.Array, *, dropout_rng: jax.Array | None = None
    ) -> jax.Array:
        b, t, _ = x.shape
        # A reshape (no transpose) to [B, T, N, D]; the einsums below pick the layout they need.
        split = (b, t, self.num_heads, self.head_dim)
        heads = ("batch", "length", "heads", "head_dim")
        q = constrain(self.query(x).reshape(split), *heads)
        k = constrain(self.key(x).reshape(split), *heads)
        v = constrain(self.value(x).reshape(split), *heads)
        # Logits and softmax in float32 even for bf16 inputs: the mask bias and exp need the range.
        logits = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32)
        logits = logits * (self.head_dim**-0.5) + bias
        probs = jax.nn.softmax(logits, axis=-1)
        probs = dropout(probs, self.dropout_rate, dropout_rng)
        ctx = jnp.einsum("bnts,bsnd->btnd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
        ctx = ctx.astype(v.dtype)
        return self.out(ctx.reshape(b, t, -1))


class BertMlp(nnx.Module):
    """Position-wise feed-forward block: up-projection, activation, down-projection."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.activation = _ACTIVATIONS[config.hidden_act]
        self.up = _linear(config.hidden_size, config.intermediate_size, config, rngs, ("embed", "mlp"))
        self.down = _linear(config.intermediate_size, config.hidden_size, config, rngs, ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(constrain(self.activation(self.up(x)), "batch", "length", "mlp"))


class BertLayer(nnx.Module):
    """One post-LN transformer block: x = LN(x + Attn(x)); x = LN(x + MLP(x))."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.dropout_rate = config.hidden_dropout_prob
        self.attention = BertAttention(config, rngs=rngs)
        self.attention_norm = layer_norm(config.hidden_size, config.layer_norm_eps, rngs)
        self.mlp = BertMlp(config, rngs=rngs)
        self.mlp_norm = layer_norm(config.hidden_size, config.layer_norm_eps, rngs)

    def __call__(
        self, x: jax.Array, bias: jax.Array, *, dropout_rng: jax.Array | None = None
    ) -> jax.Array:
        if dropout_rng is None:
            attn_key = attn_out_key = mlp_out_key = None
        else:
            attn_key, attn_out_key, mlp_out_key = jax.random.split(dropout_rng, 3)
        # The residual stream is float32; sub-block outputs in `dtype` are promoted on the add.
        h = self.attention(x, bias, dropout_rng=attn_key)
        x = self.attention_norm(x + dropout(h, self.dropout_rate, attn_out_key))
        h = self.mlp(x)
        return self.mlp_norm(x + dropout(h, self.dropout_rate, mlp_out_key))


class BertEncoder(nnx.Module):
    """BERT encoder returning the last hidden states (no pooler, no task head)."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = BertEmbeddings(config, rngs=rngs)
        self.layers = nnx.List(
            [BertLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)]
        )
        self.remat = "none"  # per-block activation rematerialisation (models/remat.py)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
        *,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """Encodes a batch.

        Args:
          input_ids: int [B, T] token ids.
          attention_mask: [B, T], 1 for real tokens and 0 for padding.
          token_type_ids: int [B, T] segment ids; zeros when None.
          dropout_rng: a PRNG key. Dropout is applied only when it is given, so evaluation is
            simply a call without a key.

        Returns:
          float32 [B, T, hidden_size] hidden states of the last layer.
        """
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        bias = attention_bias(attention_mask)
        x = self.embeddings(input_ids, token_type_ids)
        if dropout_rng is not None:
            # Layer i uses fold_in(key, i); embedding dropout takes the index after the last layer.
            emb_key = jax.random.fold_in(dropout_rng, len(self.layers))
            x = dropout(x, self.config.hidden_dropout_prob, emb_key)
        for i, layer in enumerate(self.layers):
            layer_key = (
                None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
            )
            x = constrain(run_block(layer, self.remat, x, bias, dropout_rng=layer_key), "batch", "length", "embed")
        return x.astype(jnp.float32)
