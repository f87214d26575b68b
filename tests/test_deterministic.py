"""config.deterministic: XLA's deterministic-ops flag goes into XLA_FLAGS on GPU only (CPU kernels are
deterministic already), a contradicting XLA_FLAGS and a non-bool value are refused in one line."""

from __future__ import annotations

import os
import subprocess
import sys

import ml_collections
import pytest

from sft_jax import platform
from sft_jax.config_defaults import defaults, validate


def test_gpu_gets_the_flag():
    assert platform.determinism_flags(True, True, "") == "--xla_gpu_deterministic_ops=true"
    assert platform.determinism_flags(True, True, "--xla_cpu_use_xnnpack=true") == \
        "--xla_cpu_use_xnnpack=true --xla_gpu_deterministic_ops=true"


@pytest.mark.parametrize("deterministic, gpu", [(True, False), (False, True), (False, False)])
def test_nothing_changes_off_gpu_or_when_not_asked(deterministic, gpu):
    assert platform.determinism_flags(deterministic, gpu, "--a=1") == "--a=1"


def test_the_users_own_flag_stays_and_a_contradicting_one_is_refused():
    assert platform.determinism_flags(True, True, "--xla_gpu_deterministic_ops=true") == \
        "--xla_gpu_deterministic_ops=true"
    with pytest.raises(ValueError, match=r"config.deterministic=True, but XLA_FLAGS sets "
                                         r"--xla_gpu_deterministic_ops=false"):
        platform.determinism_flags(True, True, "--xla_gpu_deterministic_ops=false")


def test_configure_leaves_xla_flags_alone_on_a_started_cpu_backend(monkeypatch):
    import jax

    assert jax.default_backend() == "cpu"  # started
    monkeypatch.setenv("XLA_FLAGS", "--a=1")
    platform.configure_determinism(True)
    assert os.environ["XLA_FLAGS"] == "--a=1"


@pytest.mark.parametrize("platforms, added", [("cuda", True), ("cpu", False)])
def test_configure_sets_the_flag_before_a_gpu_backend_starts(platforms, added):
    """In a fresh process (no backend yet), as `train_and_evaluate` calls it: JAX_PLATFORMS=cuda gets the flag;
    cpu does not. Nothing starts a backend (there is no GPU here)."""
    code = ("import os; from sft_jax import platform; platform.configure_determinism(True); "
            "print(os.environ.get('XLA_FLAGS', ''))")
    env = {**os.environ, "JAX_PLATFORMS": platforms, "XLA_FLAGS": "--a=1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == (["--a=1", platform.DETERMINISTIC_FLAG] if added else ["--a=1"])


@pytest.mark.parametrize("platforms, gpu", [("cpu", False), ("cuda", True), ("cpu,cuda", True), ("tpu", False)])
def test_the_platform_is_told_from_jax_platforms(monkeypatch, platforms, gpu):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert platform._gpu_expected() is gpu


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_non_bool_is_refused(tiny_config, value):
    c = ml_collections.ConfigDict({**tiny_config.to_dict(), "deterministic": value})
    with pytest.raises(ValueError, match=rf"config.deterministic: must be True or False, got {value!r}"):
        validate(c)


def test_default_is_off():
    assert defaults().deterministic is False
