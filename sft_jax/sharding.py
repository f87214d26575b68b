"""The device mesh, logical axis names, and the shardings of the train state, batches and activations.

Mesh axes are ("data", "fsdp", "tensor"). Batches are split over data x fsdp. Every parameter names its
dimensions with logical axes (`logical(...)`, flax's `out_sharding` metadata on the `nnx.Param`, e.g. an MLP
kernel is ("embed", "mlp")); `logical_axis_rules` map those names to mesh axes, so one table decides the
layout of every model family. A `(regex, PartitionSpec-tuple)` rule matching a parameter's path overrides its
logical layout. Optimizer moments follow their parameter. Inside a jitted step, `constrain` pins key
activations (residual stream, attention heads, MLP hidden, logits) to the layout the same rules give.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# The logical vocabulary (MaxText / flax style): what a dimension of a parameter or activation is.
LOGICAL_AXES: dict[str, str] = {
    "batch": "examples of a batch (activations)",
    "length": "token or patch positions of a sequence (activations)",
    "embed": "the model width of weight matrices and the token embedding table",
    "vocab": "the token vocabulary (embedding rows, LM head columns, logits)",
    "heads": "query / output attention heads (kernels: heads x head_dim flattened)",
    "kv_heads": "key / value heads of grouped-query attention (kernels: flattened as heads)",
    "head_dim": "the features of one attention head",
    "mlp": "MLP hidden units",
    "norm": "a model-width vector or small table kept whole: norm scales and biases, biases added to the "
            "residual stream, position / token-type / [CLS] embeddings",
    "position": "rows of a position embedding table",
    "token_type": "rows of BERT's token-type embedding table",
    "patch": "the pixels x channels of one flattened image patch",
    "classes": "outputs of a classification head",
    "lora_rank": "the rank of a LoRA adapter",
    "layers": "the layers of a scanned stack of blocks (their parameters stacked along it)",
}

# Megatron-style layouts. FSDP shards every matrix along its model-width dimension (gathered for the matmul, its
# gradient reduce-scattered); tensor parallelism splits attention heads, MLP hidden units and the vocabulary:
# q/k/v and up/gate by output column, o and down by input row, so each block needs one reduction. Names
# mapped to None (norm, head_dim, lora_rank, ...) stay replicated, as do names a rule set leaves out (all are
# listed here so that flax's `nnx.get_partition_spec` under `nnx.logical_axis_rules` reads them the same way).
# Adapters follow the dimension they share with their base kernel. A mesh axis shards at most one dimension
# of an array, the first one claiming it: the residual stream (batch, length, embed) is split over the batch.
DEFAULT_LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("length", None),
    ("head_dim", None),
    ("norm", None),
    ("position", None),
    ("token_type", None),
    ("patch", None),
    ("classes", None),
    ("lora_rank", None),
    ("layers", None),
)

LogicalRules = Sequence[tuple[str, "str | Sequence[str] | None"]]


def logical(*names: str | None) -> dict:
    """`nnx.Param` metadata naming each dimension of a parameter with a logical axis (None: never sharded).

    It is flax's `out_sharding` with eager sharding off: models are built outside any mesh, and the names are
    resolved when the train state is sharded (`param_shardings`). `nnx.get_partition_spec` under
    `nnx.logical_axis_rules` reads the same metadata."""
    unknown = [n for n in names if n is not None and n not in LOGICAL_AXES]
    if unknown:
        raise ValueError(f"unknown logical axes {unknown}; expected some of {sorted(LOGICAL_AXES)}")
    return {"out_sharding": tuple(names), "eager_sharding": False}


def _mesh_axes(value) -> tuple[str, ...]:
    return () if value is None else (value,) if isinstance(value, str) else tuple(value)


def _checked_mesh_axes(value, key: str, what: str) -> tuple[str, ...]:
    """`value` (a mesh axis, a tuple of them, or None) as a tuple; a ValueError naming `key` otherwise."""
    if not (value is None or isinstance(value, str)
            or (isinstance(value, (tuple, list)) and all(isinstance(a, str) for a in value))):
        raise ValueError(f"config.{key}: {what!r} -> {value!r}; expected a mesh axis, a tuple of them, or None")
    bad = [a for a in _mesh_axes(value) if a not in AXES]
    if bad:
        raise ValueError(f"config.{key}: {what!r} -> unknown mesh axes {bad}; expected some of {AXES}")
    return _mesh_axes(value)


def check_logical_rules(rules: LogicalRules, key: str = "logical_axis_rules") -> dict[str, tuple[str, ...]]:
    """`rules` as {logical name: mesh axes}; a one-line ValueError naming `key` when an entry is malformed,
    names an unknown logical or mesh axis, or repeats a logical name."""
    table: dict[str, tuple[str, ...]] = {}
    for entry in rules:
        if not isinstance(entry, (tuple, list)) or len(entry) != 2 or not isinstance(entry[0], str):
            raise ValueError(f"config.{key}: {entry!r} is not a (logical axis, mesh axes) pair")
        name, value = entry
        if name not in LOGICAL_AXES:
            raise ValueError(f"config.{key}: unknown logical axis {name!r}; expected one of {sorted(LOGICAL_AXES)}")
        if name in table:
            raise ValueError(f"config.{key}: logical axis {name!r} appears twice")
        table[name] = _checked_mesh_axes(value, key, name)
    return table


def check_regex_rules(rules: Sequence[tuple[str, tuple]], key: str = "sharding_rules") -> None:
    """A one-line ValueError naming `key` when a `(regex, PartitionSpec-tuple)` rule is malformed, its regex
    does not compile, or it names an unknown mesh axis."""
    for entry in rules:
        if (not isinstance(entry, (tuple, list)) or len(entry) != 2 or not isinstance(entry[0], str)
                or not isinstance(entry[1], (tuple, list))):
            raise ValueError(f"config.{key}: {entry!r} is not a (regex, partition-spec tuple) pair")
        try:
            re.compile(entry[0])
        except re.error as e:
            raise ValueError(f"config.{key}: bad regex {entry[0]!r}: {e}") from None
        for axes in entry[1]:
            _checked_mesh_axes(axes, key, entry[0])


def logical_spec(names: Sequence[str | None], rules: LogicalRules = DEFAULT_LOGICAL_RULES, mesh: Mesh | None = None,
                 shape: Sequence[int] | None = None) -> P:
    """The PartitionSpec of an array whose dimensions have logical `names`, under `rules`.

    A mesh axis shards at most one dimension (the first claiming it). With `mesh` and `shape`, a dimension
    whose size the mesh axes do not divide is left unsharded rather than failing."""
    table = check_logical_rules(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        if name is not None and name not in LOGICAL_AXES:
            raise ValueError(f"unknown logical axis {name!r}; expected one of {sorted(LOGICAL_AXES)}")
        axes = table.get(name, ()) if name is not None else ()
        if used.intersection(axes):
            axes = ()
        used.update(axes)
        if axes and mesh is not None and shape is not None and not _divides(mesh, axes, shape[i]):
            axes = ()
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:  # P("fsdp", None) and P("fsdp") are the same layout; keep the short one
        spec.pop()
    return P(*spec)


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
                    shapes: Mapping[str, tuple[int, ...]] | None = None, *,
                    axes: Mapping[str, tuple] | None = None,
                    logical_rules: LogicalRules = DEFAULT_LOGICAL_RULES) -> dict:
    """NamedSharding per parameter: from the first `(regex, spec)` rule matching its path, else from its
    logical `axes` (e.g. `ModelDef.axes`) under `logical_rules`, else replicated.

    With `shapes`, a dimension whose size the named mesh axes do not divide is left unsharded rather than
    failing (e.g. SmolLM2's 3 KV heads x 64 = 192 columns split 8 ways is fine, 9 heads over 4 is not)."""
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]
    axes = axes or {}
    out = {}
    for name in names:
        shape = None if shapes is None else shapes[name]
        spec = next((s for pattern, s in compiled if pattern.search(name)), None)
        if spec is None and axes.get(name):
            out[name] = NamedSharding(mesh, logical_spec(axes[name], logical_rules, mesh, shape))
            continue
        spec = tuple(spec or ())
        if shape is not None:
            spec = tuple(a if i < len(shape) and _divides(mesh, a, shape[i]) else None for i, a in enumerate(spec))
        out[name] = NamedSharding(mesh, P(*spec))
    return out


def run_param_shardings(config, mesh: Mesh, names: Sequence[str], shapes: Mapping[str, tuple[int, ...]],
                        axes: Mapping[str, tuple]) -> dict:
    """The parameter layout a run's config asks for: its regex `sharding_rules` first; then, with
    `sharding_preset="auto"`, the parameters' logical `axes` under its `logical_axis_rules`; else replicated.
    The trainer lays out its state with it, and a task that loads weights straight onto the mesh does too;
    so this is also where a batch size the mesh cannot split is refused (`check_batch_sizes`)."""
    check_batch_sizes(config, mesh)
    return run_param_layout(config, mesh, names, shapes, axes)


def run_param_layout(config, mesh: Mesh, names: Sequence[str], shapes: Mapping[str, tuple[int, ...]],
                     axes: Mapping[str, tuple]) -> dict:
    """`run_param_shardings` without the batch check: a finished run's parameters laid out on another mesh (its
    export)."""
    logical_rules = run_logical_rules(config)
    return param_shardings(names, mesh, tuple(config.sharding_rules), shapes=shapes,
                           axes=axes if logical_rules is not None else None, logical_rules=logical_rules or ())


def check_batch_sizes(config, mesh: Mesh) -> None:
    """Batches are split over the devices of the mesh's batch axes: a batch size they do not divide is refused
    in one line naming the key, before anything is compiled (jax's own error comes at the first step)."""
    n = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    for key in ("batch_size", "eval_batch_size"):
        if config[key] % n:
            raise ValueError(f"config.{key}: {config[key]} examples do not split evenly over the {n} devices of "
                             f"the mesh's batch axes (data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}); "
                             f"use a multiple of {n}, or set config.mesh")


def run_logical_rules(config) -> LogicalRules | None:
    """A run's logical axis rules (None where `sharding_preset` is not "auto": regex rules only)."""
    return tuple(config.logical_axis_rules) if config.sharding_preset == "auto" else None


def _divides(mesh: Mesh, axes, size: int) -> bool:
    if axes is None:
        return True
    return size % int(np.prod([mesh.shape[a] for a in _mesh_axes(axes)])) == 0


# The mesh and rules that `constrain` applies, set while a step is traced (see `activation_sharding`).
_ACTIVATIONS: contextvars.ContextVar[tuple[Mesh, LogicalRules] | None] = contextvars.ContextVar(
    "sft_jax_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: LogicalRules = DEFAULT_LOGICAL_RULES) -> Iterator[None]:
    """Within this context, `constrain` in model code pins activations to `rules` on `mesh`.

    `make_train_step` / `make_eval_step` enter it inside the jitted function, so it is active exactly while
    the step is traced; a model called anywhere else (tests, generation, eager code) is unconstrained."""
    check_logical_rules(rules)
    token = _ACTIVATIONS.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVATIONS.reset(token)


def active_activation_sharding() -> tuple[Mesh, LogicalRules] | None:
    """The (mesh, rules) of the `activation_sharding` being traced, None outside one (for a kernel that must
    run per shard under `jax.shard_map`, as splash attention does)."""
    return _ACTIVATIONS.get()


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """`x` with a sharding constraint from its dimensions' logical `names` (e.g. "batch", "length",
    "embed"), under the active `activation_sharding`. The identity without one, outside jit, or on a
    one-device mesh, so a model computes exactly the same there."""
    active = _ACTIVATIONS.get()
    if active is None or not isinstance(x, jax.core.Tracer) or active[0].size == 1:
        return x
    mesh, rules = active
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} logical axes {names} for an array of shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_spec(names, rules, mesh, x.shape)))


def _fits(sharding: NamedSharding, shape: tuple[int, ...]) -> bool:
    try:
        sharding.shard_shape(shape)
    except Exception:  # noqa: BLE001 (jax's IndivisibleError): the mesh axes do not divide this shape
        return False
    return True


def tree_shardings(tree, params_sharding: Mapping[str, NamedSharding], mesh: Mesh):
    """Shardings for a pytree (e.g. optimizer state) whose leaves sit under parameter names: they follow
    that parameter where its layout divides the leaf (moments, 8-bit codes); everything else (counts, scalars,
    per-block scales) is replicated."""
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        for key in reversed(path):
            name = getattr(key, "key", None)
            if name in params_sharding:
                sharding = params_sharding[name]
                shape = tuple(getattr(leaf, "shape", ()))
                if len(sharding.spec) <= len(shape) and _fits(sharding, shape):
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
    """A value every process holds in full (e.g. pre-trained weights), or a global array already (weights
    streamed onto the mesh) -> a global array with `sharding`."""
    if jax.process_count() == 1 or (isinstance(value, jax.Array) and not value.is_fully_addressable):
        return jax.device_put(value, sharding)  # a global array already: resharded (a no-op if it matches)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(x) -> np.ndarray:
    """The full value of a global array on every process (gathered across processes when sharded)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
