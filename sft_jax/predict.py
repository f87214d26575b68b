"""Classify texts with a fine-tuned run's best checkpoint and saved label vocabulary.

    python -m sft_jax.predict --workdir=DIR --text="a gorgeous film" [--text=...]
    python -m sft_jax.predict --workdir=DIR --input=FILE.jsonl   # records with a "text" field
    python -m sft_jax.predict --workdir=DIR --image=dog.jpg [--image=...]   # an image_classification run

Prints one JSON line per text: the predicted label, its probability, and every label's probability.
"""

from __future__ import annotations

import json
import os
import sys

import ml_collections
import numpy as np
from absl import app, flags, logging

flags.DEFINE_string("workdir", None, "Workdir of a finished (or running) fine-tuning run.")
flags.DEFINE_multi_string("text", [], "Text to classify (repeatable).")
flags.DEFINE_string("input", None, "A .jsonl file of records with a 'text' field.")
flags.DEFINE_multi_string("image", [], "Image file to classify (repeatable; image_classification runs).")
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint to use.")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS


class Predictor:
    """Loads a run's model once; `predict(texts)` returns per-text label probabilities."""

    def __init__(self, workdir: str, checkpoint: str = "best"):
        import jax

        from sft_jax.checkpoint import Checkpoints
        from sft_jax.data.batching import LabelVocab
        from sft_jax.losses import classification_loss
        from sft_jax.train import LABELS_FILE, Task
        from sft_jax.train_step import make_eval_step

        for name in ("config.json", LABELS_FILE):
            if not os.path.exists(os.path.join(workdir, name)):
                raise FileNotFoundError(f"{workdir}: no {name}; is this the workdir of a fine-tuning run?")
        with open(os.path.join(workdir, "config.json")) as f:
            self.config = ml_collections.ConfigDict(json.load(f))
        self.vocab = LabelVocab.load(os.path.join(workdir, LABELS_FILE))
        self.task = Task(self.config, len(self.vocab))
        ckpt = Checkpoints(workdir)
        self.params, _ = ckpt.restore_params(self.task.params, checkpoint)
        ckpt.close()
        self._eval = make_eval_step(self.task.model_def, classification_loss)
        self._jax = jax

    def predict(self, texts: list[str]) -> list[dict]:
        from sft_jax.data.batching import EncodedDataset, eval_batches, tokenize

        ids, _ = tokenize(self.task.tokenizer, texts, self.task.max_length)
        ds = EncodedDataset(ids, np.zeros(len(ids), np.int32), [""] * len(ids))
        probs = np.zeros((len(texts), len(self.vocab)), np.float32)
        buckets = tuple(self.config.buckets)
        for idx, batch in eval_batches(ds, self.config.eval_batch_size, buckets, self.task.tokenizer.pad_token_id):
            probs[idx] = self._jax.device_get(self._eval(self.params, batch))["probs"][: len(idx)]
        out = []
        for text, p in zip(texts, probs):
            best = int(np.argmax(p))
            out.append({"text": text, "label": self.vocab.labels[best], "probability": float(p[best]),
                        "probabilities": {label: float(q) for label, q in zip(self.vocab.labels, p)}})
        return out


class ImagePredictor:
    """Loads an image run's classifier once; `predict(paths)` returns per-image label probabilities."""

    def __init__(self, workdir: str, checkpoint: str = "best"):
        import jax

        from sft_jax.models.vision import load_image_run

        self.model, head, self.spec = load_image_run(workdir, checkpoint)
        self.labels = head.labels
        self._probs = jax.jit(lambda x: jax.nn.softmax(self.model(x), axis=-1))

    def predict(self, paths: list[str]) -> list[dict]:
        from sft_jax.data import images

        size = self.spec.vit_config.image_size
        pixels = images.normalise(np.stack([images.decode_image(p, size, p) for p in paths]), self.spec.mean,
                                  self.spec.std)
        probs = np.asarray(self._probs(pixels))
        out = []
        for path, p in zip(paths, probs):
            best = int(np.argmax(p))
            out.append({"image": path, "label": self.labels[best], "probability": float(p[best]),
                        "probabilities": {label: float(q) for label, q in zip(self.labels, p)}})
        return out


def _read_texts(path: str) -> list[str]:
    from sft_jax.data.sources import DataError, iter_jsonl

    texts = []
    for where, record in iter_jsonl(path):
        if not isinstance(record.get("text"), str):
            raise DataError(f"{where}: expected an object with a string field 'text'")
        texts.append(record["text"])
    return texts


def main(argv):
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
    texts = list(FLAGS.text) + [a for a in argv[1:]]
    try:
        if FLAGS.image:
            for row in ImagePredictor(FLAGS.workdir, FLAGS.checkpoint).predict(list(FLAGS.image)):
                print(json.dumps(row))
            return
        if FLAGS.input:
            if not os.path.exists(FLAGS.input):
                raise FileNotFoundError(f"{FLAGS.input}: file not found")
            texts += _read_texts(FLAGS.input)
        if not texts:
            raise ValueError("nothing to classify: give --text=... or --input=FILE.jsonl")
        predictor = Predictor(FLAGS.workdir, FLAGS.checkpoint)
        for row in predictor.predict(texts):
            print(json.dumps(row))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
