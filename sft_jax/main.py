"""Fine-tune: sft-jax train --config=configs/NAME.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]
(or python -m sft_jax.main with the same flags)

Running the same command again on the same DIR resumes from the latest checkpoint.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sft_jax.checkpoint_failures import CheckpointSaveFailed, quiet_orbax_errors
from sft_jax.data.sources import DataError
from sft_jax.workdir_lock import WorkdirLocked

config_flags.DEFINE_config_file("config", None, "Config file: path[:arg].", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
    quiet_orbax_errors()  # a failed save is one line below, not orbax's tracebacks
    from sft_jax import distributed
    from sft_jax.trainer import train_and_evaluate  # after configure_cpu and flag parsing

    try:
        results = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (DataError, ValueError, FileNotFoundError, PermissionError, WorkdirLocked, CheckpointSaveFailed) as e:
        distributed.end_after_error(f"error: {e}")  # a multi-process run ends here, telling the others
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:
        distributed.end_after_exception(e)  # a multi-process run ends here, naming a dead process if one is
        raise
    if results.get("preempted"):  # SIGTERM: the checkpoint is saved; the same command resumes
        print(f"stopped by SIGTERM at step {results['step']}; checkpoint saved, rerun to resume")
        return
    print(summary(results, FLAGS.workdir))


def summary(results: dict, workdir: str) -> str:
    """The figures a researcher looks at first (the task's metrics, its forgetting probes before and after,
    sizes and speed); everything is in WORKDIR/results.json."""
    keys = [k for k in results if k.startswith("eval/")]
    keys += [k for k in results if k.startswith("forgetting/") and k.endswith(("/before", "/after"))]
    keys += ["trainable_params", "total_params", "best_step", "train/examples_per_s", "train/tokens_per_s"]
    keys += [k for k in results if k.startswith("continual/") and isinstance(results[k], float)]  # config.stages
    width = max(len(k) for k in keys)
    lines = [f"{k:<{width}}  {results[k]:.4f}" if isinstance(results[k], float) else f"{k:<{width}}  {results[k]}"
             for k in keys if results.get(k) is not None]
    return "\n".join(lines + [f"(all results: {os.path.join(workdir, 'results.json')})"])


def _unknown_override(e: Exception) -> str | None:
    """The `--config.KEY=VALUE` argument naming a key the config lacks (ml_collections raises
    AttributeError(KeyError("'KEY'..."))), or None when `e` is about something else."""
    inner = e.args[0] if e.args and isinstance(e.args[0], BaseException) else e
    text = " ".join(str(inner.args[0] if inner.args else inner).split())
    for arg in sys.argv[1:]:
        path = arg.split("=", 1)[0]
        key = repr(path.rsplit(".", 1)[-1])
        if path.startswith("--config.") and text.startswith(key):
            return f"{arg}: unknown config key {path[2:]!r}{text[len(key):]}"  # keeps "Did you mean ..."
    return None


def run():
    from sft_jax import cli, platform
    from sft_jax.cli import parse_flags

    if cli.help_requested(sys.argv):  # absl's --help would list the flags only, not the config keys
        from sft_jax.config_docs import config_help

        print(cli.help_text(__doc__, ("config", "workdir"), config_help()))
        return
    platform.configure_cpu()  # before anything starts JAX's backend
    try:
        app.run(main, flags_parser=parse_flags)  # a bad flag or config file: one line
    except flags.IllegalFlagValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError) as e:  # e.g. --config.KEY=... for a key that does not exist
        message = None if FLAGS.is_parsed() else _unknown_override(e)
        if message is None:  # raised by the run itself, not by flag parsing: keep the traceback
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
