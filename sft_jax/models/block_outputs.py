"""Every block's output, collected while a forward pass runs or is traced: the per-block hidden states of any
model whose blocks run through `remat.run_block` (BERT family, ModernBERT, ViT, decoders, scanned or not),
without a change to what the model computes.

    with block_outputs.recording() as blocks:
        logits = model(...)
    # blocks[i]: the output of block i (its hidden states [B, T, H]), in the order the blocks ran

Inside `jax.jit` the recorded values are the trace's arrays: return them from the traced function. A scanned
stack of blocks (`models/scan.py`) returns its blocks' outputs from the scan and records them in layer order.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

_RECORDING: contextvars.ContextVar[list | None] = contextvars.ContextVar("block_outputs", default=None)


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Collects the output of every block run inside the context (innermost context only) into the yielded list."""
    outputs: list = []
    token = _RECORDING.set(outputs)
    try:
        yield outputs
    finally:
        _RECORDING.reset(token)


def is_recording() -> bool:
    return _RECORDING.get() is not None


def record(output: Any) -> Any:
    """`output` of a block, unchanged; while recording, its hidden states (the first element when the block
    returns more, such as a decoder block's cache) are appended to the innermost recording."""
    outputs = _RECORDING.get()
    if outputs is not None:
        outputs.append(output[0] if isinstance(output, tuple) else output)
    return output
