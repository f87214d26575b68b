"""Data sources, tokenization and batching."""

from sft_jax.data.sources import DataError, Example, read_classification

__all__ = ["DataError", "Example", "read_classification"]
