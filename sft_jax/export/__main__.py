"""Export a run's model: python -m sft_jax.export --workdir=DIR --format=hf|gguf|peft --out=DIR

    --format=hf     classifiers (text, image) and language models as Hugging Face folders
    --format=peft   a LoRA language-model run's adapters as PEFT files
    --format=gguf   a language model as OUT/model-TYPE.gguf (--gguf_type=f32|f16|bf16|q8_0)

Prints the path written; a workdir or format that does not fit is one line on stderr, exit status 1.
"""


from absl import flags, logging

from sft_jax import cli
from sft_jax.checkpoint_failures import quiet_orbax_errors

flags.DEFINE_string("workdir", None, "Workdir of a finished (or running) fine-tuning run.")
flags.DEFINE_string("format", None, "hf, gguf or peft.")
flags.DEFINE_string("out", None, "Folder to write (created).")
flags.DEFINE_string("gguf_type", "f16", "For --format=gguf: f32, f16, bf16 or q8_0.")
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint to export.")
flags.mark_flags_as_required(["workdir", "format", "out"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {' '.join(argv[1:])}", cli.EXIT_USAGE)
    from sft_jax.export import export  # after flag parsing: JAX starts on import

    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
    quiet_orbax_errors()  # a damaged checkpoint is one line, not orbax's log records
    try:
        print(export(FLAGS.workdir, FLAGS.format, FLAGS.out, gguf_type=FLAGS.gguf_type, checkpoint=FLAGS.checkpoint))
    except (ValueError, FileNotFoundError) as e:
        cli.fail(e)


if __name__ == "__main__":
    cli.run_command(main)
