"""Checkpoint loaders that map published weights onto sft_jax modules."""
