"""Tried in stop 17, not kept (8.50 -> 8.78 s, SmolLM2 lora float32 at 1 x 1024 tokens).

old: `decoder.attend` holds logits, probabilities and their gradients as [B, K, G, T, S] (query group
before query row); new: as [B, K, T, G, S], the order of the query's own [B, T, K, G, D] rows, so the
[T * G, S] blocks XLA:CPU hands to its matmuls are reshapes of these arrays rather than transposed copies.

"new" is the decoder's own forward and backward with only that layout changed: their source, with the
substitutions in `LAYOUT`, compiled again in the decoder's namespace.
"""
import inspect

import sft_jax.models.decoder as decoder

_CUR = decoder._attend_fwd, decoder._attend_bwd
# [B, K, G, T, S] -> [B, K, T, G, S]: einsum subscripts, the [B, T, S] mask's broadcast, and the row sums'
# [B, K, T, G] -> [B, T, K, G] move.
LAYOUT = (("bkgt", "bktg"), ("mask[:, None, None]", "mask[:, None, :, None]"),
          ("jnp.moveaxis(1.0 / jnp.sum(e, axis=-1), 3, 1)", "jnp.moveaxis(1.0 / jnp.sum(e, axis=-1), 2, 1)"))


def _relaid(fn):
    source = inspect.getsource(fn)
    for old, new in LAYOUT:
        source = source.replace(old, new)
    namespace = dict(vars(decoder))  # a copy: the decoder's own functions stay as they are
    exec(compile(source, f"<{fn.__name__} as [B, K, T, G, S]>", "exec"), namespace)
    return namespace[fn.__name__]


def _check_layout() -> None:  # every substitution must still apply, or "new" would quietly equal "old"
    source = "".join(inspect.getsource(fn) for fn in _CUR)
    missing = [old for old, _ in LAYOUT if old not in source]
    if missing:
        raise RuntimeError(f"decoder attention changed: {missing} no longer in _attend_fwd / _attend_bwd")


_check_layout()
_NEW = tuple(_relaid(fn) for fn in _CUR)


def apply(variant: str) -> None:
    fwd, bwd = {"old": _CUR, "new": _NEW}[variant]  # not kept: "old" is the code as it stands
    decoder._attend_fwd = fwd
    decoder.attend.defvjp(fwd, bwd)
