"""Multi-host runs on JAX's own runtime: `jax.distributed.initialize` from the config or the environment.

Every process runs the same command; after `initialize`, `jax.devices()` lists the devices of all processes
and the mesh spans them. Each process puts only its rows of every global batch on its devices
(`sharding.put_batch`), all processes write their shards of each checkpoint (orbax), and process 0 alone
writes results.json, metrics and TensorBoard events.
"""

from __future__ import annotations

import os

import jax
import ml_collections


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
    jax.distributed.initialize(coordinator_address=d.coordinator_address or None,
                               num_processes=d.num_processes or None,
                               process_id=d.process_id if d.process_id >= 0 else None,
                               initialization_timeout=d.timeout_s)


def is_primary() -> bool:
    """Process 0 writes the files every run has once (results, metrics, config)."""
    return jax.process_index() == 0
