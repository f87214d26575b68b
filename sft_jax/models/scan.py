"""Scanned decoder layers: the blocks run under `jax.lax.scan`, so the compiled program's size and compile
time stay nearly flat in depth, and rematerialisation (`models/remat.py`) takes effect on every backend.

`scan_decoder(lm, splits)` turns a `DecoderLM` (loaded, LoRA-adapted, quantised: any per-layer modules) into
the same model with its layers stacked; `unscan_decoder` turns it back (for export and generation). Layers
are cut at `splits` into segments (a partial strategy's frozen stack and trainable stack); within a segment,
layers repeat with a period p (1 for Llama; 2 for Gemma 2's local / global; 6 for Gemma 3's five local and one
global), and the scan runs over groups of p layers. Each of the p positions is one stacked block whose
parameters gain a leading `layers` axis: `segments/0/stacks/1/attn/q/kernel` [groups, in, out] holds layers
1, 1 + p, 1 + 2p, ... of segment 0. Layers after the last whole group run unscanned (`segments/0/tail/...`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sft_jax.models import block_outputs
from sft_jax.models.remat import run_block
from sft_jax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class SegmentShape:
    start: int  # first layer
    period: int  # layers per scanned group
    groups: int  # scanned groups
    tail: int  # unscanned layers after them

    @property
    def size(self) -> int:
        return self.period * self.groups + self.tail


class Segment(nnx.Module):
    """Layers [start, start + size) of a decoder: `stacks[j]` holds layers start + j + g * period stacked over
    g (one `Block` whose parameters have a leading axis of `groups`); `tail` the layers left after them."""

    def __init__(self, shape: SegmentShape, stacks: list[nnx.Module], tail: list[nnx.Module]):
        self.shape = shape
        self.stacks = nnx.List(stacks)
        self.tail = nnx.List(tail)

    def layer(self, i: int) -> nnx.Module:
        """Layer `start + i` as a plain block (sliced out of its stack)."""
        s = self.shape
        if i >= s.period * s.groups:
            return self.tail[i - s.period * s.groups]
        graphdef, state = nnx.split(self.stacks[i % s.period])
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[i // s.period], state))

    def __call__(self, x, positions, segment_ids, index, rng, remat: str):
        s = self.shape
        split = [nnx.split(stack) for stack in self.stacks]
        recorded = block_outputs.is_recording()

        def group(x, xs):
            states, g = xs
            # The blocks' outputs are arrays of the scan's body: recorded, they leave it as the scan's outputs.
            with block_outputs.recording() as outputs:
                for j, ((graphdef, _), state) in enumerate(zip(split, states, strict=True)):
                    layer_rng = None if rng is None else jax.random.fold_in(rng, s.start + g * s.period + j)
                    x, _ = run_block(nnx.merge(graphdef, state), remat, x, positions, segment_ids, index, None,
                                     layer_rng)
                    x = constrain(x, "batch", "length", "embed")
            return x, (outputs if recorded else None)

        if s.groups:
            x, stacked = jax.lax.scan(group, x, ([state for _, state in split], jnp.arange(s.groups)))
            if recorded:  # stacked[j][g] is the output of layer start + g * period + j
                for g in range(s.groups):
                    for j in range(s.period):
                        block_outputs.record(stacked[j][g])
        for t, layer in enumerate(self.tail):
            layer_rng = None if rng is None else jax.random.fold_in(rng, s.start + s.period * s.groups + t)
            x, _ = run_block(layer, remat, x, positions, segment_ids, index, None, layer_rng)
            x = constrain(x, "batch", "length", "embed")
        return x


def _period(signatures: Sequence) -> int:
    """The smallest p with signatures[i] == signatures[i % p] wherever a whole group of p reaches (at least two
    groups); len(signatures) when none repeats."""
    n = len(signatures)
    for p in range(1, n // 2 + 1):
        groups = n // p
        if all(signatures[i] == signatures[i % p] for i in range(groups * p)):
            return p
    return max(n, 1)


def _stack(layers: list[nnx.Module]) -> nnx.Module:
    """One block whose every variable is the stack of `layers`' (identical structure), with a leading
    `layers` logical axis in its sharding metadata."""
    graphdef, first = nnx.split(layers[0])
    states = [first] + [nnx.split(layer)[1] for layer in layers[1:]]
    flat = [list(nnx.to_flat_state(state)) for state in states]
    stacked = []
    for k, (path, variable) in enumerate(flat[0]):
        values = [f[k][1].value for f in flat]
        if isinstance(values[0], jax.ShapeDtypeStruct):  # an abstract model (nnx.eval_shape): shapes only
            value = jax.ShapeDtypeStruct((len(values), *values[0].shape), values[0].dtype)
        else:
            value = jnp.stack(values)
        axes = variable.get_metadata().get("out_sharding")
        extra = {"out_sharding": ("layers", *axes)} if axes else {}
        stacked.append((path, variable.replace(value=value, **extra)))
    return nnx.merge(graphdef, nnx.from_flat_state(stacked))


def _unstack(stack: nnx.Module, groups: int) -> list[nnx.Module]:
    graphdef, state = nnx.split(stack)
    flat = list(nnx.to_flat_state(state))
    out = []
    for g in range(groups):
        parts = []
        for path, variable in flat:
            axes = variable.get_metadata().get("out_sharding")
            extra = {"out_sharding": tuple(axes[1:])} if axes else {}
            value = variable.value
            value = (jax.ShapeDtypeStruct(value.shape[1:], value.dtype) if isinstance(value, jax.ShapeDtypeStruct)
                     else value[g])
            parts.append((path, variable.replace(value=value, **extra)))
        out.append(nnx.merge(graphdef, nnx.from_flat_state(parts)))
    return out


def scan_decoder(lm, splits: Sequence[int] = ()):
    """`lm` (a `DecoderLM`, changed in place and returned) with its layers in scanned segments cut at `splits`.

    Raises:
      ValueError: where a split is outside the layers.
    """
    n = len(lm.layers)
    bounds = [0, *sorted(set(splits)), n]
    if bounds[1:-1] and not all(0 < b < n for b in bounds[1:-1]):
        raise ValueError(f"scan_layers: splits {list(splits)} must lie inside the model's {n} layers")
    layers = list(lm.layers)
    segments = []
    for start, end in zip(bounds, bounds[1:]):
        if start == end:
            continue
        part = layers[start:end]
        period = _period([nnx.graphdef(layer) for layer in part])
        groups = len(part) // period if len(part) // period >= 2 else 0
        stacks = [_stack(part[j:groups * period:period]) for j in range(period)] if groups else []
        shape = SegmentShape(start, period if groups else 0, groups, len(part) - groups * period)
        segments.append(Segment(shape, stacks, part[groups * period:]))
    lm.segments = nnx.List(segments)
    lm.layers = nnx.List([])
    return lm


def unscan_decoder(lm):
    """The inverse of `scan_decoder` (in place): per-layer blocks again, with their own parameters."""
    if not getattr(lm, "segments", None):
        return lm
    layers = []
    for segment in lm.segments:
        s = segment.shape
        if s.groups:
            per_stack = [_unstack(stack, s.groups) for stack in segment.stacks]
            layers += [per_stack[j][g] for g in range(s.groups) for j in range(s.period)]
        layers += list(segment.tail)
    lm.layers = nnx.List(layers)
    lm.segments = nnx.List([])
    return lm


def segment_sizes(lm) -> tuple[int, ...]:
    """Layers per segment of a scanned decoder (what a partial strategy freezes a whole of)."""
    return tuple(segment.shape.size for segment in lm.segments)
