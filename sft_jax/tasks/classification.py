"""What text and image classification share: the label vocabulary of a run, LoRA adapters on the backbone and
the evaluation loop."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from sft_jax.data import batching
from sft_jax.data.sources import DataError
from sft_jax.evaluate import metrics as metrics_lib
from sft_jax.models import lora
from sft_jax.rundir import RunDir
from sft_jax.tasks.base import Task

METRICS = ("eval/accuracy", "eval/f1", "eval/loss")
# strategy=lora with `lora.targets` left at its default (which names a decoder's projections): every block's
# attention and MLP projections. BERT / RoBERTa / XLM-R name them attention/{query,key,value,out} and
# mlp/{up,down}, ModernBERT adds mlp/gate, and the ViT reuses BERT's modules.
ENCODER_LORA_TARGETS = r"layers/\d+/(attention/(query|key|value|out)|mlp/(gate|up|down))$"
HEAD = "head"  # the classifier's own layer (module path), trained whole beside the adapters


class ClassificationTask(Task):
    """A classifier's metrics (`METRICS`); strategy=lora puts adapters on the backbone's projections
    (`add_lora`) and trains them with the head."""

    strategies = ("head", "partial", "full", "lora")

    @classmethod
    def metric_names(cls, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        return METRICS

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        super().check_config(config)
        if config.strategy == "lora":
            targets = lora_targets(config.lora)
            try:
                matches_head = re.search(targets, HEAD)
            except re.error as e:
                raise ValueError(f"config.lora.targets: {targets!r} is not a regex ({e})") from None
            if matches_head:
                raise ValueError(f"config.lora.targets: {targets!r} matches the classifier head, which trains whole "
                                 "under strategy=lora; name backbone projections only")
            if config.lora.dropout:
                # The encoders and the ViT call their projections without a key (only decoders pass one).
                raise ValueError(f"config.lora.dropout: adapter dropout is implemented for decoders only; set 0 for "
                                 f"{config.task}")


def lora_targets(lora_config: Mapping[str, Any]) -> str:
    """The regex choosing the adapted projections: `lora.targets` as given, or `ENCODER_LORA_TARGETS` when it
    is left at its default (`sft_jax.models.lora.DEFAULT_TARGETS`, a decoder's module names)."""
    targets = lora_config["targets"]
    return ENCODER_LORA_TARGETS if targets == lora.DEFAULT_TARGETS else targets


def add_lora(module: nnx.Module, config: Mapping[str, Any]) -> list[str]:
    """For `config["strategy"] == "lora"` (a run's config, or its config.json), replaces the backbone
    projections of the classifier `module` chosen by `lora_targets` with adapters, in place; the head stays
    as it is. Returns the adapted module paths ([] for another strategy)."""
    if config["strategy"] != "lora":
        return []
    targets = lora_targets(config["lora"])
    try:
        cfg = lora.LoraConfig.from_any(config["lora"])
        return lora.apply_lora(module, targets, cfg.rank, cfg.alpha, cfg.dropout, rngs=nnx.Rngs(config["seed"]))
    except ValueError as e:  # "lora.targets: ... matches no linear layer of ...", for the config key
        raise ValueError(f"config.{e}") from None


def label_vocab(data_spec: str, rundir: RunDir, train_examples: Sequence, labels: Sequence[str] = ()
                ) -> batching.LabelVocab:
    """The labels found in the training data, or `labels` (config.data.labels) in their order, which must hold
    every training label; on resume they must equal those saved in the workdir."""
    if labels:  # the training data may hold only some of them (one stage of a growing head)
        missing = batching.LabelVocab.ordered({e.label for e in train_examples} - set(labels))
        if missing:
            raise DataError(f"{data_spec}: label {missing[0]!r} is not one of config.data.labels {list(labels)}")
        if len(labels) < 2:
            raise ValueError(f"config.data.labels: classification needs at least 2 labels, got {list(labels)}")
        found = batching.LabelVocab(list(labels))
    else:
        found = batching.LabelVocab.from_examples(train_examples)
    if not rundir.has_trained():  # labels.json of a run that failed in set-up binds nothing
        return found
    try:
        saved = rundir.read_labels()
    except FileNotFoundError:
        return found
    if saved.labels != found.labels:
        raise DataError(f"{data_spec}: labels {found.labels} differ from {saved.labels} saved in "
                        f"{rundir.labels_path}; use a new workdir")
    return saved


def evaluate(eval_fn, params, eval_ds, *, batch_size: int, buckets: Sequence[int], pad_id: int, num_labels: int,
             collate=None) -> dict[str, float]:
    """Accuracy, macro F1 and mean loss of `params` on `eval_ds`."""
    preds = np.zeros(len(eval_ds), np.int32)
    loss_sum = 0.0
    for idx, batch in batching.eval_batches(eval_ds, batch_size, buckets, pad_id, collate):
        aux = jax.device_get(eval_fn(params, batch))
        preds[idx] = aux["predictions"][: len(idx)]
        loss_sum += float(aux["loss_sum"])
    return {"eval/accuracy": metrics_lib.accuracy(preds, eval_ds.labels),
            "eval/f1": metrics_lib.macro_f1(preds, eval_ds.labels, num_labels),
            "eval/loss": loss_sum / len(eval_ds)}
