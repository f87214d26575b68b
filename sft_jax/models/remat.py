"""Activation rematerialisation per block: what the backward pass keeps from the forward pass of each layer.

`config.remat` names a policy; every model whose blocks run through `run_block` (decoders, BERT-family and
ModernBERT encoders, ViT) honours it through its `remat` attribute, which `set_remat` sets. The block's
function is wrapped in `jax.checkpoint` with the policy:

- `none`: no wrapping; every intermediate the backward pass needs is kept (fastest, most memory).
- `full`: nothing inside a block is kept; the block's forward runs again in the backward pass. Only the block
  inputs (the residual stream, one [B, T, H] per layer) stay alive.
- `dots`: the outputs of the projections (`mixed.PROJECTION`: every linear layer's x @ kernel) are kept, the
  rest (norms, activations, attention probabilities) recomputed: most of the saving for a fraction of the
  recompute.
- `offload`: as `dots`, but the kept matmul outputs go to pinned host memory until the backward pass needs
  them (where the backend has such memory; `check_backend` says where it does not).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from sft_jax.models import block_outputs
from sft_jax.models.mixed import PROJECTION

REMAT = ("none", "full", "dots", "offload")


def policy(name: str) -> Callable[..., bool] | None:
    """The `jax.checkpoint` policy of a `config.remat` name (None for "full": save nothing)."""
    policies = jax.checkpoint_policies
    if name == "full":
        return policies.nothing_saveable
    if name == "dots":
        return policies.save_only_these_names(PROJECTION)
    if name == "offload":
        return policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=[PROJECTION], offload_src="device",
            offload_dst="pinned_host")
    raise ValueError(f"config.remat: {name!r} is not one of {REMAT}")


def check_backend(name: str, devices=None) -> None:
    """Refuses `offload` where the devices have no pinned host memory to offload to."""
    if name != "offload":
        return
    for device in devices if devices is not None else jax.devices():
        kinds = {m.kind for m in device.addressable_memories()}
        if "pinned_host" not in kinds:
            raise ValueError(f"config.remat='offload': {device.platform} device {device.id} has no pinned host "
                             f"memory (it has {sorted(kinds)}); use remat='dots' or 'full'")


def run_block(layer: nnx.Module, remat: str, *args: Any, **kwargs: Any) -> Any:
    """`layer(*args, **kwargs)`, its activations kept as the `remat` policy says. Arguments must be arrays or
    None (they are traced); the layer must not change its own state (dropout keys come in as arguments). Under
    `block_outputs.recording` its output is recorded (the per-block hidden states of representation drift)."""
    if remat == "none":
        return block_outputs.record(layer(*args, **kwargs))
    graphdef, state = nnx.split(layer)

    def forward(state, args, kwargs):
        return nnx.merge(graphdef, state)(*args, **kwargs)

    return block_outputs.record(jax.checkpoint(forward, policy=policy(remat), prevent_cse=True)(state, args, kwargs))


def set_remat(model: nnx.Module, remat: str) -> int:
    """Sets the remat policy of every module of `model` that runs blocks (those with a `remat` attribute);
    returns how many there were (0: this model does not support remat)."""
    if remat not in REMAT:
        raise ValueError(f"config.remat: {remat!r} is not one of {REMAT}")
    count = 0
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "remat") and isinstance(module.remat, str):
            module.remat = remat
            count += 1
    return count
