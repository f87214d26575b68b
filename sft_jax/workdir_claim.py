"""A training run's claim on its workdir: the workdir lock for the run's whole life, and config.json written only
once training has started (`Claim.commit`, after the first step), so that a run failing in set-up (a bad
option, a mesh that does not fit, out of memory compiling the step) leaves nothing that makes the corrected
command an "incompatible resume", and no workdir of its own making behind."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from sft_jax import storage
from sft_jax.workdir_lock import LOCK_FILE, WorkdirLock, WorkdirLocked, describe

_EVENTS_PREFIX = "events.out.tfevents."  # TensorBoard's event files, which set-up opens


def command_line() -> str:
    """This process's command line, as one would type it again (`python -m MODULE` for a module run)."""
    import shlex
    import sys

    argv = list(sys.argv)
    main = sys.modules.get("__main__")
    module = getattr(getattr(main, "__spec__", None), "name", None)
    head = ["python", "-m", module.removesuffix(".__main__")] if module else [os.path.basename(argv[0] or "python")]
    return shlex.join(head + argv[1:])


class Claim:
    """Held by `claim` while a run is set up and trains. `lock` is None in processes other than process 0."""

    def __init__(self, rundir, lock: WorkdirLock | None):
        self.rundir, self.lock = rundir, lock
        self.committed = False

    def commit(self, config) -> None:
        """Training has started: writes `config` (a ConfigDict) as config.json (process 0), which marks the workdir
        as this run's. Called after every step; only the first writes."""
        if self.committed:
            return
        self.committed = True
        if self.lock is not None:
            # The command line rides along for the exports' model cards (`sft_jax.export.model_card`).
            self.rundir.write_config({**config.to_dict(), "command": command_line()})


@contextlib.contextmanager
def claim(rundir, setup_files: tuple[str, ...]) -> Iterator[Claim]:
    """Creates the workdir, takes its lock (process 0 of a multi-host run, all processes agreeing on the outcome),
    and releases it on any exit; if the run ends before `Claim.commit`, removes the `setup_files` (names) its
    set-up wrote, and the workdir itself if this run created it."""
    import jax

    created = _missing_dirs(rundir.path)
    lock = WorkdirLock(rundir.path) if jax.process_index() == 0 else None
    error = None
    try:
        rundir.ensure_writable()
        if lock is not None:
            lock.acquire()
    except Exception as e:  # raised below, once every process knows, so none waits for the others in set-up
        error = e
    if error is None and jax.process_count() > 1:
        error = _agree(rundir.path, lock)
    elif jax.process_count() > 1:
        _gather(1 if isinstance(error, WorkdirLocked) else 2)
    if error is not None:
        if lock is not None:
            lock.release()
        raise error
    before = set(storage.listdir(rundir.path))
    run = Claim(rundir, lock)
    try:
        yield run
    except BaseException:
        if lock is not None and not run.committed:
            with contextlib.suppress(OSError):  # the run's own error is the one to report
                _remove_setup_files(rundir.path, before, created, setup_files)
        raise
    finally:
        if lock is not None:
            lock.release()


def _agree(path: str, lock: WorkdirLock | None) -> WorkdirLocked | None:
    """With this process's claim in order: why another process's failed, or None when every one succeeded."""
    outcomes = _gather(0)
    if outcomes[0] == 1 and lock is None:  # the workdir is shared: read who process 0 found
        return WorkdirLocked(f"{path} is in use by another run ({describe(WorkdirLock(path).holder())}); "
                             "process 0 stopped")
    if any(outcomes):
        bad = next(i for i, c in enumerate(outcomes) if c)
        return WorkdirLocked(f"{path}: process {bad} of this run could not claim the workdir (see its error)")
    return None


def _gather(code: int) -> list[int]:
    """`code` of every process of a multi-host run, by process index."""
    import numpy as np
    from jax.experimental import multihost_utils

    return [int(c) for c in np.ravel(multihost_utils.process_allgather(np.int32(code)))]


def _missing_dirs(path: str) -> list[str]:
    """The directories `os.makedirs(path)` would create, deepest first (none on an object store)."""
    if storage.is_remote(path):
        return []
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _remove_setup_files(path: str, before: set[str], created: list[str], setup_files: tuple[str, ...]) -> None:
    """Removes the `setup_files` and empty directories that appeared since `before` (anything else new is left
    alone); then, if nothing else is left and this run created the workdir, the lock file and the directories
    it created. On an object store (no directories) only the `setup_files` and event files go."""
    if storage.is_remote(path):
        for name in set(storage.listdir(path)) - before:
            if name in setup_files or name.startswith(_EVENTS_PREFIX):
                with contextlib.suppress(OSError):
                    storage.remove(storage.join(path, name))
        return
    for name in set(os.listdir(path)) - before:
        full = os.path.join(path, name)
        try:
            if os.path.isdir(full) and not os.path.islink(full):
                for root, _, _ in os.walk(full, topdown=False):  # deepest first
                    os.rmdir(root)  # fails on anything holding a file: left alone
            elif name in setup_files or name.startswith(_EVENTS_PREFIX):
                os.remove(full)
        except OSError:
            pass
    if created and os.listdir(path) == [LOCK_FILE]:
        for directory in created:
            try:
                if directory == created[0]:
                    os.remove(os.path.join(directory, LOCK_FILE))
                os.rmdir(directory)
            except OSError:
                break
