"""Complete prompts with a pre-trained model or a fine-tuning run's best checkpoint.

    python -m sft_jax.generate --model=smollm2-135m-instruct --prompt="The capital of France is" --max_new_tokens=8
    python -m sft_jax.generate --workdir=DIR --prompt=... --chat --temperature=0.7 --top_p=0.9 --json
"""

import json

from absl import flags, logging

from sft_jax import cli
from sft_jax.checkpoint_failures import quiet_orbax_errors


def _define_flags() -> None:
    flags.DEFINE_string("model", None, "Short name, .gguf path or HF directory (optional with --workdir).")
    flags.DEFINE_string("workdir", None, "Generate with the fine-tuned weights of this run.")
    flags.DEFINE_multi_string("prompt", [], "Prompt (repeatable; prompts are batched).")
    flags.DEFINE_integer("max_new_tokens", 64, "Most tokens to generate per prompt.")
    flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
    flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0 = off).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_multi_string("stop", [], "Stop string (repeatable); the completion is cut before it.")
    flags.DEFINE_bool("chat", False, "Wrap each prompt as a user message in the model's chat template.")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: float32, or the run's).")
    flags.DEFINE_bool("json", False, "Print one JSON line per prompt instead of prompt + completion.")


FLAGS = flags.FLAGS


def main(argv):
    from sft_jax.generate import generate
    from sft_jax.tasks.language_model import load_lm

    logging.set_verbosity(logging.WARNING)  # JAX logs its backend search at INFO
    quiet_orbax_errors()  # a damaged checkpoint is one line, not orbax's log records
    prompts = list(FLAGS.prompt) + argv[1:]
    try:
        if not prompts:
            raise ValueError("nothing to complete: give --prompt=TEXT")
        model, tokenizer = load_lm(FLAGS.model, FLAGS.workdir, FLAGS.dtype)
        completions = generate(model, tokenizer, prompts, max_new_tokens=FLAGS.max_new_tokens,
                               temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed,
                               stop=FLAGS.stop, chat=FLAGS.chat)
    except (ValueError, FileNotFoundError) as e:
        cli.fail(e)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        if FLAGS.json:
            print(json.dumps({"prompt": prompt, "completion": completion}))
        else:
            print(("\n" if i else "") + prompt + ("\n" if FLAGS.chat else "") + completion)


if __name__ == "__main__":
    _define_flags()
    cli.run_command(main)
