"""Reading a checkpoint's files so that a damaged one (truncated by an interrupted download, garbled, or not
what its name says) is one error naming the file, rather than a parser's traceback that names none.

`DamagedFile` is a ValueError: the command lines print it as their one-line error.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any


class DamagedFile(ValueError):
    """A model or run file that exists but cannot be read as what it should be; the message starts with its path."""


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in `path` (config.json, an index, labels.json ...); DamagedFile when it is not one."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise DamagedFile(f"{path}: is a directory, expected a JSON file")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: an editor's BOM is harmless
    except UnicodeDecodeError as e:
        raise DamagedFile(f"{path}: not a JSON file (not valid UTF-8: {e.reason} at byte {e.start})") from None
    if not text.strip():
        raise DamagedFile(f"{path}: the file is empty; is it truncated?")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DamagedFile(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                          "is the file truncated or damaged?") from None
    if not isinstance(value, dict):
        raise DamagedFile(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def damaged_weights(path: str | os.PathLike, e: Exception, kind: str) -> DamagedFile:
    """The error for a weights file (`kind`: "safetensors", "GGUF", ...) its reader failed on with `e`."""
    reason = (str(e).strip().splitlines() or [""])[0]
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    what = "the file is empty" if size == 0 else f"{size} bytes"
    return DamagedFile(f"{path}: not a readable {kind} file ({what}; {type(e).__name__}: {reason}); "
                       "is it truncated or damaged? download it again")
