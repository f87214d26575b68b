"""What a command prints for a failed background save: orbax's log records, and asyncio's records of the save's
other writes left unawaited after the first one failed, are dropped (the command prints the failure as one line);
anyone else's records are kept. (The run stopping on a full disk, end to end: tests/test_damaged_checkpoints.py.)"""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from sft_jax.checkpoint_failures import quiet_orbax_errors


def _unretrieved_failure(filename: str) -> None:
    """Fails a gathered write defined in `filename` and drops its future unawaited, as orbax's failed save does
    with the writes after the first; asyncio logs it when the future is collected."""
    scope = {}
    exec(compile("async def write():\n    raise OSError(27, 'File too large')\n", filename, "exec"), scope)
    futures = []

    async def save():
        futures.append(asyncio.gather(scope["write"](), scope["write"]()))
        await asyncio.sleep(0.01)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(save())
        assert futures[0].done()
        futures.clear()
        gc.collect()
    finally:
        loop.close()


@pytest.mark.parametrize("filename, kept", [("/site-packages/orbax/checkpoint/_src/fake.py", False),
                                            ("/home/user/my_writer.py", True)])
def test_unretrieved_write_failures_of_orbax_are_dropped_and_others_kept(filename, kept, caplog):
    quiet_orbax_errors()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        _unretrieved_failure(filename)
    records = [r for r in caplog.records if "exception was never retrieved" in r.getMessage()]
    assert len(records) == (1 if kept else 0), [r.getMessage() for r in caplog.records]
