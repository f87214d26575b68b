"""The lm-evaluation-harness command line, with the `sft_jax` model registered:

    python -m sft_jax.lm_eval --model sft_jax --model_args workdir=DIR --tasks TASK[,TASK...] [harness flags]

Every flag is the harness's own (`lm-eval run --help`); model arguments: `sft_jax/lm_eval/__init__.py`.
"""

from sft_jax import platform

if __name__ == "__main__":
    platform.configure_cpu()  # before anything starts JAX's backend
    from lm_eval.__main__ import cli_evaluate

    import sft_jax.lm_eval  # noqa: F401  (registers the model)

    cli_evaluate()
