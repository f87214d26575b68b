"""Training throughput in the logs: each train line's train/tokens_per_s and train/mfu are those of the steps
since the previous line (the compiling first step and evaluations left out), MFU's FLOPs are the planner's model
FLOPs of each step's batch shape, its peak comes from the config, the device table or a measured (and cached)
CPU matmul; config.profile_steps writes a profiler trace of the chosen steps."""

from __future__ import annotations

import json
import pathlib
import types

import pytest

from sft_jax import strategies, tasks
from sft_jax.config_defaults import validate
from sft_jax.flops import FlopsModel, step_flops
from sft_jax.rundir import RunDir
from sft_jax.train import train_and_evaluate
from sft_jax.trainer import throughput


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_windows_count_the_steps_since_the_last_report_without_evaluations():
    clock = Clock()
    speed = throughput.Throughput(peak_flops=1e6, clock=clock)
    speed.add(tokens=100, flops=3e6)
    speed.add(tokens=300, flops=5e6)
    clock.now += 10.0
    speed.exclude(6.0)  # an evaluation inside the window
    assert speed.report() == {"train/tokens_per_s": 100.0, "train/mfu": 2.0}  # 400 tokens, 8e6 FLOPs in 4 s
    clock.now += 2.0
    speed.add(tokens=50, flops=1e6)
    assert speed.report() == {"train/tokens_per_s": 25.0, "train/mfu": 0.5}  # only the new window
    speed.add(tokens=0, flops=1e6)  # images: no tokens
    clock.now += 1.0
    assert speed.report() == {"train/mfu": 1.0}
    speed = throughput.Throughput(peak_flops=None, clock=clock)  # a device of unknown peak
    speed.add(tokens=10, flops=1e6)
    clock.now += 1.0
    assert speed.report() == {"train/tokens_per_s": 10.0}


def _device(platform, kind):
    return types.SimpleNamespace(platform=platform, device_kind=kind)


def test_peak_from_the_config_the_device_table_or_a_cached_cpu_measurement(tmp_path, monkeypatch):
    h100 = [_device("gpu", "NVIDIA H100 80GB HBM3")] * 4
    assert throughput.total_peak_flops("bfloat16", 0.0, h100) == 4 * 989e12
    assert throughput.total_peak_flops("float32", 0.0, h100) == 4 * 495e12  # TF32, JAX's default precision
    assert throughput.total_peak_flops("bfloat16", 0.0, [_device("gpu", "NVIDIA H100 PCIe")]) == 756e12
    assert throughput.total_peak_flops("bfloat16", 0.0, [_device("tpu", "TPU v5 lite")] * 8) == 8 * 197e12
    assert throughput.total_peak_flops("bfloat16", 0.0, [_device("gpu", "Unknown GPU")]) is None
    assert throughput.total_peak_flops("bfloat16", 2e12, h100) == 8e12  # the config's per-device figure wins

    monkeypatch.setenv("SFT_JAX_CACHE", str(tmp_path))
    calls = []

    def measure(dtype, compiler_options=None):
        calls.append((dtype, compiler_options))
        return 123e9

    cpu = [_device("cpu", "cpu")] * 8  # simulated devices of one host share its cores: the host's peak
    assert throughput.total_peak_flops("float32", 0.0, cpu, measure=measure) == 123e9
    assert throughput.total_peak_flops("float32", 0.0, cpu, measure=measure) == 123e9
    assert calls == [("float32", None)]  # measured once per CPU model, threads, dtype and library
    throughput.total_peak_flops("bfloat16", 0.0, cpu, compiler_options={"x": "1"}, measure=measure)
    assert calls[1:] == [("bfloat16", {"x": "1"})]
    (tmp_path / "peak_flops.json").write_text("{not json")  # a damaged cache: measured again, rewritten
    assert throughput.total_peak_flops("float32", 0.0, cpu, measure=measure) == 123e9
    assert len(calls) == 3 and len(json.loads((tmp_path / "peak_flops.json").read_text())) == 1


def test_matmul_peak_is_a_positive_rate():
    assert throughput.matmul_peak("float32", n=128, repeats=2) > 1e6


def test_flops_model_counts_as_the_planner_does():
    shapes = {"embed/embedding": (100, 8), "layers/0/mlp/up/kernel": (8, 32), "layers/0/mlp/down/kernel": (32, 8),
              "head/kernel": (8, 2)}
    model = FlopsModel(shapes, ("head/kernel",), {"layers": 1, "width": 8, "causal": False})
    expected = step_flops(shapes, ("head/kernel",), model.attn, 16, 4 * 16)
    assert model.per_step(4, 16) == model.per_step(4, 16) == expected
    assert model.per_step(4, 32) > expected


@pytest.fixture(scope="module")
def profiled_run(make_tiny_config, tmp_path_factory):
    """A 5-step tiny run, a line per step, with a stated device peak and a trace of steps 2-3."""
    tmp = tmp_path_factory.mktemp("throughput")
    config = make_tiny_config(tmp)
    config.max_steps, config.eval_every, config.checkpoint_every = 5, 3, 5
    config.logging.peak_flops = 1e9
    config.profile_steps = (2, 3)
    workdir = tmp / "run"
    train_and_evaluate(config, str(workdir))
    return config, workdir


def test_each_train_line_has_the_tokens_per_s_and_mfu_of_its_own_steps(profiled_run, tmp_path):
    config, workdir = profiled_run
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = {m["step"]: m for m in lines if "train/loss" in m}
    assert sorted(train) == [1, 2, 3, 4, 5]
    assert "train/tokens_per_s" not in train[1] and "train/mfu" not in train[1]  # the step that compiled
    # The same task, data and strategy: each later line's window is its one step, so MFU x peak / tokens per
    # second is that step's model FLOPs per real token.
    (tmp_path / "fresh").mkdir()
    task = tasks.get(config.task)(config, RunDir(str(tmp_path / "fresh")))
    labels = strategies.label_params(task.model_def.names,
                                     strategies.strategy_rules(config.strategy, task.layout, config.frozen_layers))
    flops_model = task.flops_model(tuple(strategies.trainable_names(labels)))
    for step in (2, 3, 4, 5):
        batch = task.batches.batch(step - 1)
        per_token = flops_model.per_step(*task.flops_shape(batch)) / task.batch_tokens(batch)
        line = train[step]
        assert line["train/tokens_per_s"] > 0
        assert line["train/mfu"] * 1e9 / line["train/tokens_per_s"] == pytest.approx(per_token, rel=1e-9)


def test_profile_steps_write_a_trace(profiled_run):
    _, workdir = profiled_run
    for pattern in ("*.xplane.pb", "perfetto_trace.json.gz"):  # TensorBoard's and Perfetto's
        traces = list(pathlib.Path(workdir, "profile").rglob(pattern))
        assert len(traces) == 1 and traces[0].stat().st_size > 0


@pytest.mark.parametrize("key, value, message", [
    ("profile_steps", (3, 2), r"config.profile_steps: expected \(\) or \(first, last\)"),
    ("profile_steps", (0, 2), r"config.profile_steps"),
    ("profile_steps", (1, 2, 3), r"config.profile_steps"),
    ("logging.peak_flops", -1.0, r"config.logging.peak_flops: must be >= 0"),
])
def test_bad_throughput_options_are_one_line(tiny_config, key, value, message):
    section, _, name = key.rpartition(".")
    (tiny_config[section] if section else tiny_config)[name] = value
    with pytest.raises(ValueError, match=message):
        validate(tiny_config)
