"""Load a HF safetensors checkpoint straight onto a device mesh, one slice per device.

`hf.read_weights` reads every tensor whole into host memory as float32; for an 8B model on a host that feeds
8 accelerators that is 32 GB before anything is placed. Here each parameter is built with
`jax.make_array_from_callback`, whose callback reads only the slice its device holds, straight from the file
(safetensors' `get_slice` over a memory map), cast to the parameter dtype. So host memory holds the sharded
arrays plus one tensor's slices in flight, and each process of a multi-host run reads only its own devices'
slices (the callback is called for addressable devices only).
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open

from sft_jax import sharding
from sft_jax.models.decoder import DecoderConfig, DecoderLM
from sft_jax.models.loading.files import DamagedFile, read_json_object
from sft_jax.models.loading.hf import shard_files
from sft_jax.models.loading.lm import decoder_non_weights, fused_rows, hf_name, text_model_names, tied_copy_differs
from sft_jax.models.loading.unused import describe_unused, unused_tensors
from sft_jax.models.registry import Checkpoint, resolve_checkpoint

# safetensors dtype names -> numpy (bfloat16 and the float8s through ml_dtypes; numpy has none of them).
_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}

Index = tuple[slice, ...]


def _header(path: pathlib.Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: {name: {"dtype", "shape", "data_offsets"}} (+ "__metadata__").

    A file shorter than its header says (an interrupted download) is refused here, before any slice is read."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (listed by the shard index)")
    size = path.stat().st_size
    damaged = f"{path}: not a readable safetensors file ({size} bytes"
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise DamagedFile(f"{damaged}, no header); is it truncated? download it again")
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8:
            raise DamagedFile(f"{damaged}, its header claims {length}); is it truncated? download it again")
        try:
            header = json.loads(f.read(length))
            end = max([int(e["data_offsets"][1]) for k, e in header.items() if k != "__metadata__"], default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise DamagedFile(f"{damaged}, unreadable header); is it damaged? download it again") from None
    if 8 + length + end > size:
        raise DamagedFile(f"{damaged}, its tensors need {8 + length + end}); is it truncated? download it again")
    header["__data_start__"] = 8 + length
    return header


class SafetensorsIndex:
    """Every tensor of a HF directory (`model.safetensors`, or shards listed by `model.safetensors.index.json`):
    its file, dtype and shape from the headers alone; `read(name, index)` reads one slice.

    `bytes_read` counts the bytes of the slices read, per tensor name; `reads` lists (name, index, bytes):
    what tests look at to check that a device read only its own slice."""

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = pathlib.Path(model_dir)
        single = self.model_dir / "model.safetensors"
        index = self.model_dir / "model.safetensors.index.json"
        if single.is_file():
            files = [single]
        elif index.is_file():
            files = [self.model_dir / f for f in shard_files(index)]
        else:
            raise FileNotFoundError(f"{self.model_dir}: no model.safetensors or model.safetensors.index.json")
        self._where: dict[str, tuple[pathlib.Path, dict[str, Any], int]] = {}
        for path in files:
            header = _header(path)
            start = header.pop("__data_start__")
            header.pop("__metadata__", None)
            for name, entry in header.items():
                self._where[name] = (path, entry, start)
        self.bytes_read: collections.Counter[str] = collections.Counter()
        self.reads: list[tuple[str, tuple, int]] = []

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def file(self, name: str) -> pathlib.Path:
        """The safetensors file that holds tensor `name`."""
        return self._where[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][1]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(_DTYPES[self._where[name][1]["dtype"]])

    def nbytes(self, name: str) -> int:
        begin, end = self._where[name][1]["data_offsets"]
        return end - begin

    def open(self, name: str) -> _TensorReader:
        """A reader of tensor `name` (a context manager): `reader[index]` is one slice as numpy. The file's
        memory map lives as long as the reader, so the pages it touched leave this process when it closes."""
        return _TensorReader(self, name)

    def read(self, name: str, index: Index) -> np.ndarray:
        """One slice of tensor `name`, read from its file alone."""
        with self.open(name) as reader:
            return reader[index]


class _TensorReader:
    def __init__(self, index: SafetensorsIndex, name: str):
        self.index, self.name = index, name
        self._file = self._slice = None

    def __enter__(self) -> _TensorReader:
        path, _, _ = self.index._where[self.name]
        self._file = safe_open(str(path), framework="numpy")
        self._file.__enter__()
        try:
            self._slice = self._file.get_slice(self.name)
        except TypeError:  # a safetensors whose numpy framework lacks this dtype (bfloat16 before 0.6)
            self._slice = None
        return self

    def __exit__(self, *exc) -> None:
        self._slice = None
        self._file.__exit__(*exc)
        self._file = None

    def __getitem__(self, index: Index) -> np.ndarray:
        value = self._memmap()[index] if self._slice is None else self._slice[index]
        value = np.array(value, dtype=self.index.dtype(self.name), copy=True)
        self.index.bytes_read[self.name] += value.nbytes
        self.index.reads.append((self.name, _key(index, self.index.shape(self.name)), value.nbytes))
        return value

    def _memmap(self) -> np.ndarray:
        path, entry, start = self.index._where[self.name]
        return np.memmap(path, dtype=self.index.dtype(self.name), mode="r", offset=start + entry["data_offsets"][0],
                         shape=tuple(entry["shape"]))


def _key(index: Index, shape: tuple[int, ...]) -> tuple:
    """A hashable, normalised form of a device index (slices with None resolved against `shape`)."""
    return tuple(s.indices(n) for s, n in zip(index, shape, strict=True))


class Source(NamedTuple):
    """Where one of our parameters is stored: HF tensor `name`, whether it is stored transposed, and (for a
    part of a fused tensor, Phi-3's `qkv_proj` / `gate_up_proj`) the rows [start, stop) of the stored tensor."""

    name: str
    transpose: bool
    rows: tuple[int, int] | None = None


def load_sharded(model_dir: str | os.PathLike | SafetensorsIndex, names: Mapping[str, tuple],
                 shapes: Mapping[str, tuple[int, ...]], shardings: Mapping[str, jax.sharding.NamedSharding],
                 dtype: Any = jnp.float32) -> dict[str, jax.Array]:
    """{our path: global array with `shardings[path]`}, each device's part read straight from the checkpoint.

    Args:
      model_dir: a HF directory with safetensors files, or a `SafetensorsIndex` of one.
      names: {our path: `Source` (or a (HF tensor name, transposed) pair)}.
      shapes: {our path: shape of our parameter}.
      shardings: {our path: NamedSharding}.
      dtype: the dtype of the arrays (float32 or bfloat16); each slice is cast on the host as it is read.

    Each distinct slice is read once (devices holding replicas of it share the read). A transposed tensor is
    read with the device's index reversed, and the slice transposed; a part of a fused tensor is read with its
    row index shifted to the part's rows.

    Raises:
      ValueError: naming every tensor that is missing or whose shape does not match, before anything is read.
    """
    index = model_dir if isinstance(model_dir, SafetensorsIndex) else SafetensorsIndex(model_dir)
    sources = {path: Source(*source) for path, source in names.items()}
    missing, mismatched = [], []
    for path, (name, transpose, rows) in sources.items():
        if name not in index:
            missing.append(name)
            continue
        stored = index.shape(name)
        part = stored if rows is None or not stored else (rows[1] - rows[0], *stored[1:])
        expected = tuple(shapes[path])
        if (part[::-1] if transpose else part) != expected or (rows is not None and stored[0] < rows[1]):
            what = f" rows {rows[0]}:{rows[1]} of" if rows is not None else ""
            mismatched.append(f"{name}:{what} checkpoint {stored}, expected {expected}"
                              f"{' (transposed)' if transpose else ''}")
    if missing or mismatched:
        problems = ([f"missing keys: {', '.join(sorted(set(missing)))}"] if missing else []) + (
            [f"shape mismatches: {'; '.join(mismatched)}"] if mismatched else [])
        raise ValueError(f"{index.model_dir}: cannot load weights; {'. '.join(problems)}")
    dtype = np.dtype(dtype)
    out = {}
    for path, (name, transpose, rows) in sources.items():
        shape = tuple(shapes[path])
        cache: dict[tuple, np.ndarray] = {}
        with index.open(name) as reader:

            def callback(device_index: Index, reader=reader, transpose=transpose, rows=rows, shape=shape,
                         cache=cache):
                key = _key(device_index, shape)
                if key not in cache:
                    stored_index = device_index[::-1] if transpose else device_index
                    if rows is not None:  # our rows 0.. are the stored rows start..
                        first = slice(*key[::-1][0][:2]) if transpose else slice(*key[0][:2])
                        stored_index = (slice(first.start + rows[0], first.stop + rows[0]), *stored_index[1:])
                    value = reader[stored_index]
                    cache[key] = np.ascontiguousarray((value.T if transpose else value).astype(dtype, copy=False))
                return cache[key]

            out[path] = jax.make_array_from_callback(shape, shardings[path], callback)
        del cache  # the device arrays hold the data now (on CPU they may alias these buffers)
    return out


def decoder_names_and_axes(config: DecoderConfig) -> tuple[Any, list[tuple[tuple, nnx.Variable]], dict, dict, dict]:
    """(graphdef, flat abstract state, {path: Source}, {path: shape}, {path: logical axes}) of a `DecoderLM`
    with `config`, built abstractly (`nnx.eval_shape`: no parameter is materialised)."""
    abstract = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(abstract_state))
    names, shapes, axes = {}, {}, {}
    for path, variable in flat:
        key = "/".join(str(p) for p in path)
        name, transpose = hf_name(key, config.family)
        fused = fused_rows(config, name)
        names[key] = Source(name, transpose) if fused is None else Source(fused[0], transpose, fused[1])
        shapes[key] = tuple(variable.shape)
        logical = variable.get_metadata().get("out_sharding")
        if logical:
            axes[key] = tuple(logical)
    return graphdef, flat, names, shapes, axes


Placement = Callable[[Sequence[str], Mapping[str, tuple[int, ...]], Mapping[str, tuple]],
                     Mapping[str, jax.sharding.NamedSharding]]


def load_decoder_sharded(name_or_path: str | os.PathLike | Checkpoint, mesh: jax.sharding.Mesh | None = None, *,
                         dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                         logical_rules: sharding.LogicalRules = sharding.DEFAULT_LOGICAL_RULES,
                         placement: Placement | None = None, ignore=()) -> tuple[DecoderLM, DecoderConfig]:
    """`load_decoder` for a HF safetensors directory, with every parameter read straight onto the devices.

    Parameters are laid out by `placement(names, shapes, logical axes)` -> {path: NamedSharding} (a run's own
    layout, say) or else, on `mesh`, as `sharding.param_shardings` gives for their logical axes under
    `logical_rules`; they are stored as `param_dtype`, and `dtype` is the compute dtype. In float32 they are
    bit-identical to `load_decoder`'s. Checkpoint tensors left unread are refused as `load_decoder` refuses
    them (`ignore`: regexes of tensors to drop), from the headers alone, before anything is read.
    """
    checkpoint = name_or_path if isinstance(name_or_path, Checkpoint) else resolve_checkpoint(str(name_or_path))
    if checkpoint.kind == "gguf":
        raise ValueError(f"{checkpoint.path}: load_decoder_sharded reads safetensors directories, not GGUF files")
    hf_config = read_json_object(pathlib.Path(checkpoint.path) / "config.json")
    config = DecoderConfig.from_hf(hf_config, dtype=dtype)
    graphdef, flat, names, shapes, axes = decoder_names_and_axes(config)
    if placement is not None:
        shardings = placement(list(names), shapes, axes)
    elif mesh is not None:
        shardings = sharding.param_shardings(list(names), mesh, shapes=shapes, axes=axes,
                                             logical_rules=logical_rules)
    else:
        raise TypeError("load_decoder_sharded: give a mesh or a placement")
    index = SafetensorsIndex(checkpoint.path)
    names = _stored_names(index, config, names, ignore)
    arrays = load_sharded(index, names, shapes, shardings, param_dtype)
    filled = [(path, variable.replace(value=arrays["/".join(str(p) for p in path)])) for path, variable in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(filled)), config


def _stored_names(index: SafetensorsIndex, config: DecoderConfig, names: dict[str, Source],
                  ignore) -> dict[str, Source]:
    """`names` with each tensor as stored (a multimodal checkpoint keeps its language model under a prefix).

    Raises:
      ValueError: one line naming the checkpoint tensors the model leaves unread (beside `decoder_non_weights`,
        a tied model's copy of its embedding and `ignore`), and any missing ones.
    """
    stored = text_model_names(index.names())
    names = {path: source._replace(name=stored.get(source.name, source.name)) for path, source in names.items()}
    text = {s: t for t, s in stored.items()}
    used = {text.get(source.name, source.name) for source in names.values()}
    tied = tied_copy_differs(config, {"lm_head.weight", "model.embed_tokens.weight"} <= stored.keys(),
                             lambda name, k: index.read(stored[name], (slice(0, k), slice(None))))
    if config.tie_embeddings:  # a copy of the embedding, or reported as differing from it
        used.add("lm_head.weight")
    unused = [stored[n] for n in unused_tensors(stored, used, allow=decoder_non_weights(config), ignore=ignore)]
    if unused or tied:
        missing = sorted({source.name for source in names.values() if source.name not in index})
        problems = ([f"missing keys: {', '.join(missing)}"] if missing else []) + ([tied] if tied else []) + (
            [describe_unused(unused, index.file(unused[0]).name)] if unused else [])
        raise ValueError(f"{index.model_dir}: cannot load {config.family} weights; {'. '.join(problems)}")
    return names
