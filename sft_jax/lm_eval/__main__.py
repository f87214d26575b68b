"""The lm-evaluation-harness command line, with the `sft_jax` model registered:

    python -m sft_jax.lm_eval --model sft_jax --model_args workdir=DIR --tasks TASK[,TASK...] [harness flags]

Every flag is the harness's own (`lm-eval run --help`); model arguments: `sft_jax/lm_eval/__init__.py`.
"""

from sft_jax import cli, platform


def main() -> None:
    platform.configure_cpu()  # before anything starts JAX's backend
    from lm_eval.__main__ import cli_evaluate

    import sft_jax.lm_eval  # noqa: F401  (registers the model)

    try:
        cli_evaluate()
    except (ValueError, FileNotFoundError) as e:  # a bad model argument, workdir or task: one line
        cli.fail(e)


if __name__ == "__main__":
    main()
