"""Where workdirs and data live: local disk, `file://` URLs, and object stores (`gs://`, `s3://`).

One path library serves every remote path: `etils.epath`, the one orbax already writes checkpoints through (its
fsspec backend: `gcsfs` for gs://, `s3fs` for s3://, each installed by whoever uses that store). A `file://` URL is
its local path. Local paths keep the plain `os` calls, so their behaviour and error messages are unchanged.

What object stores lack, and what is done instead:
- rename: a file written whole (`write_text`) is one object upload, which stores make visible at once or not at
  all, so it needs no temporary file; on local disk a temporary file is replaced in one step.
- append: `Appender` keeps the file's text and uploads all of it at each flush (metrics.jsonl is small).
- locks: none; `sft_jax.workdir_lock` says so and the workdir is unguarded there.
- seeking within a file: remote data is fetched once into a local mirror (`local_copy`) and read from there
  (readers scan and seek, and streaming sources read one record at a time).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
from collections.abc import Callable, Iterator
from typing import IO, Any

REMOTE_SCHEMES = ("gs://", "s3://")
_FILE_SCHEME = "file://"


def normalize(path: str | os.PathLike) -> str:
    """The path as a string; a `file://` URL becomes its local path."""
    path = os.fspath(path)
    if path.startswith(_FILE_SCHEME):
        rest = path[len(_FILE_SCHEME):]
        if rest and not rest.startswith("/"):  # file://host/x: only the local host has a meaning here
            raise ValueError(f"{path}: a file:// URL must name a local absolute path (file:///DIR)")
        return rest
    return path


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is on an object store (gs://, s3://)."""
    return os.fspath(path).startswith(REMOTE_SCHEMES)


def _epath(path: str):
    from etils import epath  # imported here: local runs never need it

    return epath.Path(path)


def absolute(path: str | os.PathLike) -> str:
    """The absolute path of a local path (a `file://` URL's included); a remote one as it is."""
    path = normalize(path)
    return path if is_remote(path) else os.path.abspath(path)


def join(path: str, *names: str) -> str:
    if is_remote(path):
        return "/".join([path.rstrip("/"), *names])
    return os.path.join(path, *names)


def exists(path: str) -> bool:
    return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isfile(path: str) -> bool:
    return _epath(path).is_file() if is_remote(path) else os.path.isfile(path)


def isdir(path: str) -> bool:
    return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
    """Names in the directory (on an object store: under the prefix `path/`)."""
    if is_remote(path):
        return [p.name for p in _epath(path).iterdir()]
    return os.listdir(path)


def makedirs(path: str) -> None:
    """Creates the directory; a no-op on object stores, where a prefix exists once an object is under it."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def rename(src: str, dst: str) -> None:
    """Moves a file or directory (on an object store: copies every object, then deletes the originals)."""
    if is_remote(src):
        _epath(src).rename(dst)
    else:
        os.rename(src, dst)


def remove(path: str) -> None:
    if is_remote(path):
        _epath(path).unlink()
    else:
        os.remove(path)


def open(path: str, mode: str = "r") -> IO[Any]:  # noqa: A001 - the builtin's name, for the builtin's job
    """A file object, local or remote (reading and writing whole files; see `Appender` for appends)."""
    if is_remote(path):
        return _epath(path).open(mode)
    import builtins

    return builtins.open(path, mode)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    """Writes the whole file at once: a crash never leaves half of it (local: a temporary file replaced in one
    step; object store: one upload, visible whole or not at all)."""
    if is_remote(path):
        _epath(path).write_text(text)
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class Appender:
    """A text file appended to line by line and flushed after each write: a local file opened for appending, or on
    an object store (which cannot append) the whole text, uploaded again at each flush."""

    def __init__(self, path: str):
        self.path = path
        if is_remote(path):
            self._text = read_bytes(path).decode() if exists(path) else ""
            self._file = None
        else:
            self._file = open(path, "a")

    def write(self, text: str) -> None:
        if self._file is not None:
            self._file.write(text)
            self._file.flush()
        else:
            self._text += text
            _epath(self.path).write_text(self._text)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


# --- remote data, read from a local mirror -------------------------------------------------------------------
def cache_root() -> str:
    """sft_jax's per-machine cache: $SFT_JAX_CACHE, else ~/.cache/sft_jax."""
    return os.environ.get("SFT_JAX_CACHE") or os.path.expanduser("~/.cache/sft_jax")


def cache_dir() -> str:
    """Where remote data is mirrored: `cache_root()`/remote."""
    return os.path.join(cache_root(), "remote")


def local_copy(url: str) -> str:
    """A local copy of the remote file or folder `url`, fetched again only when the remote one changed (its
    size and modification time). Its path ends in the URL's own (`<cache>/s3/BUCKET/KEY`)."""
    scheme, rest = url.split("://", 1)
    local = os.path.join(cache_dir(), scheme, *[p for p in rest.split("/") if p not in ("", ".", "..")])
    remote = _epath(url)
    if not remote.exists():
        raise FileNotFoundError(url)
    stamps = _stamps(remote)
    stamp_file = local + ".fetched.json"
    if os.path.exists(local) and os.path.exists(stamp_file):
        with contextlib.suppress(ValueError, OSError):
            with open(stamp_file) as f:
                if json.load(f) == stamps:
                    return local
    tmp = f"{local}.fetching.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(local), exist_ok=True)
    if remote.is_dir():
        for src in sorted(p for p in remote.rglob("*") if p.is_file()):
            dst = os.path.join(tmp, *src.relative_to(remote).parts)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            _download(src, dst)
    else:
        _download(remote, tmp)
    if os.path.isdir(local):
        shutil.rmtree(local)
    os.replace(tmp, local)  # whole or not at all: another process reading the old copy keeps its open files
    with open(stamp_file, "w") as f:
        json.dump(stamps, f)
    return local


def _download(remote, local: str) -> None:
    with remote.open("rb") as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)


def _stamps(remote) -> dict[str, list]:
    """{relative name: [size, mtime]} of every file under `remote` (a file: of itself, under "")."""
    def stamp(p) -> list:
        st = p.stat()
        return [st.length, str(st.mtime)]

    if not remote.is_dir():
        return {"": stamp(remote)}
    return {"/".join(p.relative_to(remote).parts): stamp(p) for p in remote.rglob("*") if p.is_file()}


def _split_suffix(spec: str) -> tuple[str, str]:
    """("s3://b/ds", ":train") for a `datasets` folder with a split, ("s3://b/x.txt", "[:90%]") for a slice;
    (spec, "") for anything else."""
    if spec.endswith("]") and "[" in spec:
        i = spec.rindex("[")
        return spec[:i], spec[i:]
    head, sep, tail = spec.rpartition(":")
    if sep and "/" not in tail and "://" in head and tail:
        return head, sep + tail
    return spec, ""


def reads_data(reader: Callable) -> Callable:
    """Decorates a data reader `reader(spec, ...)`: a remote `spec` (gs://, s3://) is read from its local mirror
    (`local_copy`), and the reader's one-line errors name the URL, not the mirror; a `file://` spec its path."""
    @functools.wraps(reader)
    def read(spec, *args, **kwargs):
        spec = normalize(spec) if isinstance(spec, str) else spec
        if not (isinstance(spec, str) and is_remote(spec)):
            return reader(spec, *args, **kwargs)
        url, suffix = _split_suffix(spec)
        if suffix and not exists(url):
            url, suffix = spec, ""
        try:
            local = local_copy(url)
        except FileNotFoundError:
            from sft_jax.data.errors import DataError

            raise DataError(f"{spec}: file not found") from None
        with named_as(url, local):
            records = reader(local + suffix, *args, **kwargs)
        return [_renamed(r, local, url) for r in records] if isinstance(records, list) else records
    return read


def _renamed(record, local: str, url: str):
    """`record` with its `where` ("FILE:LINE", which later errors quote) naming `url` instead of `local`."""
    where = getattr(record, "where", None)
    if isinstance(where, str) and where.startswith(local) and dataclasses.is_dataclass(record):
        return dataclasses.replace(record, where=url + where[len(local):])
    return record


@contextlib.contextmanager
def named_as(url: str, local: str) -> Iterator[None]:
    """Errors raised inside name `url` wherever they named its local mirror `local`."""
    try:
        yield
    except (ValueError, OSError) as e:  # DataError is a ValueError
        message = str(e)
        if local in message:
            raise type(e)(message.replace(local, url)) from None
        raise


def write_json(path: str, value: Any, default: Callable | None = None) -> None:
    """`value` as indented JSON, written whole (`write_text`)."""
    write_text(path, json.dumps(value, indent=1, default=default))
