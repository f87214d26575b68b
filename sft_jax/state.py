"""TrainState and the bridge between an NNX module and a flat {path: array} parameter dict.

Parameters live in the train state as a flat dict keyed by path ("encoder/layers/0/attention/query/kernel"):
regex rules, shardings, checkpoints and the trainable/frozen split all work on these names directly.
`ModelDef` rebuilds the module from such a dict inside jit (the graph is static, traced once).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _path_name(path) -> str:
    # Variables flatten to their `.value` (a GetAttrKey); the name is the chain of dict keys before it.
    return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """The static part of a model: its graph and the structure of its parameter state."""

    graphdef: Any
    treedef: Any
    names: tuple[str, ...]
    # The logical axis names of each parameter's dimensions (`sharding.logical`); absent when unannotated.
    axes: dict[str, tuple] = dataclasses.field(default_factory=dict)

    @classmethod
    def split(cls, module: nnx.Module) -> tuple[ModelDef, dict[str, jax.Array]]:
        graphdef, state = nnx.split(module, nnx.Param)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
        names = tuple(_path_name(path) for path, _ in leaves)
        if len(set(names)) != len(names):
            raise ValueError("parameter paths are not unique")
        variables = jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        axes = {name: tuple(v.get_metadata()["out_sharding"]) for name, v in zip(names, variables)
                if v.get_metadata().get("out_sharding")}
        return cls(graphdef, treedef, names, axes), dict(zip(names, (leaf for _, leaf in leaves)))

    def merge(self, params: dict[str, jax.Array]) -> nnx.Module:
        state = jax.tree_util.tree_unflatten(self.treedef, [params[name] for name in self.names])
        return nnx.merge(self.graphdef, state)

    def __hash__(self):  # identity hash: used as a static jit argument
        return id(self)

    def __eq__(self, other):
        return self is other


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict[str, jax.Array]
    opt_state: Any
    rng: jax.Array  # raw uint32 key data (checkpointable); dropout keys are folded in per step
    # Frozen parameters the model only ever reads cast to a narrower compute dtype (bfloat16), cast once:
    # the train step reads these instead of casting the float32 ones every step. Derived, never
    # checkpointed; `train_step.with_compute_params` builds it. Empty by default (float32, full fine-tuning).
    compute_params: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
    # Mixed precision (`config.master_dtype`): float32 copies of the trained parameters stored narrower
    # (bfloat16). The optimizer updates these; the parameters the model reads are their casts, refreshed each
    # step, so updates below a bfloat16 parameter's resolution still add up. Checkpointed. Empty by default.
    master: dict[str, jax.Array] = dataclasses.field(default_factory=dict)


def count_params(params: dict[str, Any], names=None) -> int:
    names = params.keys() if names is None else names
    return int(sum(np.prod(params[n].shape) for n in names))


def _checksum(x: jax.Array) -> jax.Array:
    """Two uint32 sums of an array's bits: plain, and weighted by position (so moved values count too).
    Integer sums wrap and are exact in any order: the same under any sharding, computed where the array lives."""
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= x.shape[axis]
    mixed = bits * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(mixed * (2 * index + 1), dtype=jnp.uint32)])


# One program per array shape, dtype and layout (a model has few), not one over the whole dict: compiling that
# took seconds for a few hundred arrays, at each process's first checkpoint save and restore. Arrays spread over
# several devices take the one program over all of them: separate programs, each with its own cross-device sum,
# run concurrently and wait for each other's devices (XLA:CPU aborted at its rendezvous; a multi-host run hung).
_checksum_jit = jax.jit(_checksum)
_checksums = jax.jit(lambda arrays: {k: _checksum(v) for k, v in arrays.items()})


def array_checksums(params: dict[str, jax.Array], names) -> dict[str, str]:
    """{name: 16 hex digits} of the bits of each of `names`: a cheap, device-side check that two sets of arrays
    (a rebuilt frozen base and the one a run trained on) are bit-identical, without copying them to the host."""
    from sft_jax.sharding import to_host

    names = list(names)
    if all(not isinstance(params[n], jax.Array) or len(params[n].sharding.device_set) == 1 for n in names):
        values = jax.device_get([_checksum_jit(params[n]) for n in names])  # one transfer for all
    else:
        sums = _checksums({n: params[n] for n in names})
        values = [to_host(sums[n]) for n in names]
    return {n: "".join(f"{int(v):08x}" for v in np.asarray(s)) for n, s in zip(names, values)}


def params_fingerprint(params: dict[str, Any]) -> str:
    """A short hash of all parameter bytes: equal fingerprints mean bit-identical parameters."""
    import hashlib

    from sft_jax.sharding import to_host

    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(to_host(params[name]).tobytes())
    return h.hexdigest()[:16]
