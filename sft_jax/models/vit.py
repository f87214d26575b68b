"""Vision Transformer (pre-LN, as Hugging Face `ViTModel`) in Flax NNX, and an image classifier on top.

Images come in channels-last, [B, H, W, C] float32, already normalised. The parameter tree::

    embeddings/patch/{kernel,bias}            (a linear map of each flattened P x P x C patch)
    embeddings/cls_token, embeddings/position_embeddings
    layers/{i}/attention_norm, layers/{i}/attention/{query,key,value,out}   (norm *before* attention)
    layers/{i}/mlp_norm, layers/{i}/mlp/{up,down}                           (norm *before* the MLP)
    norm                                      (final layer norm)

Attention and MLP are BERT's modules (`sft_jax.models.bert`): the config has the same field names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sft_jax.models.bert import _ACTIVATIONS, BertAttention, BertMlp, layer_norm
from sft_jax.models.dropout import dropout
from sft_jax.models.layout import ParamLayout
from sft_jax.models.pooling import check_pooling
from sft_jax.models.remat import run_block
from sft_jax.sharding import constrain, logical


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Hyper-parameters of a ViT encoder (the names of Hugging Face's `ViTConfig`)."""

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    qkv_bias: bool = True
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; use one of {sorted(_ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any], **overrides: Any) -> ViTConfig:
        """From a Hugging Face ViT `config.json` dict; unknown keys are ignored."""
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name != "dtype" and f.name in hf_config:
                value = hf_config[f.name]
                # image_size / patch_size may be [h, w] pairs; only square ones are supported.
                if isinstance(value, (list, tuple)):
                    if len(set(value)) != 1:
                        raise ValueError(f"{f.name}={value}: only square images and patches are supported")
                    value = value[0]
                kwargs[f.name] = value
        kwargs.update(overrides)
        return cls(**kwargs)


class ViTEmbeddings(nnx.Module):
    """Patches -> linear projection, a learned [CLS] token in front, learned position embeddings added."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.config = config
        p, c, h = config.patch_size, config.num_channels, config.hidden_size
        self.patch = nnx.Linear(p * p * c, h, dtype=config.dtype, kernel_init=nnx.initializers.lecun_normal(),
                                rngs=rngs, kernel_metadata=logical("patch", "embed"), bias_metadata=logical("norm"))
        init = nnx.initializers.truncated_normal(0.02)
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, h), jnp.float32), **logical(None, None, "norm"))
        self.position_embeddings = nnx.Param(init(rngs.params(), (1, config.num_patches + 1, h), jnp.float32),
                                             **logical(None, "position", "norm"))

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        b, height, width, c = pixel_values.shape
        p, size = self.config.patch_size, self.config.image_size
        if (height, width, c) != (size, size, self.config.num_channels):
            raise ValueError(f"images of shape {(height, width, c)}; the model takes "
                             f"{(size, size, self.config.num_channels)}")
        # [B, H/P, P, W/P, P, C] -> [B, N, P*P*C] with each patch flattened as (row, column, channel).
        x = pixel_values.reshape(b, height // p, p, width // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = self.patch(x.reshape(b, -1, p * p * c)).astype(jnp.float32)
        cls = jnp.broadcast_to(self.cls_token.value, (b, 1, x.shape[-1]))
        return jnp.concatenate([cls, x], axis=1) + self.position_embeddings.value


class ViTLayer(nnx.Module):
    """One pre-LN block: x = x + Attn(LN(x)); x = x + MLP(LN(x))."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.dropout_rate = config.hidden_dropout_prob
        self.attention_norm = layer_norm(config.hidden_size, config.layer_norm_eps, rngs)
        self.attention = BertAttention(config, rngs=rngs)
        self.mlp_norm = layer_norm(config.hidden_size, config.layer_norm_eps, rngs)
        self.mlp = BertMlp(config, rngs=rngs)

    def __call__(self, x: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        keys = (None,) * 3 if dropout_rng is None else jax.random.split(dropout_rng, 3)
        no_mask = jnp.zeros((1, 1, 1, 1), jnp.float32)  # every image has all its patches
        h = self.attention(self.attention_norm(x), no_mask, dropout_rng=keys[0])
        x = x + dropout(h, self.dropout_rate, keys[1])
        return x + dropout(self.mlp(self.mlp_norm(x)), self.dropout_rate, keys[2])


class ViT(nnx.Module):
    """ViT encoder returning the final-normed hidden states [B, 1 + num_patches, hidden] ([CLS] first)."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = ViTEmbeddings(config, rngs=rngs)
        self.layers = nnx.List([ViTLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)])
        self.norm = layer_norm(config.hidden_size, config.layer_norm_eps, rngs)
        self.remat = "none"  # per-block activation rematerialisation (models/remat.py)

    def __call__(self, pixel_values: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        x = constrain(self.embeddings(pixel_values), "batch", "length", "embed")
        if dropout_rng is not None:  # layer i uses fold_in(key, i); embedding dropout the index after the last
            x = dropout(x, self.config.hidden_dropout_prob, jax.random.fold_in(dropout_rng, len(self.layers)))
        for i, layer in enumerate(self.layers):
            x = run_block(layer, self.remat, x, dropout_rng=None if dropout_rng is None else
                          jax.random.fold_in(dropout_rng, i))
            x = constrain(x, "batch", "length", "embed")
        return self.norm(x).astype(jnp.float32)


class ImageClassifier(nnx.Module):
    """ViT -> pooling ([CLS] token as in `ViTForImageClassification`, or the mean of the patch tokens)
    -> dropout -> linear head."""

    def __init__(self, vit: ViT, num_labels: int, *, pooling: str = "cls", dropout: float = 0.0, rngs: nnx.Rngs):
        check_pooling(pooling)
        self.vit = vit
        self.pooling, self.dropout = pooling, dropout
        self.head = nnx.Linear(vit.config.hidden_size, num_labels, kernel_init=nnx.initializers.normal(0.02),
                               rngs=rngs, kernel_metadata=logical("embed", "classes"), bias_metadata=logical("classes"))

    def pooled(self, pixel_values: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        hidden = self.vit(pixel_values, dropout_rng=None if dropout_rng is None else jax.random.fold_in(dropout_rng, 0))
        return hidden[:, 0] if self.pooling == "cls" else jnp.mean(hidden[:, 1:], axis=1)

    def __call__(self, pixel_values: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        x = self.pooled(pixel_values, dropout_rng=dropout_rng)
        if dropout_rng is not None:
            x = dropout(x, self.dropout, jax.random.fold_in(dropout_rng, 1))
        return self.head(x)


def vit_layout(num_layers: int) -> ParamLayout:
    """Where strategies find the parts of an `ImageClassifier` (the final norm counts as the last block's)."""
    return ParamLayout(embeddings=r"vit/embeddings/", layer=r"vit/layers/{i}/", head=r"head/",
                       num_layers=num_layers, fresh=r"head/")
