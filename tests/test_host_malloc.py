"""glibc malloc keeps XLA:CPU's freed temporaries (sft_jax.host_malloc): after warm-up a step that allocates a
64 MiB temporary takes no page faults; with SFT_JAX_MALLOC=0 (glibc's defaults) it faults the block in anew on
every call. Each case runs in a fresh process, since the settings must precede JAX's CPU backend."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt settings are glibc-only")

_SCRIPT = """
import json, resource
import sft_jax.host_malloc as hm, sft_jax.platform
sft_jax.platform.configure_cpu()
import jax, jax.numpy as jnp
a = jnp.ones((4096, 2048), jnp.float32)
# a [4096, 4096] float32 product (64 MiB) lives only inside the call: an XLA temporary
f = jax.jit(lambda a: jnp.sum(jnp.tanh(a @ a.T), axis=0))
for _ in range(3):
    f(a).block_until_ready()
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = f(a).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": hm.applied(), "faults": faults}))
"""


def _run(malloc: str) -> dict:
    env = {**os.environ, "SFT_JAX_MALLOC": malloc, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_steps_after_warmup_take_no_page_faults():
    kept = _run("1")
    assert kept["applied"]
    # 64 MiB is 16384 pages; a handful of faults (Python's own small allocations) is not the temporary
    assert max(kept["faults"]) < 1000, kept


def test_glibc_defaults_fault_the_temporary_in_every_call():
    default = _run("0")  # the behaviour keep_freed_memory exists to avoid: the test above could fail
    assert not default["applied"]
    assert min(default["faults"]) > 16384 * 0.9, default


def test_keep_freed_memory_is_idempotent():
    from sft_jax import host_malloc

    first = host_malloc.keep_freed_memory()
    assert host_malloc.keep_freed_memory() == first
