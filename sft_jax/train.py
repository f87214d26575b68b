"""Kept so that `from sft_jax.train import train_and_evaluate` goes on working; the trainer is `sft_jax.trainer`."""

from sft_jax.trainer import train_and_evaluate

__all__ = ["train_and_evaluate"]
