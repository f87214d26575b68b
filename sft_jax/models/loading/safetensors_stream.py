"""Writing a safetensors file one tensor at a time: the header (names, dtypes, shapes, offsets) is known from
the shapes alone, so each tensor is produced, written and dropped in turn, and the file never needs every
tensor in host memory at once (safetensors' own `save_file` takes the whole dict).

A tensor produced as a `jax.Array` is written from its shards: each process writes the shards on its own
devices (one copy of each), at their places in the file. A model sharded over several hosts is so written by
all of them into one file, none holding more than its own shards and one tensor's worth of conversion."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import numpy as np

_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int64): "I64",
           np.dtype(np.int32): "I32"}


class Tensor(NamedTuple):
    """One tensor to write: its name, shape and dtype, and a function producing its values (a numpy array, or
    a `jax.Array`, possibly sharded over the devices of several processes)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray | jax.Array]


def _header(path, tensors: Sequence[Tensor], metadata: dict[str, str] | None) -> tuple[bytes, list[int]]:
    """The header's bytes (8-byte length, JSON, padding) and each tensor's offset in the data that follows."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offsets, offset = [], 0
    for t in tensors:
        if t.name in header:
            raise ValueError(f"{path}: tensor {t.name!r} given twice")
        size = int(np.prod(t.shape, dtype=np.int64)) * np.dtype(t.dtype).itemsize
        header[t.name] = {"dtype": _DTYPES[np.dtype(t.dtype)], "shape": list(t.shape),
                          "data_offsets": [offset, offset + size]}
        offsets.append(offset)
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw, offsets + [offset]


def _write_block(fd: int, at: int, shape: tuple[int, ...], index: tuple[slice, ...], block: np.ndarray) -> int:
    """Writes `block`, the part `index` of a C-ordered tensor of `shape` stored from byte `at`, with one
    `pwrite` per contiguous run; returns the bytes written."""
    block = np.ascontiguousarray(block)
    starts = [s.indices(n)[0] for s, n in zip(index, shape)]
    # From dimension `k` on, the block spans every trailing dimension in full: each run is contiguous in the file.
    k = len(shape)
    while k > 0 and (k == len(shape) or block.shape[k] == shape[k]):
        k -= 1
    strides = np.cumprod((1,) + shape[:0:-1])[::-1] * block.itemsize  # bytes per step along each dimension
    for lead in np.ndindex(*block.shape[:k]):
        run = block[lead]
        offset = at + sum(int((starts[d] + i) * strides[d]) for d, i in enumerate(lead))
        offset += int(starts[k] * strides[k]) if k < len(shape) else 0
        os.pwrite(fd, memoryview(run).cast("B"), offset)
    return block.nbytes


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def write_safetensors(path: str | os.PathLike, tensors: Sequence[Tensor],
                      metadata: dict[str, str] | None = None) -> int:
    """Writes `tensors` to `path` in the safetensors format, calling each `produce` once, in order; returns the
    bytes of tensor data this process wrote. A produced array whose shape or dtype differs from the declared one
    is a ValueError naming the tensor.

    In a multi-process run every process calls this with the same tensors and a `path` they all see (a shared
    file system, as for checkpoints): each writes its shards of every `jax.Array`, process 0 the header and the
    numpy arrays."""
    header, offsets = _header(path, tensors, metadata)
    tmp = f"{os.fspath(path)}.partial"
    primary = jax.process_index() == 0
    if primary:
        with open(tmp, "wb") as f:
            f.write(header)
            f.truncate(len(header) + offsets[-1])
    _sync(f"sft_jax_safetensors_header:{path}")
    written = 0
    fd = os.open(tmp, os.O_WRONLY)
    try:
        for t, offset in zip(tensors, offsets):
            value = t.produce()
            if tuple(value.shape) != tuple(t.shape) or np.dtype(value.dtype) != np.dtype(t.dtype):
                raise ValueError(f"{path}: tensor {t.name!r} came out {np.dtype(value.dtype)}{list(value.shape)}, "
                                 f"declared {np.dtype(t.dtype)}{list(t.shape)}")
            at = len(header) + offset
            if isinstance(value, jax.Array):
                for shard in value.addressable_shards:
                    if shard.replica_id == 0:  # a replicated part is written once, by its first holder
                        written += _write_block(fd, at, tuple(t.shape), shard.index, np.asarray(shard.data))
            elif primary:
                written += _write_block(fd, at, tuple(t.shape), (slice(None),) * len(t.shape), value)
            del value
    finally:
        os.close(fd)
    _sync(f"sft_jax_safetensors_written:{path}")
    if primary:
        os.replace(tmp, path)  # a failed export never leaves a half-written weights file under the real name
    _sync(f"sft_jax_safetensors_renamed:{path}")
    return written
