"""Export a run's model: python -m sft_jax.export --workdir=DIR --format=hf|gguf|peft --out=DIR

    --format=hf     classifiers (text, image) and language models as Hugging Face folders
    --format=peft   a LoRA language-model run's adapters as PEFT files
    --format=gguf   a language model as OUT/model-TYPE.gguf (--gguf_type=f32|f16|bf16|q8_0)

A language model's hf export can run on several hosts at once, like the training run (the same command on
each, with --coordinator_address, --num_processes, --process_id, or JAX's cluster detection with
--distributed_auto): each process writes its shards of every tensor into OUT, a folder they all see.

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
flags.DEFINE_string("coordinator_address", "", "Several processes: host:port of process 0.")
flags.DEFINE_integer("num_processes", 0, "Several processes: how many (0: from the environment).")
flags.DEFINE_integer("process_id", -1, "Several processes: this one's index (-1: from the environment).")
flags.DEFINE_bool("distributed_auto", False, "Join the processes from the cluster environment alone.")
flags.DEFINE_integer("distributed_timeout_s", 300, "How long processes wait for each other.")
flags.mark_flags_as_required(["workdir", "format", "out"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {' '.join(argv[1:])}", cli.EXIT_USAGE)
    import ml_collections

    from sft_jax import distributed
    from sft_jax.export import export  # after flag parsing: JAX starts on import

    distributed.initialize(ml_collections.ConfigDict({"distributed": {
        "coordinator_address": FLAGS.coordinator_address, "num_processes": FLAGS.num_processes,
        "process_id": FLAGS.process_id, "auto": FLAGS.distributed_auto, "timeout_s": FLAGS.distributed_timeout_s}}))

    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
    quiet_orbax_errors()  # a damaged checkpoint is one line, not orbax's log records
    try:
        print(export(FLAGS.workdir, FLAGS.format, FLAGS.out, gguf_type=FLAGS.gguf_type, checkpoint=FLAGS.checkpoint))
    except (ValueError, FileNotFoundError) as e:
        distributed.end_after_error(f"error: {e}")  # several processes: the others stop too
        cli.fail(e)


if __name__ == "__main__":
    cli.run_command(main)
