"""Multi-host on JAX's own runtime: 2 processes on localhost (2 CPU devices each, gloo collectives) run the
CLI with `--config.distributed.*` and train exactly like 1 process with the same 4 devices; the checkpoint
they write together restores in a single process with a different mesh."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from conftest import FAST_COMPILE_FLAG

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 3
# FSDP over all 4 devices: each process holds half of every sharded parameter, so neither could write the
# checkpoint alone, and each process puts only its 4 of the 8 rows of a batch on its devices.
MESH = {"data": 1, "fsdp": 4, "tensor": 1}

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (simulated) devices; see conftest.py")


def _config_file(c, tmp: pathlib.Path) -> pathlib.Path:
    config_file = tmp / "config.py"
    config_file.write_text("import ml_collections\n\n\ndef get_config(arg=None):\n"
                           f"    return ml_collections.ConfigDict({c.to_dict()!r})\n")
    return config_file


def _start_two(config_file: pathlib.Path, workdir: pathlib.Path, timeout_s: int,
               logs: pathlib.Path | None = None) -> list[subprocess.Popen]:
    """Processes 0 and 1 of a 2-process run of the CLI (2 CPU devices each), output captured (in
    `logs/process{i}.txt` if given, else pipes)."""
    return _two_processes(
        ["-m", "sft_jax.main", f"--config={config_file}", f"--workdir={workdir}"],
        lambda port, pid: [f"--config.distributed.coordinator_address=localhost:{port}",
                           "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}",
                           f"--config.distributed.timeout_s={timeout_s}"], logs)


def _two_processes(args: list[str], distributed_args, logs: pathlib.Path | None = None) -> list[subprocess.Popen]:
    """Processes 0 and 1 of `python ARGS` (2 CPU devices each) joined by `distributed_args(port, process_id)`."""
    # PYTHONFAULTHANDLER: a process stopped with SIGABRT below prints every thread's Python stack first.
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {FAST_COMPILE_FLAG}",
           "JAX_PLATFORMS": "cpu",
           "PYTHONFAULTHANDLER": "1"}
    port = _free_port()
    return [subprocess.Popen(
        [sys.executable, *args, *distributed_args(port, pid)],
        cwd=REPO, env=env, stdout=open(logs / f"process{pid}.txt", "w") if logs else subprocess.PIPE,  # noqa: SIM115
        stderr=subprocess.STDOUT, text=True) for pid in range(2)]


def _succeeded(procs: list[subprocess.Popen], timeout_s: int = 240) -> list[str]:
    """The processes' outputs once each has ended with status 0. A hang (stop 19: best and latest saves of one
    step shared orbax barrier names; checkpoint._options) fails with where each process stood: those still
    running after `timeout_s` get SIGABRT, which makes them print every thread's Python stack first."""
    try:
        outputs = [p.communicate(timeout=timeout_s)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGABRT)
        stuck = [p.communicate(timeout=60)[0] for p in procs]
        pytest.fail("the 2-process run hung; each process's last output:\n"
                    + "\n".join(f"--- process {i} ---\n{out[-6000:]}" for i, out in enumerate(stuck)))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _lines(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _losses(workdir: pathlib.Path) -> list[float]:
    return [row["train/loss"] for row in _lines(workdir) if "train/loss" in row]


@pytest.fixture(scope="module")
def runs(make_tiny_config, tmp_path_factory):
    """The same 3-step run by 2 processes x 2 devices (CLI) and by this process on 4 of its 8 devices."""
    tmp = tmp_path_factory.mktemp("multihost")
    return _two_and_one(make_tiny_config(tmp), tmp)


def _two_and_one(c, tmp: pathlib.Path):
    """(config, 1-process workdir, its results, 2-process workdir, its results) of `c` run for STEPS steps."""
    from sft_jax.train import train_and_evaluate

    c.max_steps, c.eval_every, c.checkpoint_every, c.log_every = STEPS, STEPS, STEPS, 1
    c.mesh = MESH
    config_file = _config_file(c, tmp)
    two = tmp / "two_processes"
    procs = _start_two(config_file, two, timeout_s=60)
    one = tmp / "one_process"
    try:
        one_results = train_and_evaluate(c, str(one))  # meanwhile: the reference, in this process
    finally:
        _succeeded(procs)
    return c, one, one_results, two, json.loads((two / "results.json").read_text())


def test_two_processes_train_like_one(runs):
    """Same losses at every step (tolerance 1e-5 relative: the same float32 sums, reduced across processes by
    gloo instead of within one), same final evaluation; process 0 alone wrote metrics and results."""
    _, one, one_results, two, two_results = runs
    reference = _losses(one)
    assert len(reference) == STEPS and len(set(reference)) == STEPS  # it trained
    np.testing.assert_allclose(_losses(two), reference, rtol=1e-5)
    for key in ("eval/accuracy", "eval/loss", "step", "trainable_params"):
        np.testing.assert_allclose(two_results[key], one_results[key], rtol=1e-5, err_msg=key)
    assert [row["step"] for row in _lines(two) if "train/loss" in row] == [1, 2, 3]  # one writer, not two
    assert len(list(two.glob("events.out.tfevents*"))) == 1
    assert two_results["total_params"] == one_results["total_params"]


@pytest.fixture(scope="module")
def decoder_runs(tiny_llama_dir, tmp_path_factory):
    """A decoder's 3-step full fine-tuning by 2 processes x 2 devices (CLI) and by this process."""
    from conftest import lm_config

    tmp = tmp_path_factory.mktemp("multihost_decoder")
    c = lm_config(tiny_llama_dir, tmp, "full")
    c.batch_size = c.eval_batch_size = 8
    return _two_and_one(c, tmp)


def test_two_processes_stream_a_decoder_and_train_like_one(decoder_runs):
    """A safetensors decoder streamed onto the 2-process mesh (each process reading its own devices' slices,
    `models/loading/stream.py`) trains as in one process."""
    _, one, one_results, two, two_results = decoder_runs
    reference = _losses(one)
    assert len(reference) == STEPS and len(set(reference)) == STEPS
    np.testing.assert_allclose(_losses(two), reference, rtol=1e-5)
    np.testing.assert_allclose(two_results["eval/loss"], one_results["eval/loss"], rtol=1e-5)


def test_two_processes_export_a_decoder_from_their_shards(decoder_runs, tmp_path):
    """`python -m sft_jax.export --format=hf` on 2 processes: each writes its own shards of the weights (neither
    all of them), into the file one process writes with this process's 8 devices, byte for byte."""
    from sft_jax.export import export

    two = decoder_runs[3]
    procs = _two_processes(["-m", "sft_jax.export", f"--workdir={two}", "--format=hf", f"--out={tmp_path / 'two'}"],
                           lambda port, pid: [f"--coordinator_address=localhost:{port}", "--num_processes=2",
                                              f"--process_id={pid}", "--distributed_timeout_s=60"])
    try:
        export(str(two), "hf", tmp_path / "one")  # meanwhile: the reference, in this process
    finally:
        outputs = _succeeded(procs)
    weights = (tmp_path / "two" / "model.safetensors").read_bytes()
    assert weights == (tmp_path / "one" / "model.safetensors").read_bytes()
    data = len(weights) - 8 - int.from_bytes(weights[:8], "little")
    written = [int(re.search(r"process \d of 2: wrote (\d+) bytes", out).group(1)) for out in outputs]
    assert sum(written) == data and all(0 < w < data for w in written), (written, data)
    for name in ("config.json", "README.md", "tokenizer.json"):
        assert (tmp_path / "two" / name).is_file(), name
    assert not list((tmp_path / "two").glob("*.partial"))


def test_checkpoint_of_two_processes_restores_in_one(runs, tmp_path):
    """Rerunning the finished 2-process workdir here, on one device, restores its sharded checkpoint (params,
    optimizer state, step) bit for bit: the same parameter fingerprint and the same final evaluation."""
    from sft_jax.train import train_and_evaluate

    c, _, _, two, two_results = runs
    c.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    shutil.copytree(two, tmp_path / "two")
    results = train_and_evaluate(c, str(tmp_path / "two"))
    assert results["step"] == STEPS
    assert results["params_fingerprint"] == two_results["params_fingerprint"]
    np.testing.assert_allclose(results["eval/loss"], two_results["eval/loss"], rtol=1e-5)


def test_best_and_latest_barriers_are_distinct(tmp_path):
    """`best` and `latest` save the same step at once in background threads; on several processes their orbax
    barriers must not share a name (they did, `async_write_complete.<step>`, and a 2-process run hung)."""
    from orbax.checkpoint._src.multihost import multihost

    from sft_jax.checkpoint import Checkpoints

    ckpt = Checkpoints(str(tmp_path))
    try:
        keys = {multihost.unique_barrier_key("async_write_complete", suffix="3",
                                             prefix=m._multiprocessing_options.barrier_sync_key_prefix)
                for m in (ckpt.latest, ckpt.best)}
    finally:
        ckpt.close()
    assert len(keys) == 2, keys


DEAD_PEER_TIMEOUT_S = 15


def test_a_killed_process_ends_the_other_and_both_resume(runs, tmp_path):
    """Process 1 is SIGKILLed mid-run (its first checkpoint committed, the run not finished): process 0 stops
    within 2 x config.distributed.timeout_s, exit status 1, with one line naming process 1; latest/ holds only
    steps both processes wrote completely (orbax commits a step only once all have written their shards); the
    same two commands then resume and end with the uninterrupted 2-process run's parameters, bit for bit."""
    c, *_, reference = runs
    c = ml_collections.ConfigDict(c.to_dict())
    c.mesh, c.checkpoint_every = MESH, 1  # a committed step to resume from; the arithmetic is the reference's
    config_file, work = _config_file(c, tmp_path), tmp_path / "work"
    latest = work / "checkpoints" / "latest"
    procs = _start_two(config_file, work, DEAD_PEER_TIMEOUT_S, logs=tmp_path)
    try:
        deadline = time.monotonic() + 240
        while not (latest / "1" / "_CHECKPOINT_METADATA").exists():  # step 1 committed
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                (tmp_path / "process0.txt").read_text()[-3000:]
            time.sleep(0.05)
        procs[1].kill()
        killed = time.monotonic()
        procs[0].wait(timeout=2 * DEAD_PEER_TIMEOUT_S)
        took = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    out = (tmp_path / "process0.txt").read_text()
    assert procs[0].returncode == 1, out[-3000:]
    errors = re.findall(r"error: .*", out)
    assert len(errors) == 1 and "process 1 of 2" in errors[0] and "Traceback" not in out, out[-3000:]
    assert took < 2 * DEAD_PEER_TIMEOUT_S
    steps = [d for d in latest.iterdir() if d.name.isdigit()]
    assert steps and int(max(steps, key=lambda d: int(d.name)).name) < STEPS
    for step in steps:  # each committed step has both processes' shards of the sharded items
        for item in ("params", "train"):
            assert {d.name for d in (step / item).glob("ocdbt.process_*")} == {"ocdbt.process_0", "ocdbt.process_1"}

    _succeeded(_start_two(config_file, work, DEAD_PEER_TIMEOUT_S))
    results = json.loads((work / "results.json").read_text())
    assert results["step"] == STEPS
    assert results["params_fingerprint"] == reference["params_fingerprint"]
