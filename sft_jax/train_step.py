"""Pure train and eval steps. No config reads: importable and usable on its own (e.g. in Colab).

    step_fn = make_train_step(model_def, tx, loss_fn, trainable, ...)
    state, metrics = step_fn(state, batch)

`loss_fn(model, batch, rng) -> (loss, aux)` where `rng` is a dropout key (None when evaluating).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.extend import core as jax_core

from sft_jax import sharding
from sft_jax.state import ModelDef, TrainState

LossFn = Callable[..., tuple[jax.Array, dict]]


def _accumulated_grads(loss_fn, model_def, frozen_p, train_p, batch, rng, accum_steps: int, sum_dtypes=None):
    """Gradient of the mean loss over all examples / target tokens of `batch`, computed over `accum_steps`
    micro-batches: per micro-batch the gradient of the summed loss, then one division by the total count.
    Micro-batches with more target tokens therefore weigh more, exactly as in the one large batch.
    `sum_dtypes` ({name: dtype}) sums some gradients wider than their parameters (those with a master)."""

    def split(x):
        # Strided split (row i goes to micro-batch i % A): each micro-batch takes rows from every device's
        # shard of a data-parallel batch, so all devices stay busy in every micro-step.
        return x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)

    micro = jax.tree.map(split, batch)

    def summed(tp, mb, key):
        _, aux = loss_fn(model_def.merge({**frozen_p, **tp}), mb, key)
        return aux["loss_sum"], aux

    def body(carry, inputs):
        grads, sums = carry
        mb, i = inputs
        (_, aux), g = jax.value_and_grad(summed, has_aux=True)(train_p, mb, jax.random.fold_in(rng, i))
        grads = jax.tree.map(jnp.add, grads, g)
        sums = {k: sums[k] + aux[k] for k in sums}
        return (grads, sums), None

    _, aux_shape = jax.eval_shape(summed, train_p, jax.tree.map(lambda x: x[0], micro), rng)
    zeros = {k: jnp.zeros(v.shape, v.dtype) for k, v in aux_shape.items() if not v.shape}
    sum_dtypes = sum_dtypes or {}
    grads0 = {k: jnp.zeros(v.shape, sum_dtypes.get(k, v.dtype)) for k, v in train_p.items()}
    (grads, sums), _ = jax.lax.scan(body, (grads0, zeros),
                                   (micro, jnp.arange(accum_steps)))
    count = jnp.maximum(sums["count"], 1.0)
    return sums["loss_sum"] / count, sums, jax.tree.map(lambda g: g / count, grads)


def train_step(state: TrainState, batch: dict, *, model_def: ModelDef, tx: optax.GradientTransformation,
               loss_fn: LossFn, trainable: Sequence[str], accum_steps: int = 1) -> tuple[TrainState, dict]:
    """One optimizer step. Only `trainable` parameters are differentiated; the others pass through as is.

    With `accum_steps` > 1 the batch is processed as that many micro-batches (the loss function's aux must
    hold `loss_sum` and `count`), for the same update as the whole batch at a fraction of the memory.

    Parameters with a master copy (`state.master`) are stepped through it: the optimizer sees the master and
    the gradient in its dtype, and the parameter becomes the new master cast to the parameter's dtype.
    """
    trainable = set(trainable)
    train_p = {k: v for k, v in state.params.items() if k in trainable}
    frozen_p = {k: v for k, v in state.params.items() if k not in trainable}
    # The model reads the cast-once copies of frozen parameters where there are any (`with_compute_params`);
    # the float32 masters pass through to the new state untouched.
    frozen_in = {k: state.compute_params.get(k, v) for k, v in frozen_p.items()}
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def compute_loss(tp):
        return loss_fn(model_def.merge({**frozen_in, **tp}), batch, rng)

    # Masters of this phase's trained parameters (others, frozen for now, pass through with theirs).
    master = {k: v for k, v in state.master.items() if k in train_p}
    if accum_steps > 1:
        loss, aux, grads = _accumulated_grads(loss_fn, model_def, frozen_in, train_p, batch, rng, accum_steps,
                                              {k: v.dtype for k, v in master.items()})
    else:
        (loss, aux), grads = jax.value_and_grad(compute_loss, has_aux=True)(train_p)
    grads = {k: g.astype(master[k].dtype) if k in master else g for k, g in grads.items()}
    # The partition expects the full tree; frozen entries go to set_to_zero and are dead code after it.
    full_grads = {**{k: jnp.zeros(v.shape, state.master[k].dtype if k in state.master else v.dtype)
                     for k, v in frozen_p.items()}, **grads}
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(operands):
        train_p, master, opt_state = operands
        updates, opt_state = tx.update(full_grads, opt_state, {**state.params, **state.master})
        master = optax.apply_updates(master, {k: updates[k] for k in master})
        stepped = optax.apply_updates({k: v for k, v in train_p.items() if k not in master},
                                      {k: updates[k] for k in train_p if k not in master})
        return {**stepped, **{k: m.astype(train_p[k].dtype) for k, m in master.items()}}, master, opt_state

    # A step whose loss, gradient, or updated parameters / masters / optimizer state hold a non-finite value
    # leaves the state as it was (the step counter and so the data position still advance); the host sees
    # `nonfinite` and skips or stops per its policy.
    (new_train, master, opt_state), finite = _apply_if_finite(finite, apply, (train_p, master, state.opt_state))
    new_state = state.replace(step=state.step + 1, params={**frozen_p, **new_train}, opt_state=opt_state,
                              master={**state.master, **master})
    # Per-example outputs (predictions) stay out of the train metrics; eval_step returns them.
    scalars = {k: v for k, v in aux.items() if jnp.ndim(v) == 0}
    metrics = {"loss": loss, "grad_norm": grad_norm, "nonfinite": (~finite).astype(jnp.int32), **scalars}
    return new_state, metrics


_EXPONENT = 0x7F800000  # float32's exponent bits: all set in inf and nan, and only there


def all_finite(tree) -> jax.Array:
    """False when some floating element of `tree` is nan or inf (integer leaves, e.g. int8 moments or step
    counts, always are finite). Leaves under the same parameter name and shape (a parameter, its master, its
    moments) are checked in one reduction: the largest float32 exponent field among them, all ones only for inf
    and nan, so the check is exact (a float sum could also overflow). On XLA:CPU this integer max costs about
    half a float sum (which YNNPACK takes, materialising its broadcast operands) or `isfinite().all()` (which
    writes a boolean per element first): experiments/benchmarks/ab/finite_guard.py."""
    groups: dict[tuple, list] = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jnp.issubdtype(x.dtype, jnp.inexact):
            names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
            bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32) & _EXPONENT
            groups.setdefault((names[-1] if names else None, x.shape), []).append(bits)
    largest = [jnp.max(functools.reduce(jnp.maximum, xs)) for xs in groups.values()]
    return functools.reduce(jnp.maximum, largest, jnp.int32(0)) < _EXPONENT


def _apply_if_finite(finite: jax.Array, apply: Callable, operands):
    """(`apply(operands)` if `finite` and everything it returns is finite, else `operands`; whether it was
    applied). Overflow, a non-finite learning rate or decay, or an optimizer's own arithmetic can poison a
    step whose loss and gradient were finite, so the update is checked, not only its inputs.

    The check is a first pass that recomputes the (elementwise) update inside reductions, without writing the
    updated state; the conditional then applies it in place into the donated state. Selecting between an
    update computed once and the old state would instead keep both alive and copy the chosen side (every
    parameter and moment) into the donated buffers on every step."""
    ok = finite & all_finite(apply(operands))
    return jax.lax.cond(ok, apply, lambda o: o, operands), ok


def _cast_dtypes(jaxpr, var) -> set | None:
    """The dtypes `var` is converted to by its uses in `jaxpr`, following it into nested calls (jit, custom
    VJP / JVP, remat); None when any use reads it as it is (or it is an output)."""
    if any(v is var for v in jaxpr.outvars):
        return None
    dtypes: set = set()
    for eqn in jaxpr.eqns:
        positions = [i for i, v in enumerate(eqn.invars) if v is var]
        if not positions:
            continue
        if eqn.primitive.name == "convert_element_type":
            dtypes.add(jnp.dtype(eqn.params["new_dtype"]))
            continue
        subs = [p.jaxpr if isinstance(p, jax_core.ClosedJaxpr) else p for p in eqn.params.values()
                if isinstance(p, (jax_core.Jaxpr, jax_core.ClosedJaxpr))]
        if len(subs) != 1 or len(subs[0].invars) != len(eqn.invars):  # scan, cond, while, ...: not followed
            return None
        sub = subs[0]
        for i in positions:
            inner = _cast_dtypes(sub, sub.invars[i])
            if inner is None:
                return None
            dtypes |= inner
    return dtypes


def compute_cast_plan(model_def: ModelDef, loss_fn: LossFn, params: dict, batch: dict,
                      trainable: Sequence[str]) -> dict[str, jnp.dtype]:
    """{name: dtype} of the frozen parameters whose every use in the train step (forward and backward,
    custom VJPs included) is a cast to one narrower dtype: the bfloat16 matmul weights of a frozen
    backbone. Read off the jaxpr of the loss and its gradient (traced on shapes only, nothing runs), so a
    parameter used in float32 anywhere (norm scales, a float32 head, a decoder's embedding lookup) is left
    out and the step computes exactly what it would with the float32 parameters."""
    trainable = set(trainable)
    train_p = {k: v for k, v in params.items() if k in trainable}
    frozen_p = {k: v for k, v in params.items() if k not in trainable}
    if not frozen_p:
        return {}

    def loss_and_grad(tp, fp, b, key):
        return jax.value_and_grad(lambda t: loss_fn(model_def.merge({**fp, **t}), b, key)[0])(tp)

    spec = functools.partial(jax.tree.map, lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype))
    closed = jax.make_jaxpr(loss_and_grad)(spec(train_p), spec(frozen_p), spec(batch), jax.random.key(0))
    n_train = len(jax.tree.leaves(train_p))
    names = [path[0].key for path, _ in jax.tree_util.tree_flatten_with_path(frozen_p)[0]]
    plan = {}
    for name, var in zip(names, closed.jaxpr.invars[n_train:n_train + len(names)]):
        dtypes = _cast_dtypes(closed.jaxpr, var)
        if dtypes and len(dtypes) == 1:
            (dtype,) = dtypes
            if dtype.itemsize < jnp.dtype(frozen_p[name].dtype).itemsize:
                plan[name] = dtype
    return plan


def with_compute_params(state: TrainState, plan: dict[str, jnp.dtype], state_sharding: TrainState | None = None):
    """`state` with its `compute_params` cast once per `plan` (`compute_cast_plan`), and, given the state
    sharding, the sharding with theirs (each copy laid out as its parameter). Call it again after restoring
    a checkpoint (the copies are not saved) and whenever the frozen parameters change."""
    copies = {k: state.params[k].astype(dtype) for k, dtype in plan.items()}
    state = state.replace(compute_params=copies)
    if state_sharding is None:
        return state
    return state, state_sharding.replace(compute_params={k: state_sharding.params[k] for k in plan})


def eval_step(params: dict, batch: dict, *, model_def: ModelDef, loss_fn: LossFn) -> dict:
    """Sums over the batch (weighted by batch["weights"]), so the host can add them up across batches."""
    _, aux = loss_fn(model_def.merge(params), batch, None)
    return aux


def _constrained(fn, batch_sharding, logical_rules):
    """`fn` tracing its model under `sharding.activation_sharding` (the context is entered inside the jitted
    function, so it is active exactly while the step is traced)."""
    if logical_rules is None or batch_sharding is None:
        return fn

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with sharding.activation_sharding(batch_sharding.mesh, logical_rules):
            return fn(*args, **kwargs)

    return wrapped


# XLA:CPU matmul libraries (`config.cpu_matmuls`): "xla" leaves XLA's own choice (YNNPACK dots, Eigen for the
# rest); "onednn" hands each float32 dot, alone, to oneDNN (bfloat16 dots stay XLA's). oneDNN's fusions of a dot
# with its neighbours (LIBRARY_FUSION_TYPE_DOT) can fail to compile decoders ("partition compile failed",
# SIGILL), so dots go one by one. "auto" (the default) picks by model, as measured in
# experiments/benchmarks/notes.md: oneDNN for encoder classifiers (their small batched attention matmuls run
# faster there), XLA's for decoders (where oneDNN was no faster).
CPU_MATMULS = {
    "xla": {},
    "onednn": {"xla_cpu_use_onednn": True,
               "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
}
CPU_MATMUL_CHOICES = ("auto", "measure", *CPU_MATMULS)


def compiler_options(cpu_matmuls: str = "auto", devices=None, *, decoder: bool = False) -> dict:
    """XLA compiler options for `make_train_step` / `make_eval_step`: those of `CPU_MATMULS[cpu_matmuls]`
    ("auto": "xla" for a `decoder`, "onednn" otherwise; "measure", which the trainer resolves first
    (`cpu_matmul_choice`), as "auto" where nothing was measured) when `devices` (default: jax.devices()) are
    CPUs, none on GPU or TPU."""
    if cpu_matmuls not in CPU_MATMUL_CHOICES:
        raise ValueError(f"cpu_matmuls: {cpu_matmuls!r} is not one of {CPU_MATMUL_CHOICES}")
    if cpu_matmuls in ("auto", "measure"):
        cpu_matmuls = "xla" if decoder else "onednn"
    devices = jax.devices() if devices is None else devices
    return dict(CPU_MATMULS[cpu_matmuls]) if all(d.platform == "cpu" for d in devices) else {}


def make_train_step(model_def: ModelDef, tx, loss_fn: LossFn, trainable: Sequence[str], *,
                    state_sharding=None, batch_sharding=None, donate: bool = True, accum_steps: int = 1,
                    logical_rules: sharding.LogicalRules | None = None, compiler_options: dict | None = None):
    """`train_step` jitted with explicit shardings; the state buffer is donated (updated in place).

    With `logical_rules` (and shardings), the model's activations are constrained to the layout those rules
    give on the batch sharding's mesh (`sharding.constrain`). `compiler_options` go to XLA (see
    `compiler_options()`)."""
    fn = functools.partial(train_step, model_def=model_def, tx=tx, loss_fn=loss_fn, trainable=tuple(trainable),
                           accum_steps=accum_steps)
    fn = _constrained(fn, batch_sharding, logical_rules)
    opts = compiler_options or None
    if state_sharding is None:
        return jax.jit(fn, donate_argnums=(0,) if donate else (), compiler_options=opts)
    # Metrics come back replicated: every process of a multi-host run can read them.
    return jax.jit(fn, in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, state_sharding.step), donate_argnums=(0,) if donate else (),
                   compiler_options=opts)


def make_eval_step(model_def: ModelDef, loss_fn: LossFn, *, params_sharding=None, batch_sharding=None,
                   logical_rules: sharding.LogicalRules | None = None, compiler_options: dict | None = None):
    """`eval_step` jitted with explicit shardings (activations constrained as in `make_train_step`)."""
    fn = _constrained(functools.partial(eval_step, model_def=model_def, loss_fn=loss_fn), batch_sharding,
                      logical_rules)
    opts = compiler_options or None
    if params_sharding is None:
        return jax.jit(fn, compiler_options=opts)
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    return jax.jit(fn, in_shardings=(params_sharding, batch_sharding), out_shardings=replicated,
                   compiler_options=opts)
