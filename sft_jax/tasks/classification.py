"""What text and image classification share: the label vocabulary of a run and the evaluation loop."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from sft_jax.data import batching
from sft_jax.data.sources import DataError
from sft_jax.evaluate import metrics as metrics_lib
from sft_jax.rundir import RunDir
from sft_jax.tasks.base import Task

METRICS = ("eval/accuracy", "eval/f1", "eval/loss")


class ClassificationTask(Task):
    """A classifier's metrics (`METRICS`); LoRA is refused (its adapters are written for decoder layers)."""

    @classmethod
    def metric_names(cls, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        return METRICS

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        if config.strategy == "lora":
            raise ValueError("config.strategy: lora is implemented for decoder tasks (language_modeling, sft); "
                             f"use head, partial or full for {config.task}")
        super().check_config(config)


def label_vocab(data_spec: str, rundir: RunDir, train_examples: Sequence) -> batching.LabelVocab:
    """The labels found in the training data; on resume they must equal those saved in the workdir."""
    found = batching.LabelVocab.from_examples(train_examples)
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
