"""`config.stages`: one command trains a sequence of stages, each an ordinary run in WORKDIR/stages/I that starts
from the previous stage's model (its best checkpoint; LoRA adapters folded in), and scores every stage's
evaluation set after each stage (the accuracy matrix, `sft_jax.continual`).

Language-model stages (sft, language_modeling; task-incremental) pass their best model on as a HF folder,
STAGE/model (adapters folded in), and are scored by next-token accuracy on their target tokens, their eval/loss
kept beside it (continual/loss_matrix).

`config.stages_scenario` chooses the head. "task" (task-incremental): a head per stage, stage j scored under
its own head (see below). "class" (class-incremental): one head that grows by each stage's new classes (stage
i's `data.labels` are the labels of stages 0..i, the outputs of known classes carried over), every stage
scored over all the classes seen so far; a stage whose classes are not yet seen scores 0, and there is no
forward transfer to report (no initial row).

A stage is resumed like any run (the same command continues the stage it was killed in, bit-identically); a
finished stage (its results.json written) is not trained again, and the matrix rows already scored are kept in
WORKDIR/continual.json. Which head scores stage j with the model after stage i: the current head when stage j
has the same labels (one shared head), else the head stage j trained (j <= i; a head per stage, the
task-incremental setting), or the head stage j would start with (j > i). The initial scores b[j] are those of
the model the first stage starts from, with stage j's initial head.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections
import tqdm

from sft_jax import continual, distributed, regularizers, storage
from sft_jax.config_defaults import validate
from sft_jax.rundir import RunDir
from sft_jax.trainer import stage_scorers

MATRIX_FILE = "continual.json"
# What makes a sequence: a rerun on the same workdir with any of these changed would mix two sequences' rows.
SEQUENCE_KEYS = ("stages", "stages_scenario", "stages_replay", "model", "task")
# Tasks that run as stages: an image stage's `config.model` is the previous stage's workdir, a language-model
# stage's the previous stage's best model exported as a HF folder (STAGE/model).
CHAINABLE_TASKS = ("image_classification", "sft", "language_modeling")
LM_TASKS = ("sft", "language_modeling")


def stage_dir(workdir: str, i: int) -> str:
    return storage.join(storage.normalize(workdir), "stages", str(i))


def train_stages(config: ml_collections.ConfigDict, workdir: str, train_one) -> dict[str, Any]:
    """Trains the stages of `config.stages` in order with `train_one(config, workdir)` (train_and_evaluate),
    scoring the matrix after each; returns (and writes to WORKDIR/results.json) the sequence's results."""
    if config.task not in CHAINABLE_TASKS:
        raise ValueError(f"config.stages: a stage starts from the previous stage's model, which task "
                         f"{config.task!r} cannot load as its model yet; sequences run for {CHAINABLE_TASKS}")
    lm = config.task in LM_TASKS
    if lm and config.stages_scenario != "task":
        raise ValueError(f"config.stages_scenario={config.stages_scenario!r}: class-incremental stages need a "
                         f"classifier; {config.task} stages are scored task by task (stages_scenario='task')")
    if lm and storage.is_remote(workdir):
        raise ValueError(f"{workdir}: language-model stages pass their models on as local HF folders; give a "
                         "local workdir")
    configs = continual.stage_configs(config)
    for i, c in enumerate(configs):  # every stage's mistakes before the first stage trains
        try:
            validate(c)
        except ValueError as e:
            raise ValueError(f"config.stages[{i}]: {e}") from None
    root = RunDir(workdir)
    root.ensure_writable()
    _check_same_sequence(root, config)
    saved = _read_matrix(root)
    rows, initial = saved.get("rows", []), saved.get("initial")
    dirs = [stage_dir(workdir, i) for i in range(len(configs))]
    for i, c in enumerate(configs):
        if i:
            c.model = storage.join(dirs[i - 1], stage_scorers.STAGE_MODEL) if lm else dirs[i - 1]
    scorer = (stage_scorers.LmStageScorer(configs, dirs) if lm
              else stage_scorers.ImageStageScorer(configs, dirs, config.stages_scenario))
    if config.stages_scenario == "class":
        if any(c.data.labels for c in configs):
            raise ValueError("config.stages_scenario='class' sets each stage's data.labels (the classes seen so "
                             "far); leave config.data.labels empty")
        seen: list[str] = []
        for j, c in enumerate(configs):
            if j and config.stages_replay:  # a memory of every class the earlier stages trained
                c.data.replay_classes, c.data.replay_per_class = tuple(seen), config.stages_replay
            seen += [label for label in scorer.own_labels(j) if label not in seen]
            c.data.labels = tuple(seen)
    for i, c in enumerate(configs):  # online EWC: a stage adds its Fisher to that of the EWC stage before it
        c.regularizer.keep_fisher = bool(c.regularizer.ewc)
        if i and c.regularizer.ewc and configs[i - 1].regularizer.ewc:
            c.regularizer.fisher_prior = RunDir(dirs[i - 1]).file(regularizers.FISHER_FILE)
    stage_results = []
    for i, c in enumerate(configs):
        done = RunDir(dirs[i]).file("results.json")
        if storage.isfile(done):
            results = json.loads(storage.read_bytes(done))
        else:
            tqdm.tqdm.write(f"stage {i + 1} of {len(configs)}: {dirs[i]}")
            results = train_one(c, dirs[i])
            if results.get("preempted"):
                return {**results, "stage": i}
        if lm and i + 1 < len(configs):
            stage_scorers.export_stage_model(dirs[i])
        stage_results.append(results)
        if len(rows) <= i:
            rows.append(scorer.row(i))
            _write_matrix(root, rows, initial)
    if initial is None and config.stages_scenario == "task":
        initial = scorer.row(None)
        _write_matrix(root, rows, initial)
    primary = [r[scorer.metric] for r in rows]
    first = initial[scorer.metric] if initial is not None else None
    out = {"continual/accuracy_matrix": primary, "continual/scenario": config.stages_scenario,
           "continual/metric": scorer.metric, **continual.summary(primary, first)}
    if first is not None:
        out["continual/initial_accuracy"] = first
    for name in rows[0]:  # the scorer's other metrics, cell by cell (a language model's eval/loss)
        if name != scorer.metric:
            short = name.split("/")[-1]
            out[f"continual/{short}_matrix"] = [r[name] for r in rows]
            if initial is not None:
                out[f"continual/initial_{short}"] = initial[name]
    for i, results in enumerate(stage_results):
        out.update({f"continual/stage_{i}/{k}": v for k, v in results.items()
                    if k.startswith(("eval/", "test/", "forgetting/")) or k in ("step", "best_step")})
    if distributed.is_primary():
        root.write_results(out)
    return out


def _check_same_sequence(root: RunDir, config: ml_collections.ConfigDict) -> None:
    """Writes the sequence's config (WORKDIR/config.json) on its first run; a rerun with other stages or another
    scenario would mix two sequences' rows and stops in one line."""
    sequence = json.loads(json.dumps(config.to_dict(), default=str))  # tuples as JSON reads them back
    if not storage.isfile(root.file("config.json")):
        if distributed.is_primary():
            root.write_config(sequence)
        return
    old = root.read_config()
    changed = [k for k in SEQUENCE_KEYS if old.get(k) != sequence.get(k)]
    if changed:
        raise ValueError(f"{root.path}: cannot resume, the sequence changed ({', '.join(changed)}); use a new "
                         "workdir")


def _read_matrix(root: RunDir) -> dict:
    """{"rows": [{metric: [score per stage]} after each stage scored so far], "initial": the same or None}."""
    path = root.file(MATRIX_FILE)
    return json.loads(storage.read_bytes(path)) if storage.isfile(path) else {}


def _write_matrix(root: RunDir, rows: list, initial: list | None) -> None:
    if distributed.is_primary():
        storage.write_json(root.file(MATRIX_FILE), {"rows": rows, "initial": initial})
