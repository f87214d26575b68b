"""What both sides of the benchmark share, without importing either framework: the models, the frozen
layers of `partial`, the synthetic batch and the case names (a memory-measuring process imports only its own
framework)."""

from __future__ import annotations

import re

import numpy as np

MODELS = {"minilm": "minilm-l6", "smollm2": "smollm2-135m-instruct"}
# partial: the lower half of the blocks frozen (with the embeddings), as in the SST-2 experiment.
FROZEN_LAYERS = {"minilm": 3, "smollm2": 15}
DTYPES = ("float32", "bfloat16")
# PyTorch variant -> torch.compile mode (None: eager). torch.compile wraps the model (forward and backward,
# through AOTAutograd), as `transformers.Trainer(torch_compile=True)` does; clipping and AdamW run eagerly in all.
COMPILERS = {"eager": None, "compile": "default", "max-autotune": "max-autotune"}


def synthetic_batch(model: str, batch: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Full-length rows of random tokens (no padding, every position a target for the LM)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 20000, (batch, seq_len), dtype=np.int32)
    if model == "minilm":
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": rng.integers(0, 2, batch,
                dtype=np.int32), "weights": np.ones(batch, np.float32)}
    return {"input_ids": ids, "targets": np.roll(ids, -1, axis=1), "loss_mask": np.ones(ids.shape, np.float32),
            "segment_ids": np.ones_like(ids), "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                                                          ids.shape).copy()}


def case_name(model: str, strategy: str, dtype: str, batch: int, seq_len: int) -> str:
    return f"{model}-{strategy}-{dtype}-b{batch}-t{seq_len}"


def parse_case(case: str) -> tuple[str, str, str, int, int]:
    """`case_name`'s inverse: (model, strategy, dtype, batch, seq_len)."""
    m = re.fullmatch(r"(minilm|smollm2)-(full|partial|head|lora)-(float32|bfloat16)-b(\d+)-t(\d+)", case)
    if not m:
        raise ValueError(f"case {case!r}: expected MODEL-STRATEGY-DTYPE-bBATCH-tSEQ, e.g. minilm-full-float32-b32-t128")
    return m[1], m[2], m[3], int(m[4]), int(m[5])


def variant_name(compiler: str, dtype: str) -> str:
    """"torch-compile-float32", "torch-eager-bf16-autocast", ..."""
    return f"torch-{compiler}-" + ("bf16-autocast" if dtype == "bfloat16" else dtype)
