"""The train step's finiteness guard (measured in experiments/benchmarks/notes.md, "Finiteness guard").

old: a conditional on the loss and gradient norm alone (the update itself unchecked); new: `_apply_if_finite`
(the update re-computed inside reductions of the float32 exponent fields of the new parameters, masters and
optimizer state, grouped by parameter, then applied in place under a conditional); sum / isfinite: the same
with a float sum per group, or `isfinite().all()` per leaf, as the check; select: the update computed once,
checked, then a conditional between it and the old state (the chosen side is copied into the donated
buffers); where: the same with a `where` per leaf."""

import functools

import jax
import jax.numpy as jnp

from sft_jax import train_step

_NEW_GUARD, _NEW_CHECK = train_step._apply_if_finite, train_step.all_finite


def _old(finite, apply, operands):
    return jax.lax.cond(finite, apply, lambda o: o, operands), finite


def _select(finite, apply, operands):
    new = apply(operands)
    ok = finite & _NEW_CHECK(new)
    return jax.lax.cond(ok, lambda: new, lambda: operands), ok


def _where(finite, apply, operands):
    new = apply(operands)
    ok = finite & _NEW_CHECK(new)
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, operands), ok


def _floats(tree):
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jnp.issubdtype(x.dtype, jnp.inexact):
            names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
            yield (names[-1] if names else None, x.shape), x


def _sum_check(tree):
    groups = {}
    for key, x in _floats(tree):
        groups.setdefault(key, []).append(x.astype(jnp.float32))
    return jnp.isfinite(sum(jnp.sum(functools.reduce(jnp.add, xs)) for xs in groups.values()))


def _isfinite_check(tree):
    return functools.reduce(jnp.logical_and, [jnp.isfinite(x).all() for _, x in _floats(tree)], jnp.bool_(True))


VARIANTS = {"old": (_old, _NEW_CHECK), "new": (_NEW_GUARD, _NEW_CHECK), "sum": (_NEW_GUARD, _sum_check),
            "isfinite": (_NEW_GUARD, _isfinite_check), "select": (_select, _NEW_CHECK),
            "where": (_where, _NEW_CHECK)}


def apply(variant: str) -> None:
    train_step._apply_if_finite, train_step.all_finite = VARIANTS[variant]
