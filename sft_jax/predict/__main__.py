"""Classify texts with a fine-tuned run's best checkpoint and saved label vocabulary.

    python -m sft_jax.predict --workdir=DIR --text="a gorgeous film" [--text=...]
    python -m sft_jax.predict --workdir=DIR --input=FILE.jsonl   # "text" records; or .parquet, .arrow, DIR, hf:...
    python -m sft_jax.predict --workdir=DIR --image=dog.jpg [--image=...]   # an image_classification run

Prints one JSON line per text: the predicted label, its probability, and every label's probability.
"""

import json
import os

from absl import flags, logging

from sft_jax import cli
from sft_jax.checkpoint_failures import quiet_orbax_errors
from sft_jax.data import columnar
from sft_jax.data.sources import DataError, iter_jsonl

flags.DEFINE_string("workdir", None, "Workdir of a finished (or running) fine-tuning run.")
flags.DEFINE_multi_string("text", [], "Text to classify (repeatable).")
flags.DEFINE_string("input", None, "A .jsonl, .parquet or .arrow file, a `datasets` folder (DIR[:SPLIT]) or "
                    "hf:ORG/NAME[:CONFIG][:SPLIT] of records with a 'text' field.")
flags.DEFINE_multi_string("image", [], "Image file to classify (repeatable; image_classification runs).")
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint to use.")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS


def _read_texts(path: str) -> list[str]:
    """The "text" field of each record of the --input file."""
    if columnar.is_columnar(path):
        return _texts(columnar.iter_records(path), path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: file not found")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory; --input takes a .jsonl file of {{\"text\": ...}} records")
    if not path.endswith(".jsonl"):
        raise DataError(f"{path}: --input takes a .jsonl, .parquet or .arrow file of {{\"text\": ...}} records "
                        "(or give --text=...)")
    return _texts(iter_jsonl(path), path)


def _texts(records, path: str) -> list[str]:
    texts = []
    for where, record in records:
        if not isinstance(record.get("text"), str):
            raise DataError(f"{where}: expected an object with a string field 'text'")
        texts.append(record["text"])
    if not texts:
        raise DataError(f"{path}: no records")
    return texts


def main(argv):
    from sft_jax.predict import ImagePredictor, Predictor  # after flag parsing: JAX starts on import

    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
    quiet_orbax_errors()  # a damaged checkpoint is one line, not orbax's log records
    texts = list(FLAGS.text) + [a for a in argv[1:]]
    try:
        if FLAGS.image:
            for row in ImagePredictor(FLAGS.workdir, FLAGS.checkpoint).predict(list(FLAGS.image)):
                print(json.dumps(row))
            return
        if FLAGS.input:
            texts += _read_texts(FLAGS.input)
        if not texts:
            raise ValueError("nothing to classify: give --text=... or --input=FILE.jsonl")
        for row in Predictor(FLAGS.workdir, FLAGS.checkpoint).predict(texts):
            print(json.dumps(row))
    except (ValueError, FileNotFoundError) as e:
        cli.fail(e)


if __name__ == "__main__":
    cli.run_command(main)
