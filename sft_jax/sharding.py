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

# Megatron-style layouts. FSDP shards every matrix along one dimension (gathered for the matmul, its gradient
# reduce-scattered); tensor parallelism splits attention heads and the MLP hidden units: q/k/v and gate/up by
# output column, o and down by input row, so each block needs one reduction. Norms and biases of the residual
# stream stay replicated. Adapters follow the dimension they share with their base kernel.
DECODER_RULES: tuple[tuple[str, tuple], ...] = (
    (r"^embed/embedding$", ("tensor", "fsdp")),
    (r"^lm_head/kernel$", ("fsdp", "tensor")),
    (r"attn/(q|k|v)/kernel$", ("fsdp", "tensor")),
    (r"attn/o/kernel$", ("tensor", "fsdp")),
    (r"mlp/(gate|up)/kernel$", ("fsdp", "tensor")),
    (r"mlp/down/kernel$", ("tensor", "fsdp")),
    (r"(attn/(q|k|v)|mlp/(gate|up))/lora_a$", ("fsdp", None)),
    (r"(attn/(q|k|v)|mlp/(gate|up))/lora_b$", (None, "tensor")),
    (r"(attn/o|mlp/down)/lora_a$", ("tensor", None)),
    (r"(attn/o|mlp/down)/lora_b$", (None, "fsdp")),
)
BERT_RULES: tuple[tuple[str, tuple], ...] = (
    (r"embeddings/word_embeddings/embedding$", ("tensor", "fsdp")),
    (r"attention/(query|key|value)/kernel$", ("fsdp", "tensor")),
    (r"attention/(query|key|value)/bias$", ("tensor",)),
    (r"attention/out/kernel$", ("tensor", "fsdp")),
    (r"mlp/up/kernel$", ("fsdp", "tensor")),
    (r"mlp/up/bias$", ("tensor",)),
    (r"mlp/down/kernel$", ("tensor", "fsdp")),
    (r"^head/kernel$", ("fsdp", None)),
)


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


def param_shardings(names: Sequence[str], mesh: Mesh, rules: Sequence[tuple[str, tuple]] = (),
                    shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict:
    """NamedSharding per parameter from the first matching `(regex, spec)` rule (replicated when none does).

    With `shapes`, a dimension whose size the named mesh axes do not divide is left unsharded rather than
    failing (e.g. SmolLM2's 3 KV heads x 64 = 192 columns split 8 ways is fine, 9 heads over 4 is not)."""
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]
    out = {}
    for name in names:
        spec = tuple(next((s for pattern, s in compiled if pattern.search(name)), ()))
        if shapes is not None:
            shape = shapes[name]
            spec = tuple(axes if i < len(shape) and _divides(mesh, axes, shape[i]) else None
                         for i, axes in enumerate(spec))
        out[name] = NamedSharding(mesh, P(*spec))
    return out


def _divides(mesh: Mesh, axes, size: int) -> bool:
    if axes is None:
        return True
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return size % int(np.prod([mesh.shape[a] for a in names])) == 0


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


def process_rows(sharding: NamedSharding, global_rows: int) -> slice:
    """The rows of a global batch that this process's devices hold under `sharding` (contiguous: the mesh
    lists each process's devices together, as `jax.devices()` orders them)."""
    spans = {idx[0].indices(global_rows)[:2]
             for idx in sharding.addressable_devices_indices_map((global_rows,)).values()}
    spans = sorted(spans)
    if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        raise ValueError(f"this process's devices hold non-contiguous batch rows {spans}")
    return slice(spans[0][0], spans[-1][1])


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Global host batch -> global array sharded over the batch axes.

    With several processes each one transfers only its own rows and the global array is assembled with
    `jax.make_array_from_process_local_data` (no process ever holds another's device data)."""
    if jax.process_count() == 1:
        return {k: jax.device_put(v, sharding) for k, v in batch.items()}
    out = {}
    for k, v in batch.items():
        rows = process_rows(sharding, v.shape[0])
        out[k] = jax.make_array_from_process_local_data(sharding, np.asarray(v[rows]), v.shape)
    return out


def put_global(value, sharding: NamedSharding) -> jax.Array:
    """A value every process holds in full (e.g. pre-trained weights) -> a global array with `sharding`."""
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(x) -> np.ndarray:
    """The full value of a global array on every process (gathered across processes when sharded)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
