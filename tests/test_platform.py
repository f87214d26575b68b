"""Importing sft_jax changes nothing process-wide; `sft_jax.platform.configure_cpu()` applies the XLA:CPU settings
(XNNPACK flag, glibc malloc). Each case runs in a fresh process with XLA_FLAGS and the SFT_JAX_* switches unset,
since both settings are process-wide and the test session has applied them already (conftest)."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
XNNPACK = "--xla_cpu_use_xnnpack=true"

# Imports every module under sft_jax (or the ones named in argv) and reports what changed in the process.
_IMPORT_ALL = """
import importlib, json, os, pkgutil, sys
import jax  # JAX's own import-time settings (TF_CPP_MIN_LOG_LEVEL, ...) are not sft_jax's
from absl import flags
before = dict(os.environ)
import sft_jax, sft_jax.host_malloc as host_malloc
failed, clashes = {}, []
if sys.argv[1:]:
    names = sys.argv[1:]
else:
    found = pkgutil.walk_packages(sft_jax.__path__, "sft_jax.", onerror=lambda name: failed.setdefault(name, "walk"))
    names = [m.name for m in found if m.name.rsplit(".", 1)[-1] != "__main__"]
for name in names:
    try:
        importlib.import_module(name)
    except flags.DuplicateFlagError:  # two command-line modules define the same absl flag: import it alone
        clashes.append(name)
    except Exception as e:
        failed[name] = f"{type(e).__name__}: {e}"
after = dict(os.environ)
print(json.dumps({
    "modules": names, "failed": failed, "clashes": clashes,
    "environ": {k: [before.get(k), after.get(k)] for k in sorted(before.keys() | after.keys())
                if before.get(k) != after.get(k)},
    "malloc": host_malloc.applied(), "backend_started": jax._src.xla_bridge.backends_are_initialized()}))
"""

# Calls configure_cpu twice (after starting JAX's backend with argv[1] == "late") and reports what it did.
_CONFIGURE = """
import json, os, sys, warnings
if sys.argv[1:] == ["late"]:
    import jax
    jax.devices()
from sft_jax import host_malloc, platform
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    first = platform.configure_cpu()
    second = platform.configure_cpu()
print(json.dumps({"first": first, "second": second, "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
                  "malloc": host_malloc.applied(), "warnings": [str(w.message) for w in caught]}))
"""


def _run(script: str, *args: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("SFT_JAX_")}
    env = {**clean, "JAX_PLATFORMS": "cpu", **env}
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_every_module_changes_nothing_process_wide():
    report = _run(_IMPORT_ALL)
    alone = [_run(_IMPORT_ALL, name) for name in report["clashes"]]
    assert len(report["modules"]) > 20 and "sft_jax.main" in report["modules"], report["modules"]
    assert not any(r["clashes"] for r in alone)
    for r in [report, *alone]:
        assert not r["failed"], r["failed"]
        assert r["environ"] == {}, r["environ"]  # XLA_FLAGS included: no XNNPACK flag
        assert not r["malloc"]
        assert not r["backend_started"]


def test_configure_cpu_sets_xnnpack_and_malloc_once():
    r = _run(_CONFIGURE)
    assert r["first"] == r["second"] == {"xnnpack": True, "malloc": GLIBC}, r
    assert r["XLA_FLAGS"] == XNNPACK  # appended once
    assert r["malloc"] == GLIBC
    assert r["warnings"] == []


def test_configure_cpu_keeps_an_xnnpack_setting_in_xla_flags():
    r = _run(_CONFIGURE, XLA_FLAGS="--xla_cpu_use_xnnpack=false")
    assert r["XLA_FLAGS"] == "--xla_cpu_use_xnnpack=false"
    assert r["first"]["xnnpack"] is False


def test_configure_cpu_honours_the_switches():
    r = _run(_CONFIGURE, SFT_JAX_XNNPACK="0", SFT_JAX_MALLOC="0")
    assert r["first"] == {"xnnpack": False, "malloc": False}, r
    assert r["XLA_FLAGS"] is None
    assert not r["malloc"]


def test_configure_cpu_warns_once_jax_has_started():
    r = _run(_CONFIGURE, "late")
    assert len(r["warnings"]) == 1 and "before any JAX computation" in r["warnings"][0], r["warnings"]
