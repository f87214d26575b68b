"""Records of a training file read one at a time by index, for data larger than memory (`streaming`).

A source holds only an index of where each record starts, never the records: for .jsonl one scan records the byte
offset of every non-blank line (8 bytes a record); for .parquet the row counts of its row groups come from the
footer and a row is read with the row group that holds it (the last one read is kept, so the rows of a batch that
share a group cost one read). Each item is ("FILE:LINE" or "FILE:ROW", record) exactly as the in-memory readers
give it (`sources.iter_jsonl`, `columnar`), with the same errors. Sources follow Grain's random-access protocol
(`__len__`, `__getitem__`), so `grain.MapDataset.source` takes them as they are. A gs:// or s3:// file is read
from its local mirror (`storage.local_copy`: each host fetches the whole file once), named by its URL.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections.abc import Iterator

import numpy as np

from sft_jax import storage
from sft_jax.data.errors import DataError
from sft_jax.data.sources import is_blank, parse_jsonl_line

SUFFIXES = (".jsonl", ".parquet")


class JsonlRecords:
    """The non-blank lines of a .jsonl file, by index."""

    def __init__(self, path: str, name: str | None = None):
        self.path, self.name = path, name or path  # the file read; what records and errors call it
        offsets, lines = [], []
        with open(path, "rb") as f:
            offset = 0
            for lineno, raw in enumerate(f, start=1):
                if not is_blank(raw):
                    offsets.append(offset)
                    lines.append(lineno)
                offset += len(raw)
        if not offsets:
            raise DataError(f"{self.name}: no records")
        self._offsets, self._lines = np.asarray(offsets, np.int64), np.asarray(lines, np.int64)
        self._file, self._lock = None, threading.Lock()

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> tuple[str, dict]:
        lineno = int(self._lines[index])
        with self._lock:  # one handle; Grain may read from several threads
            if self._file is None:
                self._file = open(self.path, "rb")  # noqa: SIM115 (kept open for the source's life)
            self._file.seek(int(self._offsets[index]))
            raw = self._file.readline()
        return parse_jsonl_line(raw, f"{self.name}:{lineno}", first=lineno == 1)

    def __getstate__(self):  # Grain's worker processes get their own handle
        return {**self.__dict__, "_file": None, "_lock": None}

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())


class ParquetRecords:
    """The rows of a .parquet file, by index, read a row group at a time."""

    def __init__(self, path: str, name: str | None = None):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path, self.name = path, name or path
        try:
            meta = pq.ParquetFile(path).metadata
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{self.name}: cannot read ({type(e).__name__}: {e})") from None
        counts = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if self._starts[-1] == 0:
            raise DataError(f"{self.name}: no records")
        self._group, self._rows, self._lock = -1, [], threading.Lock()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> tuple[str, dict]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        index = int(index)
        group = bisect.bisect_right(self._starts, index) - 1
        with self._lock:
            if group != self._group:
                try:
                    table = pq.ParquetFile(self.path).read_row_group(group)
                except (pa.ArrowException, OSError) as e:
                    raise DataError(f"{self.name}: cannot read ({type(e).__name__}: {e})") from None
                self._group, self._rows = group, table.to_pylist()
            record = self._rows[index - int(self._starts[group])]
        return f"{self.name}:{index}", {k: v for k, v in record.items() if v is not None}

    def __getstate__(self):
        return {**self.__dict__, "_group": -1, "_rows": [], "_lock": None}

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())


def _local(spec: str) -> tuple[str, str]:
    """(the local file to read, the name records and errors give it) of a training file spec."""
    spec = storage.normalize(spec)
    if not spec.endswith(".jsonl") and not spec.lower().endswith(".parquet"):
        raise DataError(f"{spec}: config.data.streaming reads .jsonl and .parquet files (other formats load into "
                        "memory: set streaming=False)")
    if storage.is_remote(spec):
        try:
            return storage.local_copy(spec), spec
        except FileNotFoundError:
            raise DataError(f"{spec}: file not found") from None
    if not os.path.isfile(spec):
        raise DataError(f"{spec}: file not found")
    return spec, spec


def open_records(spec: str) -> JsonlRecords | ParquetRecords:
    """The random-access source of a .jsonl or .parquet training file (local, file://, gs:// or s3://)."""
    path, name = _local(spec)
    return JsonlRecords(path, name) if path.endswith(".jsonl") else ParquetRecords(path, name)


def scan(spec: str) -> Iterator[tuple[str, dict]]:
    """Every ("FILE:LINE" / "FILE:ROW", record) of a streamed file, read once in order: the checks and label
    vocabulary a run needs before training, without holding the records."""
    from sft_jax.data import columnar
    from sft_jax.data.sources import iter_jsonl

    path, name = _local(spec)
    with storage.named_as(name, path):
        for where, record in iter_jsonl(path) if path.endswith(".jsonl") else columnar.iter_records(path):
            yield name + where[len(path):], record
