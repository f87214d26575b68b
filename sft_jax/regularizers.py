"""Penalties that hold the pre-trained weights: L2-SP (Li et al. 2018) and EWC (Kirkpatrick et al. 2017).

    penalty(theta) = weight / 2 * sum_k F_k * (theta_k - theta0_k) ** 2

over the pre-trained parameters that learn (never the freshly initialised head); F = 1 is L2-SP, the
diagonal empirical Fisher of a pre-training-like objective is EWC. The penalty is a loss term: its gradient
is added to the loss gradient before clipping and Adam, exactly as if it were part of the loss. It is applied
as an optax transformation so the anchor theta0 and F live in the optimizer state (sharded like the
parameters, checkpointed, restored on resume) instead of being constants of the compiled step.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sft_jax import storage
from sft_jax.state import ModelDef


def penalty(params: Mapping[str, jax.Array], anchor: Mapping[str, jax.Array],
            fisher: Mapping[str, jax.Array] | None, weight: float) -> jax.Array:
    """weight / 2 * sum_k F_k (params_k - anchor_k)^2 over the names in `anchor` (F = 1 when `fisher` is None)."""
    total = jnp.zeros((), jnp.float32)
    for name, a in anchor.items():
        sq = jnp.square(params[name].astype(jnp.float32) - a.astype(jnp.float32))
        total += jnp.sum(sq if not fisher else fisher[name] * sq)
    return 0.5 * weight * total


class AnchorState(NamedTuple):
    anchor: dict[str, jax.Array]
    fisher: dict[str, jax.Array]  # empty for L2-SP


def anchor_penalty(weight: float, names: Sequence[str], *, fisher: bool = False) -> optax.GradientTransformation:
    """Adds the gradient of `penalty` over `names` to the updates (put it first in the chain).

    The anchor is the parameters passed to `init` (the pre-trained weights). With `fisher=True` the state
    holds F (ones until `set_fisher` fills it with an estimate).
    """
    names = tuple(names)

    def init(params):
        # A copy: the train state is donated, and an aliased anchor would be donated with the parameters.
        anchor = {k: jnp.copy(params[k]) for k in names}
        return AnchorState(anchor=anchor, fisher={k: jnp.ones_like(v) for k, v in anchor.items()} if fisher else {})

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("anchor_penalty needs the parameters")
        grads = jax.grad(penalty)({k: params[k] for k in names}, state.anchor, state.fisher or None, weight)
        return {k: (u + grads[k].astype(u.dtype) if k in grads else u) for k, u in updates.items()}, state

    return optax.GradientTransformation(init, update)


def set_fisher(opt_state, fisher: Mapping[str, jax.Array]):
    """The optimizer state with the Fisher of its `AnchorState` replaced (same keys, shapes and shardings)."""

    def put(s):
        if not isinstance(s, AnchorState):
            return s
        if set(fisher) != set(s.fisher):
            raise ValueError("the Fisher estimate does not cover the penalised parameters")
        return s._replace(fisher={k: jax.device_put(jnp.asarray(fisher[k], v.dtype), v.sharding)
                                  for k, v in s.fisher.items()})

    return jax.tree.map(put, opt_state, is_leaf=lambda s: isinstance(s, AnchorState))


def empirical_fisher(model_def: ModelDef, params: Mapping[str, jax.Array], names: Sequence[str],
                     loss_fn: Callable, batches: Iterable[dict], seed: int = 0) -> dict[str, np.ndarray]:
    """Diagonal empirical Fisher of `loss_fn` at `params` for `names`: the mean over `batches` of the squared
    mini-batch gradient, normalised to mean 1 over all its entries (so an EWC weight is on the same scale as an
    L2-SP weight and only the distribution of the penalty differs)."""
    names = tuple(names)
    rest = {k: v for k, v in params.items() if k not in names}

    @jax.jit
    def squared_grad(tp, batch, key):
        g = jax.grad(lambda t: loss_fn(model_def.merge({**rest, **t}), batch, key)[0])(tp)
        return jax.tree.map(lambda x: jnp.square(x.astype(jnp.float32)), g)

    total, n = None, 0
    key = jax.random.key(seed)
    for i, batch in enumerate(batches):
        sq = squared_grad({k: params[k] for k in names}, batch, jax.random.fold_in(key, i))
        total = sq if total is None else jax.tree.map(jnp.add, total, sq)
        n += 1
    if not n:
        raise ValueError("no batches to estimate the Fisher on")
    total = {k: np.asarray(v) / n for k, v in jax.device_get(total).items()}
    mean = sum(float(v.sum()) for v in total.values()) / sum(v.size for v in total.values())
    if not mean > 0:
        raise ValueError("the Fisher estimate is zero (no gradient reaches the penalised parameters)")
    return {k: v / mean for k, v in total.items()}


FISHER_FILE = "fisher.npz"  # WORKDIR/fisher.npz: the Fisher a run penalised with (regularizer.keep_fisher)


def save_fisher(path: str, fisher: Mapping[str, np.ndarray]) -> None:
    """The Fisher as one float32 .npz array per parameter name, written whole (a temporary file renamed)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v, np.float32) for k, v in fisher.items()})
    with storage.open(path + ".tmp", "wb") as f:
        f.write(buffer.getvalue())
    storage.rename(path + ".tmp", path)


def add_fisher_prior(fisher: Mapping[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
    """`fisher` plus the one saved at `path` (another run's, e.g. the previous stage's): the online-EWC sum. The
    saved file must hold exactly these parameters with these shapes, or one line says which differs."""
    if not storage.isfile(path):
        raise FileNotFoundError(f"config.regularizer.fisher_prior: {path}: file not found (a run with "
                                f"regularizer.keep_fisher writes WORKDIR/{FISHER_FILE})")
    try:
        with np.load(io.BytesIO(storage.read_bytes(path))) as saved:
            prior = {k: saved[k] for k in saved.files}
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npz of Fisher values ({e})") from None
    if set(prior) != set(fisher):
        missing, extra = sorted(set(fisher) - set(prior)), sorted(set(prior) - set(fisher))
        raise ValueError(f"{path}: its Fisher covers other parameters than this run penalises (missing: "
                         f"{missing[:3]}{' ...' if len(missing) > 3 else ''}; not penalised here: "
                         f"{extra[:3]}{' ...' if len(extra) > 3 else ''})")
    for k, v in fisher.items():
        if prior[k].shape != v.shape:
            raise ValueError(f"{path}: {k} has shape {prior[k].shape}, this run's parameter {v.shape}")
    return {k: v + prior[k] for k, v in fisher.items()}


def wise_ft(pretrained: Mapping[str, jax.Array], finetuned: Mapping[str, jax.Array], alpha: float,
            keep: Iterable[str] = ()) -> dict[str, jax.Array]:
    """WiSE-FT (Wortsman et al. 2022): (1 - alpha) * pretrained + alpha * finetuned, parameter by parameter.

    alpha = 0 gives the pre-trained weights and alpha = 1 the fine-tuned ones, bit for bit. Names in `keep`
    (a freshly initialised head, which has no pre-trained value worth returning to) stay fine-tuned.
    """
    keep = set(keep)
    return {k: v if k in keep else ((1.0 - alpha) * pretrained[k] + alpha * v).astype(v.dtype)
            for k, v in finetuned.items()}
