"""Damaged checkpoints and failed saves: every restore verifies what it reads (a flipped byte, a truncated array
file, emptied metadata, a missing item), a damaged step is named in one line, set aside and the newest intact
step used; damaged run files are named; a save that fails (disk full) stops the run with one line, keeps the last
good checkpoint, and the next run cleans up after it and resumes. metrics.jsonl never repeats a step."""

from __future__ import annotations

import errno
import glob
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST_COMPILE_FLAG

from sft_jax.checkpoint import Checkpoints, DamagedCheckpoint
from sft_jax.checkpoint_failures import CheckpointSaveFailed
from sft_jax.rundir import RunDir
from sft_jax.state import TrainState
from sft_jax.trainer.metrics import drop_after

REPO = pathlib.Path(__file__).resolve().parents[1]


# --- a small state, saved at steps 3 and 6 ------------------------------------------------------------------
def _state(step: int) -> TrainState:
    rng = np.random.default_rng(step)  # random bits: zstd stores them as they are, so a flip changes a value
    params = {"dense/kernel": jnp.asarray(rng.standard_normal((128, 64)), jnp.float32),
              "dense/bias": jnp.asarray(rng.standard_normal(64), jnp.float32)}
    return TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                      opt_state={"mu": jax.tree.map(lambda x: x[::-1] * 0.5 + 1, params), "count": jnp.asarray(step)},
                      rng=jnp.zeros(2, jnp.uint32))


def _saved(workdir: pathlib.Path, steps=(3, 6), best: bool = False) -> TrainState:
    ckpt = Checkpoints(str(workdir))
    for step in steps:
        ckpt.save_latest(_state(step), {"step_meta": step})
        if best:
            ckpt.save_best(_state(step), {"step_meta": step})
    ckpt.close()
    return _state(0)


def _step_dir(workdir, step, which="latest") -> pathlib.Path:
    return workdir / "checkpoints" / which / str(step)


def _array_file(workdir, step, which="latest") -> pathlib.Path:
    """The largest data file of the step's parameters: the chunk of dense/kernel."""
    files = glob.glob(str(_step_dir(workdir, step, which) / "params" / "ocdbt.process_*" / "d" / "*"))
    return pathlib.Path(max(files, key=os.path.getsize))


def _flip_byte(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])


def _restore(workdir, target):
    ckpt = Checkpoints(str(workdir))
    try:
        return ckpt.restore_latest(target), ckpt.latest.all_steps()
    finally:
        ckpt.close()


def _set_aside(workdir) -> list[str]:
    return sorted(os.listdir(workdir / "checkpoints" / "damaged")) if (workdir / "checkpoints" / "damaged").exists() \
        else []


def test_intact_checkpoint_restores_bit_identically(tmp_path):
    (state, meta), steps = _restore(tmp_path, _saved(tmp_path))
    assert int(state.step) == 6 and meta == {"step_meta": 6} and steps == [3, 6]
    np.testing.assert_array_equal(state.params["dense/kernel"], _state(6).params["dense/kernel"])
    assert _set_aside(tmp_path) == []


def test_flipped_byte_in_an_array_file_is_caught(tmp_path, capsys):
    target = _saved(tmp_path)
    _flip_byte(_array_file(tmp_path, 6))
    (state, meta), steps = _restore(tmp_path, target)
    assert int(state.step) == 3 and meta == {"step_meta": 3}  # the newest intact step
    np.testing.assert_array_equal(state.params["dense/kernel"], _state(3).params["dense/kernel"])
    assert steps == [3]  # orbax no longer lists the damaged step
    assert [d.split("-")[:2] for d in _set_aside(tmp_path)] == [["latest", "6"]]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"{_step_dir(tmp_path, 6)} is damaged" in err[0] and "dense/kernel" in err[0] and "checksum" in err[0]
    assert "using step 3" in err[0]


@pytest.mark.parametrize("damage", ["truncated array file", "deleted array file", "emptied meta",
                                    "garbled meta", "emptied _CHECKPOINT_METADATA", "emptied params/_METADATA",
                                    "missing params", "flipped optimizer state"])
def test_damaged_latest_step_falls_back_to_the_previous_one(tmp_path, capsys, damage):
    target = _saved(tmp_path)
    step_dir = _step_dir(tmp_path, 6)
    if damage == "truncated array file":
        _truncate(_array_file(tmp_path, 6))
    elif damage == "deleted array file":
        _array_file(tmp_path, 6).unlink()
    elif damage == "emptied meta":
        (step_dir / "meta" / "metadata").write_text("")
    elif damage == "garbled meta":
        (step_dir / "meta" / "metadata").write_text('{"step_meta": 6, "arr')
    elif damage == "emptied _CHECKPOINT_METADATA":
        (step_dir / "_CHECKPOINT_METADATA").write_text("")
    elif damage == "emptied params/_METADATA":
        (step_dir / "params" / "_METADATA").write_text("")
    elif damage == "missing params":
        import shutil

        shutil.rmtree(step_dir / "params")
    else:  # mu of dense/kernel is the train item's largest array
        files = glob.glob(str(step_dir / "train" / "ocdbt.process_*" / "d" / "*"))
        _flip_byte(pathlib.Path(max(files, key=os.path.getsize)))
    capsys.readouterr()
    (state, _), steps = _restore(tmp_path, target)
    assert int(state.step) == 3 and steps == [3]
    assert not step_dir.exists() and len(_set_aside(tmp_path)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{step_dir} is damaged" in err[0], err


def test_no_intact_step_is_one_error_naming_them_and_moves_nothing(tmp_path):
    target = _saved(tmp_path)
    _truncate(_array_file(tmp_path, 6))
    (_step_dir(tmp_path, 3) / "meta" / "metadata").write_text("")
    with pytest.raises(DamagedCheckpoint) as e:
        _restore(tmp_path, target)
    message = str(e.value)
    assert "\n" not in message and "no intact latest checkpoint" in message
    assert "step 6: " in message and "step 3: meta/metadata is not valid JSON" in message
    assert _step_dir(tmp_path, 6).exists() and _step_dir(tmp_path, 3).exists() and _set_aside(tmp_path) == []


def test_another_configuration_is_not_damage(tmp_path):
    """A step whose arrays are intact but shaped otherwise than this run builds stays where it is."""
    _saved(tmp_path)
    other = _state(0)
    other = other.replace(params={**other.params, "dense/bias": jnp.zeros(32)})
    with pytest.raises(ValueError, match="different configuration") as e:
        _restore(tmp_path, other)
    assert not isinstance(e.value, DamagedCheckpoint)
    assert _step_dir(tmp_path, 6).exists() and _set_aside(tmp_path) == []


def test_damaged_best_falls_back_to_latest_or_says_so(tmp_path, capsys):
    target = _saved(tmp_path, steps=(3,), best=True)
    _flip_byte(_array_file(tmp_path, 3, "best"))
    rundir = RunDir(tmp_path)
    with pytest.raises(DamagedCheckpoint, match="no intact best checkpoint"):
        rundir.restore_params(target.params, "best", fallback=False)  # predict --checkpoint=best
    capsys.readouterr()
    params = rundir.restore_params(target.params, "best")
    np.testing.assert_array_equal(params["dense/kernel"], _state(3).params["dense/kernel"])  # latest's step 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no intact best checkpoint" in err[0] and "using the latest" in err[0], err


# --- damaged run files ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", ["", '{"model": "x", "ta', "\xff\xfe", "[1, 2]"])
def test_damaged_config_json_is_named(tmp_path, content):
    (tmp_path / "config.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(ValueError) as e:
        RunDir(tmp_path).read_config()
    assert str(tmp_path / "config.json") in str(e.value) and "damaged" in str(e.value)


@pytest.mark.parametrize("content", ["", '{"labels": ["a", ', '{"labels": 3}', "{}"])
def test_damaged_labels_json_is_named(tmp_path, content):
    (tmp_path / "labels.json").write_text(content)
    with pytest.raises(ValueError) as e:
        RunDir(tmp_path).read_labels()
    assert str(tmp_path / "labels.json") in str(e.value) and "damaged" in str(e.value)


def test_metrics_lines_after_the_resumed_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "train/loss": 1.0}) for s in (1, 2, 3, 4, 2, 3)]  # 2, 3 logged again
    path.write_text("\n".join(lines) + "\n" + '{"step": 5, "train/lo')  # cut short by a kill
    assert drop_after(str(path), 2) == 4
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 2]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=f"{path}: line 2 is damaged"):
        drop_after(str(path), 1)


# --- failed saves ---------------------------------------------------------------------------------------------
def _disk_full(monkeypatch) -> None:
    """Every array write of orbax's background save fails as a full disk makes it fail."""
    from orbax.checkpoint._src.serialization import serialization

    async def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(serialization, "async_serialize_from_host", no_space)


def test_failed_background_save_is_one_line_and_keeps_the_last_good_step(tmp_path, monkeypatch):
    ckpt = Checkpoints(str(tmp_path))
    ckpt.save_latest(_state(3), {"step_meta": 3})
    ckpt.wait()
    with monkeypatch.context() as m:
        _disk_full(m)
        ckpt.save_latest(_state(6), {"step_meta": 6})  # returns: the write goes on in the background
        with pytest.raises(CheckpointSaveFailed) as e:
            for _ in range(2000):  # the loop polls once per step
                ckpt.poll()
                import time

                time.sleep(0.005)
    message = str(e.value)
    assert "\n" not in message
    assert f"saving the latest checkpoint of step 6 to {_step_dir(tmp_path, 6)} failed: No space left on device" \
        in message and "the last good checkpoint is step 3" in message
    with pytest.raises(CheckpointSaveFailed):  # and it stays failed: no later save pretends otherwise
        ckpt.save_latest(_state(9), {})
    ckpt.close()
    leftovers = glob.glob(str(tmp_path / "checkpoints" / "latest" / "6.orbax-checkpoint-tmp*"))
    assert leftovers
    (state, meta), steps = _restore(tmp_path, _state(0))  # nothing lost
    assert int(state.step) == 3 and steps == [3]

    ckpt = Checkpoints(str(tmp_path), clean_unfinished=True)  # the next training run
    ckpt.save_latest(_state(6), {"step_meta": 6})
    ckpt.close()
    assert not any(os.path.exists(p) for p in leftovers)
    assert _restore(tmp_path, _state(0))[1] == [3, 6]


# --- through the command line ---------------------------------------------------------------------------------
STEPS, EVERY = 12, 4


@pytest.fixture(scope="module")
def cli_config(make_tiny_config, tmp_path_factory) -> pathlib.Path:
    tmp = tmp_path_factory.mktemp("cli")
    c = make_tiny_config(tmp)
    c.max_steps, c.eval_every, c.checkpoint_every, c.log_every = STEPS, EVERY, EVERY, 1
    path = tmp / "tiny_config.py"
    path.write_text("import ml_collections\n\n\ndef get_config(arg=None):\n"
                    f"    return ml_collections.ConfigDict({c.to_dict()!r})\n")
    return path


def _env() -> dict:
    return {**os.environ, "XLA_FLAGS": FAST_COMPILE_FLAG}  # one CPU device in the subprocesses


def _argv(config, workdir) -> list[str]:
    return [f"--config={config}", f"--workdir={workdir}"]


def _cli(config, workdir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sft_jax.main", *_argv(config, workdir)], cwd=REPO, env=_env(),
                          capture_output=True, text=True)


def _cli_patched(config, workdir, patch: str) -> subprocess.CompletedProcess:
    """The command line with `patch` (Python, run first) changing Checkpoints.save_latest."""
    script = ("import os, sys\nfrom sft_jax.checkpoint import Checkpoints\nsave = Checkpoints.save_latest\n" + patch +
              "from sft_jax.main import run\n"
              f"sys.argv = ['sft_jax.main', *{_argv(config, workdir)!r}]\nrun()\n")
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(), capture_output=True, text=True)


def _logged_steps(workdir) -> list[int]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if '"train/loss"' in line]


@pytest.fixture(scope="module")
def reference(cli_config, tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("ref") / "run"
    proc = _cli(cli_config, workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((workdir / "results.json").read_text())


def test_cli_resumes_from_the_step_before_a_damaged_one(cli_config, reference, tmp_path):
    """Killed after step 8's save completed; step 8's array file is then truncated. The same command names the
    damaged step in one line, resumes from step 4 and ends where an uninterrupted run ends."""
    workdir = tmp_path / "run"
    proc = _cli_patched(cli_config, workdir, (
        "def save_then_die(self, state, meta):\n"
        "    save(self, state, meta)\n"
        f"    if int(state.step) == {2 * EVERY}:\n"
        "        self.wait()\n"
        "        os._exit(137)\n"
        "Checkpoints.save_latest = save_then_die\n"))
    assert proc.returncode == 137, proc.stderr[-3000:]
    _truncate(_array_file(workdir, 2 * EVERY))

    proc = _cli(cli_config, workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    damaged = [line for line in (proc.stdout + proc.stderr).splitlines() if "damaged" in line]
    assert len(damaged) == 1 and str(_step_dir(workdir, 2 * EVERY)) in damaged[0], damaged
    assert f"using step {EVERY}" in damaged[0] and "Traceback" not in proc.stderr
    assert [d.split("-")[:2] for d in _set_aside(workdir)] == [["latest", str(2 * EVERY)]]
    resumed = json.loads((workdir / "results.json").read_text())
    assert resumed["params_fingerprint"] == reference["params_fingerprint"]
    assert _logged_steps(workdir) == list(range(1, STEPS + 1))  # steps 5-8 logged once, not twice


def test_cli_with_no_intact_checkpoint_is_one_line(cli_config, tmp_path):
    workdir = tmp_path / "run"
    proc = _cli_patched(cli_config, workdir, (
        "def save_then_die(self, state, meta):\n"
        "    save(self, state, meta)\n"
        f"    if int(state.step) == {EVERY}:\n"
        "        self.wait()\n"
        "        os._exit(137)\n"
        "Checkpoints.save_latest = save_then_die\n"))
    assert proc.returncode == 137, proc.stderr[-3000:]
    _flip_byte(_array_file(workdir, EVERY))
    proc = _cli(cli_config, workdir)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no intact latest checkpoint in ") and f"step {EVERY}: " in last
    assert _step_dir(workdir, EVERY).exists()


def test_cli_disk_full_stops_the_run_and_the_next_run_resumes(cli_config, reference, tmp_path):
    """At step 8's save every file the process writes is limited to 64 kB (RLIMIT_FSIZE: writes beyond it fail
    with EFBIG, as on a full disk with ENOSPC): the run stops with one line, step 4 stays the latest, and the same
    command, with room again, removes the unfinished save and ends where an uninterrupted run ends."""
    workdir = tmp_path / "run"
    proc = _cli_patched(cli_config, workdir, (
        "import resource, signal\n"
        "def save_on_a_full_disk(self, state, meta):\n"
        f"    if int(state.step) == {2 * EVERY}:\n"
        "        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))\n"
        "    save(self, state, meta)\n"
        "Checkpoints.save_latest = save_on_a_full_disk\n"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"error: saving the latest checkpoint of step {2 * EVERY} to {_step_dir(workdir, 2 * EVERY)} "
                    f"failed: File too large; the last good checkpoint is step {EVERY} (the same command resumes "
                    "from it once the cause is fixed)"), last
    # The failure surfaces when the background save ends (a step or more later under load); the run never
    # reports success.
    assert not (workdir / "results.json").exists()
    assert glob.glob(str(workdir / "checkpoints" / "latest" / "*.orbax-checkpoint-tmp*"))
    assert not (workdir / "results.json").exists()

    proc = _cli(cli_config, workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not glob.glob(str(workdir / "checkpoints" / "*" / "*.orbax-checkpoint-tmp*"))
    resumed = json.loads((workdir / "results.json").read_text())
    assert resumed["params_fingerprint"] == reference["params_fingerprint"]
    assert _logged_steps(workdir) == list(range(1, STEPS + 1))

