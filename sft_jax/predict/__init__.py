"""Classify texts or images with a fine-tuning run's checkpoint and its saved label vocabulary.

    Predictor(workdir).predict(["a gorgeous film"])    # text_classification runs
    ImagePredictor(workdir).predict(["dog.jpg"])        # image_classification runs

Each returns, per input, the predicted label, its probability, and every label's probability. The command
line is `python -m sft_jax.predict` (`sft_jax/predict/__main__.py`).
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from sft_jax.data import images
from sft_jax.data.batching import EncodedDataset, eval_batches, tokenize
from sft_jax.losses import classification_loss
from sft_jax.run_kinds import require_task
from sft_jax.rundir import RunDir
from sft_jax.tasks.image_model import load_image_run
from sft_jax.tasks.text import TextClassifier
from sft_jax.train_step import make_eval_step


def _rows(key: str, inputs: list, labels: list[str], probs: np.ndarray) -> list[dict]:
    out = []
    for item, p in zip(inputs, probs):
        best = int(np.argmax(p))
        out.append({key: item, "label": labels[best], "probability": float(p[best]),
                    "probabilities": {label: float(q) for label, q in zip(labels, p)}})
    return out


class Predictor:
    """Loads a text run's model once; `predict(texts)` returns per-text label probabilities."""

    def __init__(self, workdir: str, checkpoint: str = "best"):
        rundir = RunDir(workdir)
        self.config = ml_collections.ConfigDict(require_task(workdir, ("text_classification",), "classify texts"))
        self.vocab = rundir.read_labels()
        self.model = TextClassifier(self.config, len(self.vocab))
        self.params = rundir.restore_params(self.model.params, checkpoint, fallback=False)
        self._eval = make_eval_step(self.model.model_def, classification_loss)

    def predict(self, texts: list[str]) -> list[dict]:
        ids, _ = tokenize(self.model.tokenizer, texts, self.model.max_length)
        ds = EncodedDataset(ids, np.zeros(len(ids), np.int32), [""] * len(ids))
        probs = np.zeros((len(texts), len(self.vocab)), np.float32)
        buckets = tuple(self.config.buckets)
        pad_id = self.model.tokenizer.pad_token_id
        for idx, batch in eval_batches(ds, self.config.eval_batch_size, buckets, pad_id):
            probs[idx] = jax.device_get(self._eval(self.params, batch))["probs"][: len(idx)]
        return _rows("text", texts, self.vocab.labels, probs)


class ImagePredictor:
    """Loads an image run's classifier once; `predict(paths)` returns per-image label probabilities."""

    def __init__(self, workdir: str, checkpoint: str = "best"):
        require_task(workdir, ("image_classification",), "classify images")
        self.model, head, self.spec = load_image_run(workdir, checkpoint)
        self.labels = head.labels
        self._probs = jax.jit(lambda x: jax.nn.softmax(self.model(x), axis=-1))

    def predict(self, paths: list[str]) -> list[dict]:
        size = self.spec.vit_config.image_size
        pixels = images.normalise(np.stack([images.decode_image(p, size, p) for p in paths]), self.spec.mean,
                                  self.spec.std)
        return _rows("image", paths, self.labels, np.asarray(self._probs(pixels)))
