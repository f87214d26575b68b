"""Interpolate a run's weights and score each point: python -m sft_jax.interpolation --workdir=DIR
[--other=DIR] [--alphas=0,0.25,0.5,0.75,1] [--out=PREFIX]

From the pre-trained weights (default) or from another run's (`--other`, same model and strategy) to the run's
best checkpoint; writes PREFIX.json and PREFIX.png (default WORKDIR/interpolation or
WORKDIR/interpolation_vs_OTHERNAME) and prints the path of the JSON. A workdir that does not fit is one line on
stderr, exit status 1.
"""

import os

from absl import flags, logging

from sft_jax import cli
from sft_jax.checkpoint_failures import quiet_orbax_errors

flags.DEFINE_string("workdir", None, "Workdir of a finished fine-tuning run (alpha = 1).")
flags.DEFINE_string("other", None, "Workdir of another run of the same model and strategy (alpha = 0); "
                    "default: the pre-trained weights.")
flags.DEFINE_list("alphas", ["0", "0.25", "0.5", "0.75", "1"], "Interpolation weights of the run's weights.")
flags.DEFINE_string("out", None, "Path prefix of the JSON and PNG written.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {' '.join(argv[1:])}", cli.EXIT_USAGE)
    try:
        alphas = [float(a) for a in FLAGS.alphas]
    except ValueError:
        cli.fail(f"--alphas={','.join(FLAGS.alphas)}: expected numbers", cli.EXIT_USAGE)
    from sft_jax import interpolation  # after flag parsing: JAX starts on import

    logging.set_verbosity(logging.WARNING)
    quiet_orbax_errors()
    name = "interpolation" + (f"_vs_{os.path.basename(os.path.normpath(FLAGS.other))}" if FLAGS.other else "")
    out = FLAGS.out or os.path.join(FLAGS.workdir, name)
    try:
        result = interpolation.sweep(FLAGS.workdir, alphas, FLAGS.other)
    except (ValueError, FileNotFoundError) as e:
        cli.fail(e)
    print(interpolation.write(result, out)[0])


if __name__ == "__main__":
    cli.run_command(main)
