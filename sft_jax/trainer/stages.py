"""`config.stages`: one command trains a sequence of stages, each an ordinary run in WORKDIR/stages/I that starts
from the previous stage's model (its best checkpoint; LoRA adapters folded in), and scores every stage's
evaluation set after each stage (the accuracy matrix, `sft_jax.continual`).

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

import jax.numpy as jnp
import ml_collections
import tqdm

from sft_jax import continual, distributed, regularizers, storage
from sft_jax.config_defaults import validate
from sft_jax.data import batching, images
from sft_jax.losses import image_classification_loss
from sft_jax.rundir import RunDir
from sft_jax.state import ModelDef
from sft_jax.tasks import classification, image_model
from sft_jax.train_step import make_eval_step

MATRIX_FILE = "continual.json"
# What makes a sequence: a rerun on the same workdir with any of these changed would mix two sequences' rows.
SEQUENCE_KEYS = ("stages", "stages_scenario", "stages_replay", "model", "task")
# Tasks whose `config.model` may be an earlier run's workdir, which is how a stage starts from the previous one.
CHAINABLE_TASKS = ("image_classification",)


def stage_dir(workdir: str, i: int) -> str:
    return storage.join(storage.normalize(workdir), "stages", str(i))


def train_stages(config: ml_collections.ConfigDict, workdir: str, train_one) -> dict[str, Any]:
    """Trains the stages of `config.stages` in order with `train_one(config, workdir)` (train_and_evaluate),
    scoring the matrix after each; returns (and writes to WORKDIR/results.json) the sequence's results."""
    if config.task not in CHAINABLE_TASKS:
        raise ValueError(f"config.stages: a stage starts from the previous stage's workdir, which task "
                         f"{config.task!r} cannot load as its model yet; sequences run for {CHAINABLE_TASKS}")
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
            c.model = dirs[i - 1]
    scorer = ImageStageScorer(configs, dirs, config.stages_scenario)
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
        stage_results.append(results)
        if len(rows) <= i:
            rows.append(scorer.row(i))
            _write_matrix(root, rows, initial)
    if initial is None and config.stages_scenario == "task":
        initial = scorer.row(None)
        _write_matrix(root, rows, initial)
    out = {"continual/accuracy_matrix": rows, "continual/scenario": config.stages_scenario,
           "continual/metric": scorer.metric, **continual.summary(rows, initial)}
    if initial is not None:
        out["continual/initial_accuracy"] = initial
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
    path = root.file(MATRIX_FILE)
    return json.loads(storage.read_bytes(path)) if storage.isfile(path) else {}


def _write_matrix(root: RunDir, rows: list, initial: list | None) -> None:
    if distributed.is_primary():
        storage.write_json(root.file(MATRIX_FILE), {"rows": rows, "initial": initial})


class ImageStageScorer:
    """Accuracy on stage j's evaluation images of the model after stage i (None: the starting model)."""

    metric = "eval/accuracy"

    def __init__(self, configs: list[ml_collections.ConfigDict], dirs: list[str], scenario: str = "task"):
        self.configs, self.dirs, self.scenario = configs, dirs, scenario
        self._own: dict[int, list[str]] = {}
        self._data: dict[tuple, images.ImageDataset] = {}
        self._heads: dict[int, image_model.SourceHead] = {}

    def own_labels(self, j: int) -> list[str]:
        """The labels of stage j's training data, sorted."""
        if j not in self._own:
            self._own[j] = batching.LabelVocab.ordered(r.label for r in self._records(j, "train"))
        return self._own[j]

    def labels(self, j: int) -> list[str]:
        """Stage j's classifier labels: as its run saved them, else as its config or training data gives them."""
        rundir = RunDir(self.dirs[j])
        if storage.isfile(rundir.labels_path):
            return rundir.read_labels().labels
        return list(self.configs[j].data.labels) or self.own_labels(j)

    def _records(self, j: int, split: str) -> list:
        d = self.configs[j].data
        return images.read_image_records(d[split], image_field=d.image_field, label_field=d.label_field,
                                         data_dir=d.tfds_data_dir, classes=tuple(d.classes))

    def _dataset(self, j: int, labels: list[str], size: int) -> images.ImageDataset:
        key = (j, tuple(labels))
        if key not in self._data:
            self._data[key] = images.load_images(self._records(j, "eval"), batching.LabelVocab(labels), size)
        return self._data[key]

    def _model(self, i: int | None):
        """(backbone, head as a SourceHead or None, spec) after stage i, or of the starting model."""
        if i is None:
            c = self.configs[0]
            spec = image_model.resolve_image_model(c.model, c.vit, c.image, jnp.dtype(c.dtype))
            vit, head = image_model.load_backbone(spec, c.seed, tuple(c.ignore_weights))
            return vit, head, spec
        classifier, head, spec = image_model.load_image_run(self.dirs[i], "best", merge=True)
        return classifier.vit, head, spec

    def _trained_head(self, j: int) -> image_model.SourceHead:
        if j not in self._heads:
            self._heads[j] = image_model.load_image_run(self.dirs[j], "best")[1]
        return self._heads[j]

    def row(self, i: int | None) -> list[float]:
        """The scores of every stage's evaluation set with the model after stage i (None: the starting one)."""
        vit, head, spec = self._model(i)
        scores = []
        for j, c in enumerate(self.configs):
            if self.scenario == "class":  # the head after stage i, over every class seen so far
                labels, own = head.labels, head
                if not set(self.own_labels(j)) <= set(labels):
                    scores.append(0.0)  # stage j's classes have no outputs yet
                    continue
            else:
                labels = self.labels(j)
                own = self._trained_head(j) if i is not None and j <= i and head.labels != labels else head
            module = image_model.build_classifier(vit, labels, own, pooling=c.pooling, dropout=0.0, seed=c.seed)
            model_def, params = ModelDef.split(module)
            ev = classification.evaluate(make_eval_step(model_def, image_classification_loss), params,
                                         self._dataset(j, labels, spec.vit_config.image_size),
                                         batch_size=c.eval_batch_size, buckets=c.buckets, pad_id=0,
                                         num_labels=len(labels), collate=images.image_collate(spec.mean, spec.std))
            scores.append(float(ev[self.metric]))
        return scores
