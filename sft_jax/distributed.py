"""Multi-host runs on JAX's own runtime: `jax.distributed.initialize` from the config or the environment.

Every process runs the same command; after `initialize`, `jax.devices()` lists the devices of all processes
and the mesh spans them. Each process puts only its rows of every global batch on its devices
(`sharding.put_batch`), all processes write their shards of each checkpoint (orbax), and process 0 alone
writes results.json, metrics and TensorBoard events.
"""

from __future__ import annotations

import math
import os
import threading
import traceback

import jax
import ml_collections

from sft_jax.peer_watch import PeerWatch

_watch: PeerWatch | None = None  # this process's, in a multi-process run


def wanted(config: ml_collections.ConfigDict) -> bool:
    """Whether the config (or, with `distributed.auto`, the environment) asks for a multi-process run."""
    d = config.distributed
    return bool(d.coordinator_address) or d.auto or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def initialize(config: ml_collections.ConfigDict) -> None:
    """Joins the processes of a multi-host run (once per process; a no-op for a single-process run).

    Unset keys (empty address, num_processes 0, process_id -1) come from the environment: JAX reads
    JAX_COORDINATOR_ADDRESS and detects SLURM, Open MPI and Cloud TPU pods by itself."""
    if not wanted(config) or jax.distributed.is_initialized():
        return
    d = config.distributed
    # CPU processes exchange collectives over gloo (the default today; explicit so a changed default or a
    # user's XLA setting cannot leave CPU runs without cross-process collectives). Ignored on GPU / TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX's heartbeat and shutdown-barrier timeouts are the backstop behind the peer watch (`peer_watch`), far
    # enough behind (3 x timeout_s) that the watch's one line comes first even on a loaded machine.
    backstop = math.ceil(3 * d.timeout_s)
    jax.distributed.initialize(coordinator_address=d.coordinator_address or None,
                               num_processes=d.num_processes or None,
                               process_id=d.process_id if d.process_id >= 0 else None,
                               initialization_timeout=d.timeout_s,
                               heartbeat_timeout_seconds=backstop, shutdown_timeout_seconds=backstop)
    if jax.process_count() > 1:
        global _watch
        from jax._src import distributed as jax_distributed  # the client orbax's barriers use too

        _watch = PeerWatch(lambda: jax_distributed.global_state.client, jax.process_index(), jax.process_count(),
                           d.timeout_s).start()


def set_phase(phase: str) -> None:
    """What this process is doing, for the line that reports a dead peer ("train step 7", "saving step 5")."""
    if _watch is not None:
        _watch.phase = phase


def end_after_error(message: str) -> None:
    """In a multi-process run: prints `message`, tells the other processes (they stop at once instead of after
    the timeout) and ends this one with status 1. `os._exit`, not `sys.exit`: JAX's exit handler waits at a
    shutdown barrier for every process, which one that stopped on an error, or died, never reaches; after the
    timeout it aborts with a C++ stack trace. Process 0 waits for the others to end first (`PeerWatch.end`).
    A single-process run: returns, the caller exits."""
    if _watch is None:
        return
    _watch.announce_failure(message)
    _watch.end(message)


def end_after_exception(e: BaseException) -> None:
    """In a multi-process run, for an exception the run did not expect (a collective failed, most likely because
    a peer died: gloo reports a reset connection at once): waits up to the timeout for the peer watch to name
    the process that died (it then ends this one with that line); else prints the traceback and ends like
    `end_after_error`. A single-process run: returns, the caller re-raises."""
    if _watch is None:
        return
    _watch.note = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    if _watch.wait_for_verdict(_watch.timeout_s + 2 * _watch.interval):
        threading.Event().wait()  # the watch's thread is ending the process
    traceback.print_exception(e)
    end_after_error(f"error: process {_watch.process_id} stopped at {_watch.phase}: {_watch.note}")



def is_primary() -> bool:
    """Process 0 writes the files every run has once (results, metrics, config)."""
    return jax.process_index() == 0
