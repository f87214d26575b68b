"""Know before launching whether a run fits: the train step of a config, compiled ahead of time on abstract
arrays (no weight or data file is read), and what each device will hold.

`plan(config)` builds the run's model from its `config.json` alone (shapes), applies the strategy (LoRA
adapters, an untied head), the storage dtype, remat and the loss chunking, lays parameters and optimizer
state out over the devices as the trainer would (`sharding.run_param_shardings`), and compiles the real
`make_train_step` for a full batch of the longest bucket. Per device it reports parameter, optimizer-state
(float32 masters of `config.master_dtype` included) and compute-copy bytes (from each array's shard shape),
the compiled step's temporaries (XLA's memory analysis), their total against the device's memory, and the
model FLOPs of a step (`sft_jax.flops`).

The command line, `python -m sft_jax.plan`, compiles for N simulated CPU devices: XLA:CPU's memory analysis of
the same program. Attention is what `config.attention` gives on the devices' platform: on CPU, `auto` is the
blocked XLA attention, which needs more than a fused GPU kernel, so the plan errs on the safe side. XLA:CPU
also converts bfloat16 weights to float32 for its dots, and for scanned layers keeps the float32 copy of the
whole stack: those copies are reported apart and left out of the total (`plan/upcasts.py`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sft_jax import optim, sharding, strategies
from sft_jax.config_defaults import validate
from sft_jax.flops import decoder_flops_model, step_flops
from sft_jax.models import remat as remat_lib
from sft_jax.models.decoder import DecoderConfig, DecoderLM
from sft_jax.models.finetuned import adapt_lm, decoder_layout
from sft_jax.models.fused_attention import choose, set_attention
from sft_jax.models.registry import resolve_model_dir
from sft_jax.models.scan import segment_sizes
from sft_jax.plan.upcasts import cpu_upcast_bytes
from sft_jax.state import ModelDef, TrainState
from sft_jax.tasks.language_model import loss_fn as lm_loss_fn
from sft_jax.train_step import compute_cast_plan, make_train_step
from sft_jax.trainer.setup import make_optimizer, master_names, storage_dtype

GB = 1e9
TASKS = ("language_modeling", "sft")


@dataclasses.dataclass
class Plan:
    """Per-device bytes of a run's train step and what they add up to."""

    devices: int
    mesh: dict[str, int]
    params: int  # parameter bytes per device (their shards)
    optimizer: int  # optimizer-state bytes per device, with the float32 masters (`config.master_dtype`)
    compute_copies: int  # frozen weights cast once to the compute dtype (bfloat16 runs)
    batch: int
    temporaries: int  # the compiled step's temporary buffers (XLA memory analysis), less `cpu_upcasts`
    cpu_upcasts: int  # float32 copies of bfloat16 weights only XLA:CPU makes (plan/upcasts.py): not counted
    total: int
    device_memory: int
    flops_per_step: float
    tokens_per_step: int
    total_params: int
    trainable_params: int
    attention: str

    @property
    def fits(self) -> bool:
        return self.total <= self.device_memory

    def to_json(self) -> dict[str, Any]:
        return {"per_device_bytes": {"params": self.params, "optimizer": self.optimizer,
                                     "compute_copies": self.compute_copies, "batch": self.batch,
                                     "temporaries": self.temporaries, "total": self.total,
                                     "cpu_upcasts": self.cpu_upcasts},
                "fits": self.fits, "device_memory_bytes": self.device_memory, "flops_per_step": self.flops_per_step,
                "tokens_per_step": self.tokens_per_step, "devices": self.devices, "mesh": self.mesh,
                "total_params": self.total_params, "trainable_params": self.trainable_params,
                "attention": self.attention}

    def table(self) -> str:
        rows = [("parameters", self.params), ("optimizer state", self.optimizer),
                ("compute copies", self.compute_copies), ("batch", self.batch),
                ("temporaries", self.temporaries), ("total", self.total)]
        mesh = " x ".join(f"{k} {v}" for k, v in self.mesh.items() if v > 1) or "1 device"
        lines = [f"per device ({self.devices} devices, mesh {mesh}; attention: {self.attention})"]
        lines += [f"  {name:<16} {value / GB:9.2f} GB" for name, value in rows]
        if self.cpu_upcasts:
            lines.append(f"  (not counted: {self.cpu_upcasts / GB:.2f} GB of float32 copies of bfloat16 weights "
                         "that only XLA:CPU makes)")
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"  {verdict} in {self.device_memory / GB:.0f} GB "
                     f"({100 * self.total / self.device_memory:.0f}%)")
        lines.append(f"model FLOPs per step {self.flops_per_step:.3g} ({self.tokens_per_step} tokens); "
                     f"parameters {self.total_params:,}, trainable {self.trainable_params:,}")
        return "\n".join(lines)


def read_model_config(model: str) -> DecoderConfig:
    """The decoder config of `config.model`: a HF directory or hub id (only its config.json is read), or a
    config.json file."""
    path = pathlib.Path(model)
    config_file = path if path.is_file() and path.suffix == ".json" else resolve_model_dir(model) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no config.json to plan from")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    return DecoderConfig.from_hf(hf)


def _shard_bytes(shape: tuple[int, ...], dtype, spec: jax.sharding.NamedSharding) -> int:
    return int(np.prod(spec.shard_shape(tuple(shape)), dtype=np.int64)) * jnp.dtype(dtype).itemsize


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


@dataclasses.dataclass
class CompiledStep:
    """A run's train step compiled for abstract arrays, with what it was compiled for."""

    compiled: Any  # jax.stages.Compiled: call it with a state and a batch of these shapes and layouts
    state: TrainState  # of jax.ShapeDtypeStruct, each with its sharding
    batch: dict[str, jax.ShapeDtypeStruct]
    mesh: jax.sharding.Mesh
    model_config: DecoderConfig
    trainable: tuple[str, ...]
    tied_head: bool
    # The model's parameters as plain per-layer float arrays (not scanned, not quantised), and the trained ones
    # among them: what FLOPs and parameter counts are counted on.
    logical_shapes: dict[str, tuple[int, ...]]
    logical_trainable: tuple[str, ...]
    attention: str  # the decoder attention compiled (`fused_attention.describe`)


def compile_step(config: ml_collections.ConfigDict, devices=None) -> CompiledStep:
    """The train step of `config` compiled ahead of time on abstract arrays laid out over `devices` (default:
    all), built as the trainer builds it; nothing is read but the model's config.json.

    Raises:
      ValueError: for a task other than language_modeling / sft, or a config the trainer would refuse.
    """
    validate(config)
    if config.task not in TASKS:
        raise ValueError(f"config.task={config.task!r}: the planner covers decoder runs ({', '.join(TASKS)})")
    remat_lib.check_backend(config.remat, devices)
    model_config = dataclasses.replace(read_model_config(config.model), dtype=jnp.dtype(config.dtype))
    platform = (devices[0] if devices is not None else jax.devices()[0]).platform
    attention = choose(config.attention, platform)

    def build():
        lm = adapt_lm(DecoderLM(model_config, rngs=nnx.Rngs(0)), config.strategy, config.lora, config.seed,
                      quantize_base=config.quantize_base, scan_layers=config.scan_layers,
                      frozen_layers=config.frozen_layers)
        remat_lib.set_remat(lm, config.remat)
        set_attention(lm, attention)
        return lm

    model = nnx.eval_shape(build)
    model_def, params = ModelDef.split(model)
    tied = model.lm_head is None
    layout = decoder_layout(model_config.num_layers, segment_sizes(model))
    params = {k: jax.ShapeDtypeStruct(v.shape, storage_dtype(k, v.dtype, config.param_dtype))
              for k, v in params.items()}

    rules = strategies.strategy_rules(config.strategy, layout, config.frozen_layers)
    labels = strategies.label_params(model_def.names, rules)
    trainable = strategies.trainable_names(labels)
    schedule = optim.make_schedule(config.learning_rate, config.max_steps, config.warmup_steps, config.schedule)
    tx, _, _ = make_optimizer(config, labels, layout, schedule)

    mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
    p_shard = sharding.run_param_shardings(config, mesh, model_def.names, {k: v.shape for k, v in params.items()},
                                           model_def.axes)
    masters = {k: jax.ShapeDtypeStruct(params[k].shape, jnp.dtype(config.master_dtype))
               for k in master_names(params, trainable, config.master_dtype)}
    opt_state = jax.eval_shape(tx.init, {**params, **masters})
    opt_shard = sharding.tree_shardings(opt_state, p_shard, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    # A full batch of the longest bucket, every position a target: the most a step can be given.
    rows, length = config.batch_size, max(config.max_length, max(config.buckets))
    batch = {k: jax.ShapeDtypeStruct((rows, length), jnp.int32)
             for k in ("input_ids", "targets", "segment_ids", "positions", "target_index")}
    batch.update(loss_mask=jax.ShapeDtypeStruct((rows, length), jnp.float32),
                 target_weight=jax.ShapeDtypeStruct((rows, length), jnp.float32))
    b_shard = sharding.batch_sharding(mesh)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % shards:
        raise ValueError(f"config.batch_size={rows} does not split over the {shards} batch shards of mesh "
                         f"{dict(mesh.shape)} (data x fsdp)")
    loss_fn = lm_loss_fn(config)
    cast = compute_cast_plan(model_def, loss_fn, params, batch, trainable) if config.dtype != "float32" else {}
    copies = {k: jax.ShapeDtypeStruct(params[k].shape, dtype) for k, dtype in cast.items()}

    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_state,
                       rng=jax.ShapeDtypeStruct((2,), jnp.uint32), compute_params=copies, master=masters)
    state_shard = TrainState(step=replicated, params=p_shard, opt_state=opt_shard, rng=replicated,
                             compute_params={k: p_shard[k] for k in copies}, master={k: p_shard[k] for k in masters})
    step = make_train_step(model_def, tx, loss_fn, trainable, state_sharding=state_shard, batch_sharding=b_shard,
                           accum_steps=config.grad_accum_steps, logical_rules=sharding.run_logical_rules(config))
    state, batch = _abstract(state, state_shard), _abstract(batch, {k: b_shard for k in batch})
    logical = decoder_flops_model(config, model_config)
    return CompiledStep(step.lower(state, batch).compile(), state, batch, mesh, model_config, tuple(trainable), tied,
                        logical.shapes, logical.trainable, attention)


def plan(config: ml_collections.ConfigDict, *, device_memory_gb: float = 80.0, devices=None) -> Plan:
    """The memory and FLOPs of `config`'s train step per device (see the module docstring)."""
    return plan_of(compile_step(config, devices), device_memory_gb)


def plan_of(step: CompiledStep, device_memory_gb: float = 80.0) -> Plan:
    """The `Plan` of a compiled step."""
    memory = step.compiled.memory_analysis()
    state = step.state

    def nbytes(tree) -> int:
        return sum(_shard_bytes(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(tree))

    # The step's outputs alias the donated state; whatever does not (metrics) is small but counted.
    unaliased = max(int(memory.output_size_in_bytes) - int(memory.alias_size_in_bytes), 0)
    platform = step.mesh.devices.flat[0].platform
    # XLA:CPU's float32 copies of bfloat16 weights are part of its temporaries; a GPU or TPU makes none.
    upcasts = cpu_upcast_bytes(step.compiled.as_text()) if platform == "cpu" else 0
    temporaries = int(memory.temp_size_in_bytes) + unaliased - upcasts
    parts = dict(params=nbytes(state.params), optimizer=nbytes(state.opt_state) + nbytes(state.master),
                 compute_copies=nbytes(state.compute_params), batch=nbytes(step.batch))
    c = step.model_config
    attn = {"layers": c.num_layers, "width": c.num_heads * c.head_dim, "causal": True}
    shapes = step.logical_shapes
    rows, length = step.batch["input_ids"].shape
    return Plan(devices=step.mesh.devices.size, mesh=dict(step.mesh.shape), **parts, temporaries=temporaries,
                cpu_upcasts=upcasts,
                total=sum(parts.values()) + temporaries, device_memory=int(device_memory_gb * GB),
                flops_per_step=step_flops(shapes, step.logical_trainable, attn, length, rows * length,
                                          tied_head=step.tied_head),
                tokens_per_step=rows * length, total_params=sum(int(np.prod(s)) for s in shapes.values()),
                trainable_params=sum(int(np.prod(shapes[k])) for k in step.logical_trainable),
                attention=f"{step.attention} ({platform})")
