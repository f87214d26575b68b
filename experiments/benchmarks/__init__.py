"""Train-step throughput of sft_jax against PyTorch: `python -m experiments.benchmarks.run`; `ours` and
`baseline` build the two sides' steps, `ab/` and `micro/` hold the A/B patches and micro-benchmarks."""
