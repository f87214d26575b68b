"""image_classification: {"image", "label"} records (or an image folder), a ViT with a classification head.

What `config.model` may be is in `sft_jax.tasks.image_model`. The forgetting probe is the source-task accuracy
of the model's original head on the current backbone; EWC's Fisher is that of the source task's
classification loss, on images of the source classes (`regularizer.fisher_data`), under the original head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sft_jax import distributed, regularizers
from sft_jax.data import batching, images
from sft_jax.data.sources import DataError
from sft_jax.flops import FlopsModel
from sft_jax.losses import image_classification_loss
from sft_jax.models.vit import ImageClassifier, ViTConfig, vit_layout
from sft_jax.rundir import RunDir
from sft_jax.state import ModelDef
from sft_jax.tasks import classification, image_model
from sft_jax.tasks.registry import register
from sft_jax.train_step import make_eval_step


@register("image_classification")
class ImageClassification(classification.ClassificationTask):
    higher_is_better = {"source_accuracy": True}
    exclusive_options = {"forgetting.images": "the image forgetting probe"}

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        super().check_config(config)
        if config.model == image_model.VIT_SCRATCH:
            try:
                ViTConfig(**config.vit.to_dict())
            except ValueError as e:
                raise ValueError(f"config.vit: {e}") from None
            if min(v for k, v in config.vit.items() if not k.endswith("dropout_prob")) <= 0:
                raise ValueError(f"config.vit: sizes must be positive, got {config.vit.to_dict()}")

    def __init__(self, config: ml_collections.ConfigDict, rundir: RunDir):
        self.config = config
        d = config.data
        train_records, eval_records = self._read(d.train), self._read(d.eval)
        memory = []  # replayed images of other classes (data.replay_classes), added after validation is carved
        if d.replay_classes:
            memory = batching.replay_memory(self._read(d.train, classes=tuple(d.replay_classes)),
                                            d.replay_per_class, config.seed)
        self.vocab = classification.label_vocab(d.train, rundir, train_records + memory, tuple(d.labels))
        spec = image_model.resolve_image_model(config.model, config.vit, config.image, jnp.dtype(config.dtype))
        self.image_size = size = spec.vit_config.image_size
        if d.validation_fraction:  # evaluations select on images carved from train; data.eval is reported
            self.test_data = {"eval_ds": images.load_images(eval_records, self.vocab, size)}
            train_records, eval_records = batching.carve_validation(train_records, d.validation_fraction, config.seed)
        train_records = batching.subsample(train_records, d.max_train_examples, config.seed) + memory
        # Eval first: its labels are checked before any time is spent decoding the training images.
        self.eval_ds = images.load_images(eval_records, self.vocab, size)
        self.train_ds = images.load_images(train_records, self.vocab, size)
        self.collate = images.image_collate(spec.mean, spec.std)
        vit, self.source = image_model.load_backbone(spec, config.seed, tuple(config.ignore_weights))
        self.source_ds = None
        uses_source = {"config.forgetting.images": config.forgetting.images,
                       "config.regularizer.ewc": config.regularizer.ewc}
        for key, value in uses_source.items():
            if value and self.source is None:
                raise ValueError(f"{key}: {config.model} has no classification head of its own to probe; give "
                                 "the workdir of an image run or a ViTForImageClassification")
        if config.forgetting.images:
            self.source_ds = self._source_images(config.forgetting.images)
        module = image_model.build_classifier(vit, self.vocab.labels, self.source, pooling=config.pooling,
                                              dropout=config.head_dropout, seed=config.seed,
                                              grow=bool(d.labels))
        classification.add_lora(module, config)
        if self.source is not None:  # the backbone as it trains (adapters included) under the source head
            probe = ImageClassifier(module.vit, len(self.source.labels), pooling=self.source.pooling,
                                    rngs=nnx.Rngs(0))
            self._source_def = ModelDef.split(probe)[0]
        if self.source_ds is not None:
            self._source_eval = make_eval_step(self._source_def, image_classification_loss)
        if distributed.is_primary():
            rundir.write_labels(self.vocab)
        self.model_def, self.params = ModelDef.split(module)
        self.layout = vit_layout(spec.vit_config.num_hidden_layers)
        self.vit_config = spec.vit_config
        self.loss_fn = image_classification_loss
        self.batches = images.ImageTrainBatches(self.train_ds, config.batch_size, config.seed, mean=spec.mean,
                                                std=spec.std, crop_padding=config.image.crop_padding,
                                                flip=config.image.flip)
        self.summary = {"train_examples": len(self.train_ds), "eval_examples": len(self.eval_ds),
                        "num_labels": len(self.vocab), "image_size": size}
        if memory:
            self.summary["replay_examples"] = len(memory)
        if self.source_ds is not None:
            self.summary["source_eval_examples"] = len(self.source_ds)

    def flops_model(self, trainable: tuple[str, ...]) -> FlopsModel:
        """The patch projection (a convolution kernel) is left out: under 1% of a ViT's matmul FLOPs."""
        c = self.vit_config
        return FlopsModel({k: tuple(v.shape) for k, v in self.params.items()}, tuple(trainable),
                          {"layers": c.num_hidden_layers, "width": c.hidden_size, "causal": False})

    def flops_shape(self, batch: dict[str, np.ndarray]) -> tuple[int, int]:
        return len(batch["pixel_values"]), self.vit_config.num_patches + 1  # the patches and the class token

    def reference_inputs(self, count: int, rows: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        batch = self.collate(self.eval_ds, np.arange(min(count, len(self.eval_ds))), rows)
        return batch, np.repeat(batch["weights"][:, None], self.vit_config.num_patches + 1, axis=1)

    def reference_forward(self, model, batch: dict[str, jax.Array]) -> None:
        model.vit(batch["pixel_values"])  # its blocks' outputs are what is recorded

    def _read(self, spec: str, classes: tuple[str, ...] | None = None) -> list:
        d = self.config.data
        return images.read_image_records(spec, image_field=d.image_field, label_field=d.label_field,
                                         data_dir=d.tfds_data_dir,
                                         classes=tuple(d.classes) if classes is None else classes)

    def _source_images(self, spec: str) -> images.ImageDataset:
        """Images of the source head's classes (labelled with them), at this run's image size."""
        records = self._read(spec, classes=tuple(self.source.labels))
        return images.load_images(records, batching.LabelVocab(self.source.labels), self.image_size)

    def _with_source_head(self, params: dict) -> dict:
        """The fine-tuned backbone under the source head (a fresh head of this run is set aside)."""
        probe = {k: v for k, v in params.items() if not k.startswith("head/")}
        probe.update({"head/kernel": jnp.asarray(self.source.kernel), "head/bias": jnp.asarray(self.source.bias)})
        return probe

    def evaluate(self, eval_fn, params, step: int | None = None) -> dict[str, float]:
        return self._evaluate(eval_fn, params, self.eval_ds, len(self.vocab))

    def _evaluate(self, eval_fn, params, ds, num_labels: int) -> dict[str, float]:
        return classification.evaluate(eval_fn, params, ds, batch_size=self.config.eval_batch_size,
                                       buckets=self.config.buckets, pad_id=0, num_labels=num_labels,
                                       collate=self.collate)

    def probes(self, params: dict) -> dict[str, float]:
        if self.source_ds is None:
            return {}
        ev = self._evaluate(self._source_eval, self._with_source_head(params), self.source_ds,
                            len(self.source.labels))
        return {"source_accuracy": ev["eval/accuracy"]}

    def fisher(self, params: dict, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        r = self.config.regularizer
        ds = self._source_images(r.fisher_data)
        size = r.fisher_batch_size
        count = min(r.fisher_batches, len(ds) // size)
        if not count:
            raise DataError(f"{r.fisher_data}: {len(ds)} images of the source classes {self.source.labels}, fewer "
                            f"than fisher_batch_size={size}")
        order = np.random.default_rng(self.config.seed).permutation(len(ds))
        batches = [self.collate(ds, order[i * size:(i + 1) * size], size) for i in range(count)]
        # The head's parameters keep their names under the source head: a source head kept as this run's
        # own (same labels) is penalised like the backbone; a fresh head is never anchored.
        return regularizers.empirical_fisher(self._source_def, self._with_source_head(params), names,
                                             image_classification_loss, batches, seed=self.config.seed)
