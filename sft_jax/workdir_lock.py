"""One training run per workdir: an OS advisory lock on WORKDIR/run.lock, held for the run's whole life.

The kernel is what decides: `fcntl.flock` on the lock file, which it releases when the process ends however it
ends (exception, SIGKILL, OOM killer), so a lock can never outlive its holder and a reused pid cannot fake one.
The file also holds who took it (host, pid, start time): only to name the holder to a refused run, and to tell
a lock released cleanly (emptied on release) from one whose holder died (still filled in: "taken over").

A multi-host run takes it once, in process 0: every process sharing the filesystem asking for it would make
all but one of them refuse their own run. On filesystems without locks, and on object stores (gs://, s3://),
which have none a crashed holder would release, a warning says the workdir is unguarded.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time

from sft_jax import storage

LOCK_FILE = "run.lock"
_HOLDER_WAIT_S = 2.0  # how long a refused run waits for a winner that has the lock but not yet written its name


class WorkdirLocked(RuntimeError):
    """Another run holds the workdir (or, in a multi-host run, another process of this one could not claim it)."""


def describe(holder: dict | None) -> str:
    """"host H, pid P, started T" of a lock record."""
    if not holder:
        return "holder not yet recorded"
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"


def _read(fd: int) -> dict | None:
    data = os.pread(fd, 4096, 0)
    if not data.strip():
        return None
    try:
        return json.loads(data)
    except ValueError:  # written by something else, or cut short by a crash mid-write
        return {"host": "?", "pid": "?", "started": "?"}


class WorkdirLock:
    """The lock of the workdir at `path`: `acquire` (or `with`), then `release` (also with `remove=True`, which
    deletes the lock file, for a workdir being removed)."""

    def __init__(self, path: str | os.PathLike):
        self.path = storage.normalize(path)
        self.file = storage.join(self.path, LOCK_FILE)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> dict | None:
        """Who holds (or last held without releasing) the lock, from the file; None when nobody is recorded."""
        if storage.is_remote(self.path):
            return None
        try:
            fd = os.open(self.file, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return _read(fd)
        finally:
            os.close(fd)

    def acquire(self) -> dict | None:
        """Takes the lock, or raises WorkdirLocked naming its holder. Returns the holder of a lock whose process
        died without releasing it (and says so on stderr), else None."""
        if storage.is_remote(self.path):
            print(f"warning: {self.path}: object stores have no locks that end with their holder, so none is "
                  "taken; another run on this workdir would not be stopped", file=sys.stderr)
            return None
        while True:
            try:
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the directory was just removed by a run that failed in set-up
                os.makedirs(self.path, exist_ok=True)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._wait_for_holder(fd)
                os.close(fd)
                raise WorkdirLocked(f"{self.path} is in use by another run ({describe(holder)}); wait for it to "
                                    "end or use another workdir") from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    os.close(fd)
                    raise
                os.close(fd)
                print(f"warning: {self.file}: the filesystem does not support locks ({e.strerror}); another run "
                      "on this workdir would not be stopped", file=sys.stderr)
                return None
            # A holder that removed its workdir (failed set-up) unlinks the file while holding it: the inode we
            # locked may no longer be the file's, and a lock on it guards nothing.
            try:
                same = os.stat(self.file).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self._fd = fd
            break
        previous = _read(fd)
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        if previous:
            print(f"{self.path}: taking over the lock of a run that ended without releasing it "
                  f"({describe(previous)})", file=sys.stderr)
        return previous

    def _wait_for_holder(self, fd: int) -> dict | None:
        """The holder's record; a winner of a race writes it just after locking, so wait briefly for it."""
        deadline = time.monotonic() + _HOLDER_WAIT_S
        while (holder := _read(fd)) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return holder

    def release(self, *, remove: bool = False) -> None:
        """Empties the record (a clean release, not a dead holder), or deletes the file, then unlocks."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if remove:
                os.unlink(self.file)
            else:
                os.ftruncate(fd, 0)
        except OSError:
            pass  # the kernel still releases the lock below; a record left behind only reads as "taken over"
        finally:
            os.close(fd)  # releases the flock

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
