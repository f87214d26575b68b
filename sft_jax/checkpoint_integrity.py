"""Damaged checkpoints: what a step's save records to verify it by, how a restore tells a damaged step from an
intact one, and where a damaged step is set aside.

Each save writes into the step's meta (`ARRAYS_KEY`) the dtype, shape and `state.array_checksums` of every array
it holds; a restore reads the step's JSON files, restores its arrays and recomputes their checksums. Orbax reads a
flipped bit in an array file back as a different value without complaint: only the checksum catches that.
A step whose files cannot be read or whose arrays differ from their record is `DamagedStep`; one whose record
names other arrays than the run builds is not damaged but a different experiment (a plain ValueError)."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import time

import jax
import numpy as np

from sft_jax import storage
from sft_jax.checkpoint_failures import event_loop_closed
from sft_jax.state import array_checksums

ARRAYS_KEY = "arrays"  # in a checkpoint's meta: {item: {name: [checksum, dtype, shape]}}
DAMAGED_DIR = "damaged"  # beside latest/ and best/: steps set aside, renamed `<which>-<step>-<time>`
_JSON_FILES = ("_CHECKPOINT_METADATA", "meta/metadata")  # beside each array item's `_METADATA`


class DamagedStep(Exception):
    """A checkpoint step that cannot be read back as saved; `reason` is one line."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class DamagedCheckpoint(ValueError):
    """No intact step is left to restore (one line naming the damaged steps)."""


def flat_arrays(tree) -> dict[str, jax.Array]:
    """{key path: array} of the array leaves of `tree` (names for the record of a nested item)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): x for p, x in leaves if isinstance(x, (jax.Array, np.ndarray))}


def record(items: dict[str, dict[str, jax.Array]]) -> dict:
    """What a save writes under `ARRAYS_KEY` for `items` ({item name: flat_arrays}): the checksums are computed
    where the arrays live, and only 8 bytes per array reach the host."""
    out = {}
    for item, arrays in items.items():
        sums = array_checksums(arrays, sorted(arrays))
        out[item] = {n: [sums[n], str(arrays[n].dtype), list(arrays[n].shape)] for n in sorted(arrays)}
    return out


def check_layout(saved: dict, item: str, target: dict[str, jax.Array], where: str) -> None:
    """Raises ValueError (one line) when the `item` the step holds has other arrays than `target`: a config
    that builds a different model or optimizer state, not damage."""
    names = saved.get(item, {})
    missing, extra = sorted(set(target) - set(names)), sorted(set(names) - set(target))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"holds {extra[0]}, which this run does not build"
        raise ValueError(f"{where}: the checkpoint {what} ({len(missing)} missing, {len(extra)} unexpected "
                         f"{item} arrays); it is from a different configuration: use a new workdir")
    for n, (_, dtype, shape) in names.items():
        got = [str(target[n].dtype), list(target[n].shape)]
        if got != [dtype, shape]:
            raise ValueError(f"{where}: the checkpoint holds {item} {n} as {dtype}{shape}, this run builds "
                             f"{got[0]}{got[1]}; it is from a different configuration: use a new workdir")


def verify(saved: dict, item: str, restored: dict[str, jax.Array], where: str) -> None:
    """Raises DamagedStep naming the first array of `item` whose restored bits differ from those saved."""
    names = sorted(saved.get(item, {}))
    sums = array_checksums(restored, names)
    bad = [n for n in names if sums[n] != saved[item][n][0]]
    if bad:
        raise DamagedStep(where, f"{item} array {bad[0]} reads back different from what was saved (checksum; "
                                 f"{len(bad)} of {len(names)} arrays)")


def check_files(step_dir: str, items: tuple[str, ...]) -> None:
    """Raises DamagedStep for a JSON file of the step that is not valid JSON, or an item that is missing."""
    for item in items:
        if not storage.isdir(os.path.join(step_dir, item)):
            raise DamagedStep(step_dir, f"{item}/ is missing")
    for name in _JSON_FILES + tuple(f"{item}/_METADATA" for item in items if item != "meta"):
        path = os.path.join(step_dir, name)
        if not storage.exists(path) and name == "_CHECKPOINT_METADATA":
            continue  # optional for orbax: only the saved time is lost
        try:
            json.loads(storage.read_bytes(path))
        except FileNotFoundError:
            raise DamagedStep(step_dir, f"{name} is missing") from None
        except (ValueError, OSError) as e:
            raise DamagedStep(step_dir, f"{name} is not valid JSON ({getattr(e, 'msg', e)})") from None


@contextlib.contextmanager
def quiet_abandoned_reads():
    """While restoring a damaged step, TensorStore reads that orbax abandons after the first failure are
    garbage-collected unawaited and Python prints each as "Exception ignored in: <coroutine ...>" (or, for one
    finishing after its event loop closed, `event_loop_closed`): those are the failure already being reported,
    so they are dropped here."""
    previous = sys.unraisablehook

    def hook(u):
        code = getattr(u.object, "cr_code", None)
        if not (code is not None and "orbax" in code.co_filename or event_loop_closed(u)):
            previous(u)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = previous


def agree(ok: bool) -> bool:
    """Whether every process found the step intact (multi-host: each reads its own shards, and they must all
    go on to the same step)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def set_aside(step_dir: str, which: str) -> str:
    """Moves a damaged step out of its manager's directory (to `checkpoints/damaged/<which>-<step>-<time>`), never
    deleting it; process 0 moves it, the others wait for that. Returns the new path."""
    root = os.path.dirname(os.path.dirname(step_dir))
    dest = os.path.join(root, DAMAGED_DIR, f"{which}-{os.path.basename(step_dir)}-{time.strftime('%Y%m%dT%H%M%S')}")
    if jax.process_index() == 0:
        storage.makedirs(os.path.dirname(dest))
        base, n = dest, 1
        while storage.exists(dest):
            dest, n = f"{base}.{n}", n + 1
        storage.rename(step_dir, dest)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"sft_jax_set_aside_{which}_{os.path.basename(step_dir)}")
    return dest
