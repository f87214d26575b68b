"""The training loop and its parts: `loop` (train_and_evaluate), `setup` (optimizer, mesh, state, compiled
steps), `guards` (preemption, non-finite steps), `metrics` (metrics.jsonl and TensorBoard), `forgetting`
(the before/after summary and WiSE-FT)."""

from sft_jax.trainer.loop import train_and_evaluate
from sft_jax.trainer.setup import init_state

__all__ = ["init_state", "train_and_evaluate"]
