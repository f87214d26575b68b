"""The device mesh and shardings of the train state and batches.

Mesh axes are ("data", "fsdp", "tensor"). Batches are split over data x fsdp. A parameter's sharding comes
from the first `(regex, PartitionSpec-tuple)` rule matching its path (replicated when none does), and its
optimizer moments follow it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(shape: Mapping[str, int] | None = None, devices=None) -> Mesh:
    """A mesh with axis sizes from `shape`; one axis may be -1 (all remaining devices).

    A mesh smaller than the device count uses the first devices (e.g. {"data": 1}: one device)."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    shape = dict(shape or {"data": -1})
    unknown = set(shape) - set(AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected {AXES}")
    sizes = [shape.get(a, 1) for a in AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shape}")
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if devices.size % fixed:
            raise ValueError(f"{devices.size} devices do not divide into mesh {shape}")
        sizes[sizes.index(-1)] = devices.size // fixed
    if int(np.prod(sizes)) < devices.size and -1 not in shape.values():
        devices = devices.reshape(-1)[: int(np.prod(sizes))]
    if int(np.prod(sizes)) != devices.size:
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices, have {devices.size}")
    return Mesh(devices.reshape(sizes), AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def param_shardings(names: Sequence[str], mesh: Mesh, rules: Sequence[tuple[str, tuple]] = ()) -> dict:
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]
    out = {}
    for name in names:
        spec = next((s for pattern, s in compiled if pattern.search(name)), ())
        out[name] = NamedSharding(mesh, P(*spec))
    return out


def tree_shardings(tree, params_sharding: Mapping[str, NamedSharding], mesh: Mesh):
    """Shardings for a pytree (e.g. optimizer state) whose leaves sit under parameter names: they follow
    that parameter when the shapes agree; everything else (counts, scalars) is replicated."""
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        for key in reversed(path):
            name = getattr(key, "key", None)
            if name in params_sharding:
                sharding = params_sharding[name]
                if len(sharding.spec) <= len(getattr(leaf, "shape", ())):
                    return sharding
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Host batch -> global array sharded over the batch axes (single process)."""
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}
