"""Everything between a built task and the first step: optimizer, mesh and shardings, the initial (or
restored) train state, and the compiled train and eval steps."""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from sft_jax import cpu_matmul_choice, distributed, groups, optim, regularizers, sharding, storage, strategies
from sft_jax.checkpoint import Checkpoints, FrozenBase
from sft_jax.models import fused_attention
from sft_jax.models import remat as remat_lib
from sft_jax.models.layout import in_storage_dtype as in_storage_dtype  # re-exported (their home before)
from sft_jax.models.layout import storage_dtype as storage_dtype
from sft_jax.state import ModelDef, TrainState
from sft_jax.tasks.base import Task
from sft_jax.train_step import (
    CPU_MATMULS,
    compiler_options,
    compute_cast_plan,
    make_eval_step,
    make_train_step,
    with_compute_params,
)
from sft_jax.trainer import fork


def master_names(params: dict, trainable, master_dtype: str = "none") -> tuple[str, ...]:
    """The trained parameters that get a `master_dtype` master copy (`TrainState.master`): those stored in a
    narrower floating dtype (bfloat16 weights of `param_dtype`); none for master_dtype="none"."""
    if master_dtype == "none":
        return ()
    wide = jnp.dtype(master_dtype)
    return tuple(k for k in trainable if jnp.issubdtype(params[k].dtype, jnp.floating)
                 and jnp.dtype(params[k].dtype).itemsize < wide.itemsize)


def init_state(params: dict, tx, p_shard: dict | None = None, mesh: jax.sharding.Mesh | None = None, seed: int = 0,
               *, master: tuple[str, ...] = (), master_dtype: str = "float32") -> tuple[TrainState, TrainState]:
    """The initial train state laid out over `mesh` (parameters per `p_shard`, optimizer moments following
    their parameters) and the matching tree of shardings, for `make_train_step`. Without them: a mesh over
    all devices with every parameter replicated.

    Parameters named in `master` (`master_names`) get a `master_dtype` copy, sharded as they are, which the
    optimizer steps in their place (its moments take the master's dtype); it starts as the stored value, so
    the first forward pass is the same with or without it."""
    mesh = sharding.make_mesh() if mesh is None else mesh
    if p_shard is None:
        p_shard = sharding.param_shardings(list(params), mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = {k: sharding.put_global(v, p_shard[k]) for k, v in params.items()}
    m_shard = {k: p_shard[k] for k in master}
    masters = jax.jit(lambda p: {k: p[k].astype(master_dtype) for k in master}, out_shardings=m_shard)(
        {k: params[k] for k in master}) if master else {}
    opt_params = {**params, **masters}  # what the optimizer steps
    opt_shard = sharding.tree_shardings(jax.eval_shape(tx.init, opt_params), p_shard, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_shard)(opt_params)
    state = TrainState(step=sharding.put_global(np.zeros((), np.int32), replicated), params=params,
                       opt_state=opt_state,
                       rng=sharding.put_global(jax.random.key_data(jax.random.key(seed)), replicated), master=masters)
    return state, TrainState(step=replicated, params=p_shard, opt_state=opt_shard, rng=replicated, master=m_shard)


def with_model_options(model_def: ModelDef, params: dict, config: ml_collections.ConfigDict) -> ModelDef:
    """`model_def` with the run's model-wide options: every block under the `config.remat` policy
    (`models/remat.py`) and decoder attention as `config.attention` chooses (`models/fused_attention.py`)."""
    attention = fused_attention.choose(config.attention)
    if config.remat == "none" and attention == "blocked":
        return model_def
    model = model_def.merge(params)
    if config.remat != "none":
        remat_lib.check_backend(config.remat)
        if not remat_lib.set_remat(model, config.remat):
            raise ValueError(f"config.remat={config.remat!r}: this model has no blocks that support it")
    if attention != "blocked":
        count, capped = fused_attention.set_attention(model, attention)
        if count:
            tqdm.tqdm.write(fused_attention.describe(attention, count, capped))
    return ModelDef.split(model)[0]


def make_optimizer(config: ml_collections.ConfigDict, labels: dict[str, str], layout: strategies.ParamLayout,
                   schedule) -> tuple:
    """(optimizer, phases or None, names of the anchored parameters) for the strategy's `labels`.

    Without LLRD / gradual unfreezing / LP-FT this is the strategy's partition with one AdamW; with them, one
    delayed AdamW per layer group (`sft_jax.groups`). An L2-SP / EWC penalty comes first in the chain.
    """
    lp, unfreeze = config.lp_ft, config.gradual_unfreeze
    phase_list = None
    if config.llrd != 1.0 or unfreeze.every or lp.head_steps:
        plan = groups.plan_groups(layout, llrd=config.llrd, unfreeze_every=unfreeze.every,
                                  unfreeze_blocks=unfreeze.blocks, lp_steps=lp.head_steps)
        glabels = groups.group_labels(labels, layout)
        head_ratio = lp.head_learning_rate / config.learning_rate if lp.head_learning_rate and \
            config.learning_rate else 1.0
        warmup = optim.resolve_warmup_steps(config.warmup_steps, config.warmup_ratio, config.max_steps)
        tx = groups.grouped_optimizer(glabels, plan, schedule, warmup_steps=warmup,
                                      weight_decay=config.weight_decay, clip_norm=config.clip_norm,
                                      head_ratio=head_ratio, lp_steps=lp.head_steps,
                                      state_dtype=config.optimizer_state_dtype)
        phase_list = groups.phases(glabels, plan)
    else:
        tx = strategies.partition(labels, optim.adamw(schedule, weight_decay=config.weight_decay,
                                                      clip_norm=config.clip_norm,
                                                      state_dtype=config.optimizer_state_dtype))
    fresh = re.compile("^" + layout.fresh) if layout.fresh else None
    anchored = tuple(n for n in strategies.trainable_names(labels) if not (fresh and fresh.search(n)))
    weight = config.regularizer.l2sp or config.regularizer.ewc
    if weight:
        tx = optax.chain(regularizers.anchor_penalty(weight, anchored, fisher=bool(config.regularizer.ewc)), tx)
    return tx, phase_list, anchored


def estimate_fisher(config: ml_collections.ConfigDict, task: Task, state, anchored: tuple[str, ...],
                    workdir: str) -> dict:
    """EWC's Fisher at the starting parameters, plus `regularizer.fisher_prior` (an earlier run's); written to
    WORKDIR/fisher.npz with `regularizer.keep_fisher`."""
    r = config.regularizer
    t_fisher = time.time()
    fisher = task.fisher(state.params, anchored)
    tqdm.tqdm.write(f"EWC: Fisher of {len(anchored)} tensors estimated in {time.time() - t_fisher:.0f}s")
    if r.fisher_prior:
        fisher = regularizers.add_fisher_prior(fisher, r.fisher_prior)
        tqdm.tqdm.write(f"EWC: added the Fisher of {r.fisher_prior}")
    if r.keep_fisher and distributed.is_primary():
        regularizers.save_fisher(storage.join(storage.normalize(workdir), regularizers.FISHER_FILE), fisher)
    return fisher


@dataclasses.dataclass
class Training:
    """What the loop runs: the state, its compiled steps and what they were built from."""

    state: TrainState
    meta: dict  # checkpointed loop state: early stopping, data position, probes before, train seconds
    train_fns: groups.PhasedStep  # step -> the compiled train step of that step's phase
    eval_fn: Callable[[dict, dict], dict]  # (params, host batch) -> aux
    schedule: optax.Schedule
    trainable: tuple[str, ...]
    p_shard: dict
    b_shard: jax.sharding.NamedSharding
    compiler_options: dict  # XLA's, of the train and eval steps (the CPU matmul library)


def prepare(config: ml_collections.ConfigDict, task: Task, ckpt: Checkpoints, workdir: str) -> Training:
    """The optimizer of the strategy, the state on the mesh (restored from the latest checkpoint when there is
    one; with EWC, a fresh state gets its Fisher), and the steps compiled for it."""
    rules = strategies.strategy_rules(config.strategy, task.layout, config.frozen_layers)
    labels = strategies.label_params(task.model_def.names, rules)
    trainable = strategies.trainable_names(labels)
    warmup = optim.resolve_warmup_steps(config.warmup_steps, config.warmup_ratio, config.max_steps)
    if (warning := optim.long_warmup_warning(config.warmup_steps, config.warmup_ratio, config.max_steps)) \
            and jax.process_index() == 0:
        print(warning, file=sys.stderr)
    schedule = optim.make_schedule(config.learning_rate, config.max_steps, warmup, config.schedule)
    tx, phase_list, anchored = make_optimizer(config, labels, task.layout, schedule)

    mesh = sharding.make_mesh(config.mesh.to_dict())
    logical_rules = sharding.run_logical_rules(config)
    p_shard = sharding.run_param_shardings(config, mesh, task.model_def.names,
                                           {k: v.shape for k, v in task.params.items()}, task.model_def.axes)
    b_shard = sharding.batch_sharding(mesh)
    state, state_shard = init_state(task.params, tx, p_shard, mesh, config.seed,
                                    master=master_names(task.params, trainable, config.master_dtype),
                                    master_dtype=config.master_dtype)
    if task.rebuilds_base:  # from here on checkpoints leave out what never trains (checkpoint.FrozenBase)
        frozen = set(task.params) - set(trainable)
        ckpt.base = FrozenBase.of(config.model, state.params, frozen) if frozen else None

    meta = {"best_metric": None, "best_step": None, "bad_evals": 0, "stopped_early": False}
    restored = ckpt.restore_latest(state)
    if restored is not None:
        state, meta = restored
        tqdm.tqdm.write(f"resumed from step {int(state.step)} of {workdir}")
    elif config.fork_from:  # the parent's state holds its Fisher (EWC) too
        state = fork.start_from(config.fork_from, state, workdir)
        meta["forked_from"] = config.fork_from
        tqdm.tqdm.write(f"forked from {config.fork_from}: training from step {int(state.step)}")
    elif config.regularizer.ewc:  # a resumed state holds its Fisher
        fisher = estimate_fisher(config, task, state, anchored, workdir)
        state = state.replace(opt_state=regularizers.set_fisher(state.opt_state, fisher))

    # One compiled step per phase (gradual unfreezing, LP-FT), each differentiating only what learns in it.
    phased = phase_list or [(0, trainable)]
    # Frozen bfloat16 matmul weights are cast once here, not in every step. Phases only ever unfreeze, so the
    # parameters frozen in the phase the run starts in stay as they are for as long as they are frozen.
    if config.dtype != "float32":  # in float32 nothing is cast (and the plan would be empty)
        start_phase = groups.phase_at([s for s, _ in phased], int(state.step))
        cast_plan = compute_cast_plan(task.model_def, task.loss_fn, state.params,
                                      task.batches.batch(int(state.step)), phased[start_phase][1])
        state, state_shard = with_compute_params(state, cast_plan, state_shard)
    def step_for(names, xla_options):
        return make_train_step(task.model_def, tx, task.loss_fn, names, state_sharding=state_shard,
                               batch_sharding=b_shard, accum_steps=config.grad_accum_steps,
                               logical_rules=logical_rules, compiler_options=xla_options)

    library = config.cpu_matmuls
    on_cpu = all(d.platform == "cpu" for d in b_shard.mesh.devices.flat)
    if library == "measure" and on_cpu:  # the run's own matmuls timed under each library (cached per CPU)
        start = groups.phase_at([s for s, _ in phased], int(state.step))
        traced = jax.make_jaxpr(step_for(phased[start][1], None))(
            state, sharding.put_batch(task.batches.batch(int(state.step)), b_shard))
        library = cpu_matmul_choice.choose(cpu_matmul_choice.dots_of(traced.jaxpr), CPU_MATMULS,
                                           log=tqdm.tqdm.write)
    xla_options = compiler_options(library, b_shard.mesh.devices.flat, decoder=task.decoder)
    train_fns = groups.PhasedStep(phased, lambda names: step_for(names, xla_options))
    eval_step = make_eval_step(task.model_def, task.loss_fn, params_sharding=p_shard, batch_sharding=b_shard,
                               logical_rules=logical_rules, compiler_options=xla_options)

    def eval_fn(params, batch):  # host batches become global arrays (each process puts its own rows)
        return eval_step(params, sharding.put_batch(batch, b_shard))

    return Training(state, meta, train_fns, eval_fn, schedule, trainable, p_shard, b_shard, xla_options)
