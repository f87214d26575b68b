"""sft_jax: supervised fine-tuning of pre-trained models in JAX / Flax NNX.

Importing sft_jax, or any of its library modules, changes nothing process-wide; the XLA:CPU settings the
command-line entry points use are `sft_jax.platform.configure_cpu()`.
"""
