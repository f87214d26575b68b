"""Scores of every stage's evaluation set with the model after stage i (a row of the accuracy matrix,
`sft_jax.trainer.stages`): image stages by classification accuracy, language-model stages by next-token accuracy
on their target tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from sft_jax import storage
from sft_jax.data import batching, images
from sft_jax.losses import image_classification_loss
from sft_jax.rundir import RunDir
from sft_jax.state import ModelDef
from sft_jax.tasks import classification, image_model
from sft_jax.train_step import make_eval_step

STAGE_MODEL = "model"  # WORKDIR/stages/I/model: a language-model stage's best model as a HF folder


class ImageStageScorer:
    """Accuracy on stage j's evaluation images of the model after stage i (None: the starting model)."""

    metric = "eval/accuracy"

    def __init__(self, configs: list[ml_collections.ConfigDict], dirs: list[str], scenario: str = "task"):
        self.configs, self.dirs, self.scenario = configs, dirs, scenario
        self._own: dict[int, list[str]] = {}
        self._data: dict[tuple, images.ImageDataset] = {}
        self._heads: dict[int, image_model.SourceHead] = {}
        self._eval_fns: dict[tuple, object] = {}

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

    def row(self, i: int | None) -> dict[str, list[float]]:
        """{metric: the scores of every stage's evaluation set} with the model after stage i (None: the
        starting one)."""
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
            # One compiled step per head shape: every classifier of the sequence has the same backbone.
            key = (len(labels), c.pooling)
            if key not in self._eval_fns:
                self._eval_fns[key] = make_eval_step(model_def, image_classification_loss)
            ev = classification.evaluate(self._eval_fns[key], params,
                                         self._dataset(j, labels, spec.vit_config.image_size),
                                         batch_size=c.eval_batch_size, buckets=c.buckets, pad_id=0,
                                         num_labels=len(labels), collate=images.image_collate(spec.mean, spec.std))
            scores.append(float(ev[self.metric]))
        return {self.metric: scores}


def export_stage_model(stage_dir: str) -> str:
    """A language-model stage's best model (LoRA adapters folded in) as a HF folder, STAGE/model, which the next
    stage loads as its `config.model`. Written to STAGE/model.tmp and renamed, so a half-written folder is never
    taken for a model; an existing one is kept."""
    import shutil

    from jax.experimental import multihost_utils

    from sft_jax import distributed
    from sft_jax.export.decoders import export_hf

    out = storage.join(stage_dir, STAGE_MODEL)
    if distributed.is_primary() and not storage.isdir(out):
        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        export_hf(stage_dir, tmp, "best")  # what `python -m sft_jax.export --format=hf` writes
        storage.rename(tmp, out)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"stage model {out}")
    return out


class LmStageScorer:
    """Next-token accuracy on stage j's evaluation data (its target tokens) of the model after stage i (None:
    the model the first stage starts from); each stage keeps its own prompt format and lengths."""

    metric = "eval/accuracy"

    def __init__(self, configs: list[ml_collections.ConfigDict], dirs: list[str]):
        self.configs, self.dirs = configs, dirs

    def row(self, i: int | None) -> dict[str, list[float]]:
        """{eval/accuracy: [...], eval/loss: [...]} over the stages' evaluation data."""
        from sft_jax.models.finetuned import build_lm
        from sft_jax.models.loading.lm import load_lm_tokenizer
        from sft_jax.tasks import language_model

        first = self.configs[0]
        if i is None:
            lm, _ = build_lm(first.model, "full", first.dtype, ignore_weights=tuple(first.ignore_weights))
            path = first.model
        else:  # the stage's best checkpoint, adapters folded in (what the next stage starts from)
            lm, _, _ = language_model.load_finetuned_lm(self.dirs[i], "best", merge=True)
            path = self.configs[i].model
        model_def, params = ModelDef.split(lm)
        eval_fn = make_eval_step(model_def, language_model.loss_fn(first))  # the same loss in every stage
        scores, losses = [], []
        for c in self.configs:
            tokenizer = load_lm_tokenizer(path, c.tokenizer)
            ds, _ = language_model.read_eval_rows(c, tokenizer, c.data.eval)
            ev = language_model.next_token_scores(eval_fn, params, ds, c, tokenizer.pad_token_id)
            scores.append(float(ev[self.metric]))
            losses.append(float(ev["eval/loss"]))
        return {self.metric: scores, "eval/loss": losses}
