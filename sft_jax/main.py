"""Fine-tune: python -m sft_jax.main --config=configs/NAME.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]

Running the same command again on the same DIR resumes from the latest checkpoint.
"""

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sft_jax.data.sources import DataError

config_flags.DEFINE_config_file("config", None, "Config file: path[:arg].", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from sft_jax.train import train_and_evaluate  # after flag parsing: JAX reads XLA_FLAGS on import

    try:
        results = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (DataError, ValueError, FileNotFoundError, PermissionError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(results, indent=1))


def run():
    try:
        app.run(main)
    except flags.IllegalFlagValueError as e:  # e.g. --config.KEY=... for a key that does not exist
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
