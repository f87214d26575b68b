"""Failed checkpoint saves (disk full, quota, a file-size limit, a vanished filesystem): one line, not orbax's
tracebacks.

Orbax writes a step in background threads; a write that fails there is raised on the main thread only when the
manager next waits (its next save, `wait_until_finished`), and logged on the way as several ERROR records with
tracebacks. `Checkpoints` turns the raised error into `CheckpointSaveFailed`, naming the step, its directory,
the operating system's reason and the last step that was saved whole; the loop stops on it. What the failed
save left (`<step>.orbax-checkpoint-tmp*`) is removed by orbax when the next training run opens the workdir."""

from __future__ import annotations

import logging
import os
import re
import sys


def reason(e: BaseException) -> str:
    """One line from an exception orbax or TensorStore raised: the innermost cause, without the
    TensorStore spec dumped after it."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = re.split(r" \[tensorstore_spec|\. See full TensorStore", text)[0]
    return text if len(text) <= 300 else text[:297] + "..."


class CheckpointSaveFailed(RuntimeError):
    """A checkpoint could not be written (one line: step, directory, reason, the last good step)."""


def failure_reason(e: BaseException) -> str:
    """The operating system's words for a failed write ("No space left on device"), found in an OSError or in
    the `os_error_code` TensorStore appends to its messages; else the innermost error's first line."""
    while e is not None:
        if isinstance(e, OSError) and e.errno:
            return os.strerror(e.errno)
        code = re.search(r"os_error_code='?(\d+)", str(e))
        if code:
            return os.strerror(int(code.group(1)))
        e = e.__cause__ or e.__context__
    return "unknown error"


def describe(which: str, step: int | None, directory: str, e: BaseException, last_good: int | None) -> str:
    words = failure_reason(e)
    if words == "unknown error":
        words = reason(e)
    last = f"the last good checkpoint is step {last_good}" if last_good is not None else "no checkpoint is saved yet"
    where = os.path.join(directory, str(step)) if step is not None else directory
    return (f"saving the {which} checkpoint of step {step} to {where} failed: {words}; "
            f"{last} (the same command resumes from it once the cause is fixed)")


class _DropOrbaxErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


class _DropUnretrievedOrbaxFutures(logging.Filter):
    """asyncio's "_GatheringFuture exception was never retrieved": the other writes of a save whose first failure
    orbax already raised (and the command reports) fail too, and nobody awaits them any more."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (error is not None and "exception was never retrieved" in record.getMessage()
                    and _raised_in_orbax(error))


def _raised_in_orbax(e: BaseException) -> bool:
    """Raised through orbax's code, or by TensorStore that orbax writes with: its errors name their spec, or,
    set on a future from its C++ threads with no Python frame, the step's unfinished directory."""
    text = str(e).lower()
    if "tensorstore" in text or ".orbax-checkpoint-tmp" in text:
        return True
    tb = e.__traceback__
    while tb is not None:
        if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def event_loop_closed(u) -> bool:
    """Whether an unraisable exception (`sys.unraisablehook`) is a TensorStore write or read finishing after orbax
    closed the event loop of the save or restore that had already failed: raised in its callback, it reaches
    Python's hook with no object, and the default hook prints its traceback."""
    return u.object is None and u.exc_type is RuntimeError and str(u.exc_value) == "Event loop is closed"


def quiet_orbax_errors() -> None:
    """For command lines: drops orbax's ERROR log records (a failed background save logs several, each with a
    traceback; an unreadable step's metadata one more), asyncio's records of its writes left unawaited after
    the first failed, and the late `event_loop_closed` tracebacks of its failed operations. Every such failure
    reaches the caller as an exception, which the command prints as one line."""
    for name, kind in (("absl", _DropOrbaxErrors), ("asyncio", _DropUnretrievedOrbaxFutures)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())
    previous = sys.unraisablehook
    if getattr(previous, "drops_event_loop_closed", False):
        return

    def hook(u):
        if not event_loop_closed(u):
            previous(u)

    hook.drops_event_loop_closed = True
    sys.unraisablehook = hook
