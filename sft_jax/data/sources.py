"""Readers for labelled data in the formats people have: .jsonl, .tsv, .csv, `tfds:NAME[:SPLIT]`, and
.parquet / .arrow files and `datasets` folders through `columnar`.

Every record keeps `where` ("file:line") so that any later error (an unknown label, a text that is
too long) can name the exact place in the input.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
from collections.abc import Iterator

from sft_jax import storage
from sft_jax.data import columnar
from sft_jax.data.errors import DataError


@dataclasses.dataclass(frozen=True)
class Example:
    text: str
    label: str  # labels are kept as strings; int labels become "0", "1", ...
    where: str


def label_to_str(value: object, where: str, field: str) -> str:
    # bool is an int subclass but `true` as a class label is almost certainly a mistake.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: field {field!r} must be a string or an int, got {type(value).__name__}")
    label = str(value).strip()
    if not label:
        raise DataError(f"{where}: field {field!r} is empty")
    return label


def make_example(record: dict, where: str, text_field: str, label_field: str) -> Example:
    for field in (text_field, label_field):
        if field not in record or record[field] is None:
            raise DataError(f"{where}: missing field {field!r} (record has {sorted(record)})")
    text = record[text_field]
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    if not isinstance(text, str):
        raise DataError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise DataError(f"{where}: field {text_field!r} is empty")
    return Example(text=text, label=label_to_str(record[label_field], where, label_field), where=where)


def iter_jsonl(path: str) -> Iterator[tuple[str, dict]]:
    """Yields ("file:line", record) for each non-blank line of a JSONL file of objects."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not is_blank(raw):
                yield parse_jsonl_line(raw, f"{path}:{lineno}", first=lineno == 1)


def is_blank(raw: bytes) -> bool:
    """Whether a JSONL line holds only whitespace (a BOM too); an undecodable line is not blank: its parse says
    why."""
    try:
        return not raw.decode("utf-8").lstrip("\ufeff").strip()
    except UnicodeDecodeError:
        return False


def parse_jsonl_line(raw: bytes, where: str, first: bool = False) -> tuple[str, dict]:
    """(where, record) of one non-blank JSONL line; `first`: the file's first line, which may start with a BOM."""
    try:
        line = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return where, record


def _read_jsonl(path: str, text_field: str, label_field: str) -> Iterator[Example]:
    for where, record in iter_jsonl(path):
        yield make_example(record, where, text_field, label_field)


def _read_delimited(path: str, delimiter: str, text_field: str, label_field: str) -> Iterator[Example]:
    # TSV files (GLUE) contain bare quote characters inside texts: read them without quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    csv.field_size_limit(sys.maxsize)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: spreadsheets write a BOM
            rows = csv.reader(f, delimiter=delimiter, quoting=quoting)
            header = next(rows, None)
            if header is None:
                return
            header = [h.strip() for h in header]
            for field in (text_field, label_field):
                if field not in header:
                    raise DataError(f"{path}:1: header has no column {field!r} (columns: {header})")
            ti, li = header.index(text_field), header.index(label_field)
            for row in rows:
                where = f"{path}:{rows.line_num}"
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(header):
                    raise DataError(f"{where}: expected {len(header)} columns, found {len(row)}")
                yield make_example({text_field: row[ti], label_field: row[li]}, where, text_field, label_field)
    except UnicodeDecodeError:
        raise DataError(_utf8_error(path)) from None


def _utf8_error(path: str) -> str:
    """Names the first line that is not UTF-8 (the text decoder only knows an offset in its buffer)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})"
    return f"{path}: not valid UTF-8"


def open_tfds(spec: str, data_dir: str | None):
    """A random-access TFDS source for `tfds:NAME[:SPLIT]` (split "train" by default), never downloading."""
    import tensorflow_datasets as tfds  # imported lazily: slow to import and only needed here

    parts = spec.split(":", 2)  # a split may itself hold colons: "train[:10%]"
    if len(parts) not in (2, 3) or not parts[1]:
        raise DataError(f"{spec}: expected tfds:NAME[:SPLIT]")
    name, split = parts[1], parts[2] if len(parts) == 3 else "train"
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises many types; all mean "not available here"
        first_line = (str(e).strip().splitlines() or [""])[0]  # not found: then lists every TFDS dataset
        raise DataError(f"{spec}: cannot open TFDS dataset ({type(e).__name__}: {first_line})") from None


def tfds_label(record: dict, label_field: str, names, where: str):
    """A ClassLabel id -> its name (other labels as they are)."""
    label = record.get(label_field)
    if names is not None and label is not None and not isinstance(label, str):
        label = int(label)
        if not 0 <= label < len(names):  # e.g. GLUE test splits use -1 for "no label"
            raise DataError(f"{where}: label {label} outside the dataset's classes {names}")
        return names[label]
    return label


def _read_tfds(spec: str, text_field: str, label_field: str, data_dir: str | None) -> Iterator[Example]:
    source = open_tfds(spec, data_dir)
    features = source.dataset_info.features
    # GLUE-style datasets call the text "sentence"; accept it when "text" is configured.
    if text_field not in features and text_field == "text" and "sentence" in features:
        text_field = "sentence"
    label_feature = features[label_field] if label_field in features else None
    names = getattr(label_feature, "names", None)
    for i in range(len(source)):
        record = dict(source[i])
        record[label_field] = tfds_label(record, label_field, names, f"{spec}:{i}")
        yield make_example(record, f"{spec}:{i}", text_field, label_field)


@storage.reads_data  # gs:// and s3:// specs: read from a local mirror
def read_classification(
    spec: str, *, text_field: str = "text", label_field: str = "label", data_dir: str | None = None
) -> list[Example]:
    """Reads text classification examples from a .jsonl/.tsv/.csv/.parquet/.arrow path, a `datasets` folder
    (`DIR[:SPLIT]`) or `tfds:NAME[:SPLIT]`."""
    if spec.startswith("tfds:"):
        examples = list(_read_tfds(spec, text_field, label_field, data_dir))
    elif columnar.is_columnar(spec):
        examples = [make_example(record, where, text_field, label_field)
                    for where, record in columnar.iter_records(spec, label_field)]
    else:
        if not os.path.exists(spec):
            raise DataError(f"{spec}: file not found")
        if os.path.isdir(spec):
            raise DataError(f"{spec}: is a directory; text classification expects a .jsonl, .tsv, .csv, .parquet "
                            "or .arrow file or a `datasets` save_to_disk folder")
        ext = os.path.splitext(spec)[1].lower()
        if ext == ".jsonl":
            examples = list(_read_jsonl(spec, text_field, label_field))
        elif ext in (".tsv", ".csv"):
            examples = list(_read_delimited(spec, "\t" if ext == ".tsv" else ",", text_field, label_field))
        else:
            raise DataError(f"{spec}: unknown format {ext!r}; expected .jsonl, .tsv, .csv, .parquet, .arrow, "
                            "a `datasets` folder or tfds:NAME[:SPLIT]")
    if not examples:
        raise DataError(f"{spec}: no examples")
    return examples
