"""In-process A/B patches of sft_jax, run by `python -m experiments.benchmarks.ab.ab MODEL STRATEGY DTYPE PATCH ...`."""
