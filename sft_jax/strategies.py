"""Which parameters learn: regex rules -> label tree -> optax partition.

A rule is `(regex, label)`; the first rule whose regex matches a parameter's path
("encoder/layers/3/mlp/up/kernel") gives its label. Frozen labels get `optax.set_to_zero()`, so they carry
no optimizer state, and the train step differentiates only the trainable subtree.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence

import optax

from sft_jax.models.layout import ParamLayout

TRAINABLE, FROZEN = "trainable", "frozen"
STRATEGIES = ("head", "partial", "full", "lora")
# strategy=lora: the low-rank adapters learn (`sft_jax.models.lora` names them .../lora_a, .../lora_b), and so does a
# freshly added head (a classifier's), which has no pre-trained value to keep.
LORA_PARAMS = r"/lora_(a|b)$"

Rules = Sequence[tuple[str, str]]


def strategy_rules(strategy: str, layout: ParamLayout, frozen_layers: int = 0) -> list[tuple[str, str]]:
    """The rules of a named strategy.

    head: only the added layers learn. partial: embeddings and blocks 0..K-1 are frozen, the rest learns.
    full: everything learns. lora: the LoRA adapters learn (the model must have them, see
    `sft_jax.models.lora.apply_lora`), and the freshly added layers (`layout.fresh`: a classifier's head) with
    them; the pre-trained weights are all frozen.
    """
    if strategy == "full":
        return [(".*", TRAINABLE)]
    if strategy == "lora":
        fresh = [("^" + layout.fresh, TRAINABLE)] if layout.fresh else []
        return [(LORA_PARAMS, TRAINABLE), *fresh, (".*", FROZEN)]
    if strategy == "head":
        return [("^" + layout.head, TRAINABLE), (".*", FROZEN)]
    if strategy == "partial":
        if not 0 <= frozen_layers <= layout.num_layers:
            raise ValueError(f"frozen_layers={frozen_layers} must be between 0 and the model's "
                             f"{layout.num_layers} layers")
        rules = [("^" + layout.embeddings, FROZEN)]
        ends = list(itertools.accumulate(layout.unit_sizes or (1,) * layout.num_layers))
        if frozen_layers and frozen_layers not in ends:
            raise ValueError(f"frozen_layers={frozen_layers} cuts through a scanned stack of layers "
                             f"{layout.unit_sizes}; freeze whole stacks")
        if frozen_layers:
            blocks = "|".join(str(i) for i in range(ends.index(frozen_layers) + 1))
            rules.append(("^" + layout.layer.format(i=f"({blocks})"), FROZEN))
        return rules + [(".*", TRAINABLE)]
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")


def label_params(names: Iterable[str], rules: Rules) -> dict[str, str]:
    """Labels each parameter path with the label of the first matching rule."""
    compiled = [(re.compile(pattern), label) for pattern, label in rules]
    labels = {}
    for name in names:
        for pattern, label in compiled:
            if pattern.search(name):
                labels[name] = label
                break
        else:
            raise ValueError(f"parameter {name!r} matches no rule in {list(rules)}")
    return labels


def partition(labels: Mapping[str, str], trainable_tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """The optimizer: `trainable_tx` on trainable parameters, `set_to_zero` (no state) on frozen ones."""
    return optax.partition({TRAINABLE: trainable_tx, FROZEN: optax.set_to_zero()}, dict(labels))


def trainable_names(labels: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(sorted(name for name, label in labels.items() if label == TRAINABLE))
