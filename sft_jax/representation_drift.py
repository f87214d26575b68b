"""How far the fine-tuned model's computations moved from the pre-trained model's, on fixed reference inputs
(`config.drift.cka`, `config.drift.kl`; the weight-space view is `sft_jax.drift`).

  drift/cka/block_I     linear CKA (Kornblith et al. 2019) between block I's output hidden states of the
                        pre-trained and of the current model, over the real (non-padding) tokens of the
                        reference inputs: 1 when the two representations agree up to a rotation and a scale
  drift/cka/mean        its mean over the blocks
  drift/kl_next_token   decoders: KL(pre-trained || current) of the next-token distributions, the mean over
                        the real tokens of the reference inputs

The reference inputs are the first `drift.reference_examples` evaluation examples, one batch, the same at
every evaluation (`Task.reference_inputs`). The pre-trained model is the current parameters with the trained
tensors set back to their pre-trained values (a host copy, put on the devices for the probe): frozen tensors
are shared, so a LoRA or partial run costs little; full fine-tuning holds a second copy of the weights on the
devices while the probe runs. Both forward passes run in one jitted function compiled once.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax import sharding
from sft_jax.models import block_outputs
from sft_jax.state import ModelDef

_HIGHEST = jax.lax.Precision.HIGHEST  # float32 sums of products: TF32 / bfloat16 passes would blur a CKA near 1


def linear_cka(x: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
    """Linear CKA of two representations of the same tokens: x [..., Dx], y [..., Dy], `mask` [...] 1 where a
    token counts (padding 0). With X, Y the counted rows centred over them,
    CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) (Kornblith et al. 2019, eq. 5, in feature space)."""
    w = mask.reshape(-1).astype(jnp.float32)
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    y = y.reshape(-1, y.shape[-1]).astype(jnp.float32)
    count = jnp.maximum(w.sum(), 1.0)
    x = (x - (w @ x) / count) * w[:, None]
    y = (y - (w @ y) / count) * w[:, None]
    cross = jnp.sum(jnp.square(jnp.matmul(y.T, x, precision=_HIGHEST)))
    xx = jnp.linalg.norm(jnp.matmul(x.T, x, precision=_HIGHEST))
    yy = jnp.linalg.norm(jnp.matmul(y.T, y, precision=_HIGHEST))
    return cross / jnp.maximum(xx * yy, jnp.finfo(jnp.float32).tiny)


def kl_next_token(base_logits: jax.Array, logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over the tokens where `mask` is 1 of KL(p || q), p = softmax(base_logits), q = softmax(logits), in
    nats (logits [..., V], mask [...])."""
    log_p = jax.nn.log_softmax(base_logits.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    per_token = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    w = mask.astype(jnp.float32)
    return jnp.sum(per_token * w) / jnp.maximum(w.sum(), 1.0)


def _compare(params: dict, base: dict, batch: dict, mask: jax.Array, *, model_def: ModelDef, forward: Callable,
             cka: bool, kl: bool, logical_rules, mesh) -> dict[str, jax.Array]:
    """The drift metrics of `params` against `base` on one reference batch (traced once by `jax.jit`)."""
    with sharding.activation_sharding(mesh, logical_rules) if logical_rules else contextlib.nullcontext():
        with block_outputs.recording() as ours:
            logits = forward(model_def.merge(params), batch)
        with block_outputs.recording() as theirs:
            base_logits = forward(model_def.merge(base), batch)
    out = {}
    if cka:
        out["cka"] = jnp.stack([linear_cka(b, o, mask) for b, o in zip(theirs, ours, strict=True)])
    if kl:
        out["kl"] = kl_next_token(base_logits, logits, mask)
    return out


class RepresentationDrift:
    """params -> {drift/cka/block_I, drift/cka/mean, drift/kl_next_token} against the pre-trained model.

    `pretrained` holds host copies of at least the `trainable` tensors' pre-trained values; `task` gives the
    reference inputs and how its model runs on them (`Task.reference_inputs`, `Task.reference_forward`)."""

    def __init__(self, task, pretrained: Mapping[str, np.ndarray], trainable: tuple[str, ...], *, count: int,
                 cka: bool, kl: bool, p_shard: Mapping, b_shard: jax.sharding.NamedSharding, logical_rules=None):
        mesh = b_shard.mesh
        split = int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))
        rows = -(-count // split) * split  # the batch axes split the rows evenly
        batch, mask = task.reference_inputs(count, rows)
        self._batch = sharding.put_batch(batch, b_shard)
        self._mask = sharding.put_batch({"mask": np.asarray(mask, np.float32)}, b_shard)["mask"]
        self._base = {k: pretrained[k] for k in trainable}
        self._p_shard = p_shard
        self._cka, self._kl = cka, kl
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self._fn = jax.jit(functools.partial(_compare, model_def=task.model_def, forward=task.reference_forward,
                                             cka=cka, kl=kl, logical_rules=logical_rules, mesh=mesh),
                           out_shardings=replicated)

    def __call__(self, params: dict) -> dict[str, float]:
        # The frozen tensors are the pre-trained ones already; the trained ones go back to their start.
        base = {k: sharding.put_global(self._base[k], self._p_shard[k]) if k in self._base else v
                for k, v in params.items()}
        out = jax.device_get(self._fn(params, base, self._batch, self._mask))
        metrics = {}
        if self._cka:
            per_block = [float(v) for v in np.asarray(out["cka"])]
            metrics.update({f"drift/cka/block_{i}": v for i, v in enumerate(per_block)})
            metrics["drift/cka/mean"] = float(np.mean(per_block))
        if self._kl:
            metrics["drift/kl_next_token"] = float(out["kl"])
        return metrics
