"""Sequential stages (`config.stages`): each stage's config, and the continual-learning summary of an accuracy
matrix (Lopez-Paz and Ranzato 2017, "Gradient Episodic Memory for Continual Learning", section 4).

R[i][j] is the main metric on stage j's evaluation set after training stage i; b[j] that of the model the first
stage starts from (the pre-trained one, with stage j's initial head). With T stages:
  average accuracy  (1 / T) sum_j R[T-1][j]
  backward transfer (1 / (T-1)) sum_{j < T-1} (R[T-1][j] - R[j][j])      negative: forgetting
  forward transfer  (1 / (T-1)) sum_{j >= 1} (R[j-1][j] - b[j])          what earlier stages give a later one
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

# Keys a stage cannot set: they belong to the sequence (where a stage starts from, what the sequence is).
SEQUENCE_KEYS = ("model", "stages", "task")


def stage_configs(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
    """The config of each stage: `config` without `stages`, updated with the stage's keys (dotted paths, e.g.
    "data.train" or "regularizer.l2sp"); keys a stage leaves out are inherited. ValueError naming
    `config.stages[i].KEY` for a key the config lacks or one of `SEQUENCE_KEYS`."""
    stages = list(config.stages)
    if len(stages) < 2:
        raise ValueError(f"config.stages: a sequence needs at least 2 stages, got {len(stages)}")
    out = []
    for i, stage in enumerate(stages):
        if not isinstance(stage, Mapping):
            raise ValueError(f"config.stages[{i}]: expected a dict of config keys, got {type(stage).__name__}")
        c = ml_collections.ConfigDict(config.to_dict())
        c.stages, c.stages_replay = (), 0  # the sequence's own keys; stages_replay becomes data.replay_*
        for key, value in stage.items():
            where = f"config.stages[{i}].{key}"
            if key in SEQUENCE_KEYS:
                raise ValueError(f"{where}: set for the whole sequence, not per stage (each stage starts from the "
                                 "previous stage's model)")
            *parents, leaf = key.split(".")
            node = c
            for p in parents:
                node = node.get(p) if isinstance(node, ml_collections.ConfigDict) else None
            if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
                raise ValueError(f"{where}: unknown config key {key!r}")
            node[leaf] = _like(node[leaf], value, where)
        out.append(c)
    return out


def _like(old: Any, value: Any, where: str) -> Any:
    """`value` as the type the key holds (ints for float keys, lists for tuples), else ValueError."""
    if isinstance(old, bool) or old is None:
        return value
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(old, (tuple, list)) and isinstance(value, (tuple, list)):
        return tuple(value)
    if isinstance(old, ml_collections.ConfigDict):
        raise ValueError(f"{where}: a group of keys; set its keys one by one ({where}.KEY)")
    if not isinstance(value, type(old)):
        raise ValueError(f"{where}: expected {type(old).__name__}, got {value!r}")
    return value


def summary(matrix: Sequence[Sequence[float]], initial: Sequence[float] | None = None) -> dict[str, float]:
    """continual/average_accuracy, continual/bwt and (given the initial model's scores `initial`)
    continual/fwt of a complete T x T accuracy matrix."""
    t = len(matrix)
    if t < 2 or any(len(row) != t for row in matrix):
        raise ValueError(f"an accuracy matrix of at least 2 x 2 stages is needed, got {[len(r) for r in matrix]}")
    out = {"continual/average_accuracy": sum(matrix[-1]) / t,
           "continual/bwt": sum(matrix[-1][j] - matrix[j][j] for j in range(t - 1)) / (t - 1)}
    if initial is not None:
        out["continual/fwt"] = sum(matrix[j - 1][j] - initial[j] for j in range(1, t)) / (t - 1)
    return out
