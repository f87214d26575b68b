"""Shared defaults: every key the trainer reads (see sft_jax/config_defaults.py)."""

import os

from sft_jax.config_defaults import defaults

# Real data shipped beside the project (never copied into it); fresh clones without it use TFDS.
SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


def shared_data(*parts: str) -> str:
    return os.path.normpath(os.path.join(SHARED_DATA, *parts))


def get_config(arg=None):
    del arg
    return defaults()
