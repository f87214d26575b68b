"""Where a model's parts live in its parameter paths: what freezing rules and parameter groups match on."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ParamLayout:
    """Where the parts of a task model live in its parameter paths (regexes)."""

    embeddings: str  # e.g. r"encoder/embeddings/"
    layer: str  # with {i}, e.g. r"encoder/layers/{i}/"
    head: str  # the freshly added layers, e.g. r"head/"
    num_layers: int
    fresh: str = ""  # freshly initialised parameters (no pre-trained value), e.g. r"head/"; "" for none
    # Layers per unit that `layer` numbers, where a unit holds several (scanned segments: models/scan.py);
    # empty: one layer each.
    unit_sizes: tuple[int, ...] = ()
