"""Parquet files, Arrow IPC files and `datasets` save_to_disk folders as records, for every task.

Specs:
    FILE.parquet     read row group by row group
    FILE.arrow       Arrow IPC, the file format or the stream format (`datasets` writes streams)
    DIR              a `Dataset.save_to_disk` folder (state.json lists its data-*.arrow files, in order)
    DIR:SPLIT        one split of a `DatasetDict.save_to_disk` folder (dataset_dict.json); plain DIR only when
                     the folder holds a single split (otherwise which one is meant is refused, not guessed)
    hf:ORG/NAME[:CONFIG][:SPLIT]   the Arrow files of the local Hugging Face datasets cache (see `hf_cache`)

Each row becomes a dict as a jsonl line would: a struct a dict, a list a list, and a null column left out, as a
field absent from a jsonl record (a file has one set of columns, so rows of different kinds, e.g. chats beside
instructions, are null where they have no such field). Its `where` is "FILE:ROW", ROW counted from 0 within
that file as pyarrow, pandas and `datasets` index it. The task readers apply their field mapping and checks
to it exactly as to a jsonl record: the same fields, the same errors and, for data in one file, the same
order. A `datasets` ClassLabel column (named in dataset_info.json or in the files' "huggingface" schema
metadata) gives class names instead of ids when it is the label field.

Read with pyarrow directly, one record batch at a time, not with the `datasets` library: it is one less heavy
dependency at run time (pandas, dill, multiprocess, an HTTP client), and pyarrow is what `datasets` itself
uses to write and read these files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from sft_jax.data import hf_cache
from sft_jax.data.errors import DataError

SUFFIXES = (".parquet", ".arrow")
_BATCH_ROWS = 256  # rows converted to Python at a time: bounded memory for image bytes
_IPC_FILE_MAGIC = b"ARROW1"


@dataclasses.dataclass(frozen=True)
class Source:
    """The files of one data spec and the `datasets` features that describe their columns (if any)."""

    spec: str
    files: tuple[str, ...]
    features: dict

    def class_names(self, field: str) -> list[str] | None:
        feature = self.features.get(field)
        if isinstance(feature, dict) and feature.get("_type") == "ClassLabel":
            return list(feature.get("names") or [])
        return None

    def records(self, label_field: str | None = None) -> Iterator[tuple[str, dict]]:
        """("FILE:ROW", record) for every row; `label_field`'s ClassLabel ids become their names."""
        names = self.class_names(label_field) if label_field else None
        for path in self.files:
            row = 0
            for batch in _batches(path):
                for record in batch.to_pylist():
                    where = f"{path}:{row}"
                    row += 1
                    record = {k: v for k, v in record.items() if v is not None}
                    if names is not None and label_field in record:
                        record[label_field] = _class_name(record[label_field], names, where)
                    yield where, record


def _class_name(label, names: list[str], where: str):
    if isinstance(label, bool) or not isinstance(label, int):
        return label  # the task's own checks name what is wrong with it
    if not 0 <= label < len(names):  # `datasets` uses -1 for "no label" (e.g. GLUE test splits)
        raise DataError(f"{where}: label {label} outside the dataset's classes {names}")
    return names[label]


def is_columnar(spec: str) -> bool:
    """Whether `spec` names a Parquet or Arrow file or a `datasets` folder (that this module reads)."""
    return spec.startswith(hf_cache.PREFIX) or spec.lower().endswith(SUFFIXES) or _folder(spec) is not None


def _folder(spec: str) -> tuple[str, str | None] | None:
    """(folder, split or None) when `spec` is a save_to_disk folder or `DICT_FOLDER:SPLIT`."""
    if os.path.isdir(spec):
        if any(os.path.isfile(os.path.join(spec, f)) for f in ("state.json", "dataset_dict.json")):
            return spec, None
        return None
    base, sep, split = spec.rpartition(":")
    if sep and split and os.path.isfile(os.path.join(base, "dataset_dict.json")):
        return base, split
    return None


def open_source(spec: str) -> Source:
    """The files of a Parquet / Arrow / `datasets` folder / `hf:` spec, checked to exist and be readable."""
    if spec.startswith(hf_cache.PREFIX):
        cached = hf_cache.resolve(spec)
        return Source(spec, cached.files, cached.features or _schema_features(cached.files[0]))
    folder = _folder(spec)
    if folder is not None:
        return _open_folder(spec, *folder)
    if os.path.isdir(spec):
        raise DataError(f"{spec}: a folder without state.json or dataset_dict.json is not a `datasets` folder")
    if not os.path.isfile(spec):
        raise DataError(f"{spec}: file not found")
    return Source(spec, (spec,), _schema_features(spec))


def iter_records(spec: str, label_field: str | None = None) -> Iterator[tuple[str, dict]]:
    """("FILE:ROW", record) for each row of a Parquet / Arrow / `datasets` folder spec."""
    yield from open_source(spec).records(label_field)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _open_folder(spec: str, folder: str, split: str | None) -> Source:
    dict_file = os.path.join(folder, "dataset_dict.json")
    if os.path.isfile(dict_file):
        splits = _read_json(dict_file).get("splits")
        if not isinstance(splits, list) or not splits:
            raise DataError(f"{dict_file}: no 'splits' list")
        if split is None:
            if len(splits) != 1:
                raise DataError(f"{spec}: a DatasetDict folder with splits {splits}; choose one with "
                                f"{spec}:SPLIT (e.g. {spec}:{splits[0]})")
            split = splits[0]
        if split not in splits:
            raise DataError(f"{spec}: no split {split!r} in {dict_file} (splits: {splits})")
        folder = os.path.join(folder, split)
    state_file = os.path.join(folder, "state.json")
    if not os.path.isfile(state_file):
        raise DataError(f"{spec}: {state_file} not found (not a save_to_disk folder)")
    entries = _read_json(state_file).get("_data_files")
    if not isinstance(entries, list) or not entries or not all(
            isinstance(e, dict) and isinstance(e.get("filename"), str) for e in entries):
        raise DataError(f"{state_file}: no '_data_files' list of {{'filename': ...}}")
    files = tuple(os.path.join(folder, e["filename"]) for e in entries)
    for path in files:
        if not os.path.isfile(path):
            raise DataError(f"{spec}: {path} (listed in {state_file}) not found")
    info_file = os.path.join(folder, "dataset_info.json")
    features = _read_json(info_file).get("features") if os.path.isfile(info_file) else None
    return Source(spec, files, features if isinstance(features, dict) else _schema_features(files[0]))


def _schema(path: str) -> pa.Schema:
    try:
        if path.lower().endswith(".parquet"):
            return pq.read_schema(path)
        with pa.memory_map(path) as source:
            return _ipc_reader(source).schema
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def _schema_features(path: str) -> dict:
    """The `datasets` features that files written by `datasets` carry in their schema metadata."""
    raw = (_schema(path).metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    try:
        features = json.loads(raw).get("info", {}).get("features")
    except (ValueError, AttributeError):
        return {}
    return features if isinstance(features, dict) else {}


def _ipc_reader(source):
    """A reader of an Arrow IPC file ("ARROW1" magic) or stream; both have `.schema`."""
    magic = source.read(len(_IPC_FILE_MAGIC))
    source.seek(0)
    return pa.ipc.open_file(source) if magic == _IPC_FILE_MAGIC else pa.ipc.open_stream(source)


def _batches(path: str) -> Iterator[pa.RecordBatch]:
    try:
        if path.lower().endswith(".parquet"):
            yield from pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS)
            return
        with pa.memory_map(path) as source:
            reader = _ipc_reader(source)
            if isinstance(reader, pa.ipc.RecordBatchFileReader):
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                batches = iter(reader)
            for batch in batches:
                for start in range(0, batch.num_rows, _BATCH_ROWS):
                    yield batch.slice(start, _BATCH_ROWS)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
