"""Writing a safetensors file one tensor at a time: the header (names, dtypes, shapes, offsets) is known from
the shapes alone, so each tensor is produced, written and dropped in turn, and the file never needs every
tensor in host memory at once (safetensors' own `save_file` takes the whole dict)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int64): "I64",
           np.dtype(np.int32): "I32"}


class Tensor(NamedTuple):
    """One tensor to write: its name, shape and dtype, and a function producing its values."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]


def write_safetensors(path: str | os.PathLike, tensors: Sequence[Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Writes `tensors` to `path` in the safetensors format, calling each `produce` once, in order. A produced
    array whose shape or dtype differs from the declared one is a ValueError naming the tensor."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for t in tensors:
        if t.name in header:
            raise ValueError(f"{path}: tensor {t.name!r} given twice")
        size = int(np.prod(t.shape, dtype=np.int64)) * np.dtype(t.dtype).itemsize
        header[t.name] = {"dtype": _DTYPES[np.dtype(t.dtype)], "shape": list(t.shape),
                          "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    tmp = f"{os.fspath(path)}.partial"
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors:
            value = np.ascontiguousarray(t.produce())
            if value.shape != tuple(t.shape) or value.dtype != np.dtype(t.dtype):
                raise ValueError(f"{path}: tensor {t.name!r} came out {value.dtype}{list(value.shape)}, "
                                 f"declared {np.dtype(t.dtype)}{list(t.shape)}")
            f.write(value.data)
            del value
    os.replace(tmp, path)  # a failed export never leaves a half-written weights file under the real name
