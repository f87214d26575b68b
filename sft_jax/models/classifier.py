"""Added layers: a classification head on a pre-trained encoder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sft_jax.models.dropout import dropout
from sft_jax.models.layout import ParamLayout
from sft_jax.models.pooling import check_pooling, mean_pool
from sft_jax.sharding import logical


class EncoderClassifier(nnx.Module):
    """encoder -> pooling (CLS token or masked mean) -> dropout -> linear head (freshly initialised)."""

    def __init__(self, encoder: nnx.Module, hidden_size: int, num_labels: int, *, pooling: str = "mean",
                 dropout: float = 0.1, rngs: nnx.Rngs):
        check_pooling(pooling)
        self.encoder = encoder
        self.pooling, self.dropout = pooling, dropout
        self.head = nnx.Linear(hidden_size, num_labels, kernel_init=nnx.initializers.normal(0.02), rngs=rngs,
                               kernel_metadata=logical("embed", "classes"), bias_metadata=logical("classes"))

    def pooled(self, input_ids, attention_mask, *, dropout_rng=None) -> jax.Array:
        encoder_rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, 0)
        hidden = self.encoder(input_ids, attention_mask, dropout_rng=encoder_rng)
        if self.pooling == "cls":
            return hidden[:, 0].astype(jnp.float32)
        return mean_pool(hidden, attention_mask)

    def __call__(self, input_ids, attention_mask, *, dropout_rng=None) -> jax.Array:
        x = self.pooled(input_ids, attention_mask, dropout_rng=dropout_rng)
        if dropout_rng is not None and self.dropout > 0:
            x = dropout(x, self.dropout, jax.random.fold_in(dropout_rng, 1))
        return self.head(x)

    def embed(self, input_ids, attention_mask, *, dropout_rng=None) -> jax.Array:
        """Mean-pooled sentence embedding of the encoder (the STS-B probe), whatever the head pools."""
        return mean_pool(self.encoder(input_ids, attention_mask, dropout_rng=dropout_rng), attention_mask)


def bert_layout(num_layers: int) -> ParamLayout:
    return ParamLayout(embeddings=r"encoder/embeddings/", layer=r"encoder/layers/{i}/", head=r"head/",
                       num_layers=num_layers, fresh=r"head/")
