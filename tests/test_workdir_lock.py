"""One run per workdir (`sft_jax.workdir_lock`, `sft_jax.workdir_claim`): a second run stops with one line naming
the holder; the lock is released on every exit and a dead holder's is taken over; of runs started at once exactly
one wins; a run failing in set-up leaves nothing that stops the corrected command."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from sft_jax.workdir_lock import LOCK_FILE, WorkdirLock, WorkdirLocked

REPO = pathlib.Path(__file__).resolve().parents[1]
HOLDER = re.compile(r"is in use by another run \(host \S+, pid (\d+), started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def _env() -> dict:
    return {**os.environ, "XLA_FLAGS": ""}  # one CPU device in the subprocesses


@pytest.fixture(scope="module")
def cli_config(make_tiny_config, tmp_path_factory) -> pathlib.Path:
    tmp = tmp_path_factory.mktemp("cli")
    c = make_tiny_config(tmp)
    path = tmp / "tiny_config.py"
    path.write_text("import ml_collections\n\n\ndef get_config(arg=None):\n"
                    f"    return ml_collections.ConfigDict({c.to_dict()!r})\n")
    return path


def _cmd(config: pathlib.Path, workdir: pathlib.Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sft_jax.main", f"--config={config}", f"--workdir={workdir}", *extra]


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_lock_names_its_holder_and_is_free_after_release(tmp_path):
    first, second = WorkdirLock(tmp_path), WorkdirLock(tmp_path)
    assert first.acquire() is None
    with pytest.raises(WorkdirLocked) as e:
        second.acquire()  # another open file description: refused even within one process
    assert int(HOLDER.search(str(e.value)).group(1)) == os.getpid()
    first.release()
    assert first.holder() is None  # a clean release leaves no record that reads as a dead holder
    assert second.acquire() is None
    second.release()


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path, capsys):
    script = ("import sys, time\nfrom sft_jax.workdir_lock import WorkdirLock\n"
              f"WorkdirLock({str(tmp_path)!r}).acquire()\nprint('held', flush=True)\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirLocked, match=f"pid {proc.pid},"):
            WorkdirLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()
    lock = WorkdirLock(tmp_path)
    previous = lock.acquire()
    assert previous["pid"] == proc.pid
    assert f"taking over the lock of a run that ended without releasing it (host {previous['host']}, " \
           f"pid {proc.pid}," in capsys.readouterr().err
    lock.release()


def test_of_runs_claiming_at_the_same_instant_exactly_one_wins(tmp_path):
    """Three processes claim one fresh workdir at the same moment: one holds it, the others stop naming it and
    leave nothing in it (the winner, which never trained, leaves only the released lock file)."""
    workdir, go = tmp_path / "run", tmp_path / "go"
    script = ("import os, sys, time\nfrom sft_jax.rundir import RunDir\n"
              "from sft_jax.workdir_lock import WorkdirLocked\n"
              "print('ready', flush=True)\n"
              f"while not os.path.exists({str(go)!r}):\n    time.sleep(0.001)\n"
              "try:\n"
              f"    with RunDir({str(workdir)!r}).claim():\n"
              "        print('won', flush=True)\n        time.sleep(3)\n"
              "except WorkdirLocked as e:\n    print(e, flush=True)\n")
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    try:
        for p in procs:  # all have imported sft_jax and wait for the same instant
            assert p.stdout.readline().strip() == "ready", p.communicate(timeout=120)[1][-2000:]
    finally:
        go.touch()  # on a failure too: no process is left waiting
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    lines = [out.strip() for out, _ in outs]
    winner = [p.pid for p, line in zip(procs, lines) if line == "won"]
    assert len(winner) == 1, lines
    refused = [line for line in lines if line != "won"]
    assert all(int(HOLDER.search(line).group(1)) == winner[0] for line in refused), lines
    assert os.listdir(workdir) == [LOCK_FILE] and WorkdirLock(workdir).holder() is None


def test_second_run_on_a_workdir_stops_with_one_line_naming_the_holder(cli_config, tmp_path):
    """Through the command line: run B started while run A trains exits 1 with one line naming A's host, pid and
    start time, and changes nothing; A, stopped by SIGTERM, saves, exits 0 and releases the lock."""
    workdir = tmp_path / "run"
    long = ("--config.max_steps=1000000", "--config.eval_every=1000000", "--config.checkpoint_every=1000000")
    a = subprocess.Popen(_cmd(cli_config, workdir, *long), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not (workdir / "config.json").exists():  # A has trained a step
            assert a.poll() is None, a.stderr.read().decode()[-2000:]
            assert time.time() < deadline
            time.sleep(0.05)
        files = sorted(os.listdir(workdir))
        b = subprocess.run(_cmd(cli_config, workdir, "--config.learning_rate=0.5"), cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=300)
        assert b.returncode == 1
        errors = _errors(b.stderr)
        assert len(errors) == 1 and "Traceback" not in b.stderr, b.stderr[-2000:]
        assert errors[0].startswith(f"error: {workdir} is in use by another run")
        assert int(HOLDER.search(errors[0]).group(1)) == a.pid
        assert sorted(os.listdir(workdir)) == files and a.poll() is None
        assert json.loads((workdir / "config.json").read_text())["learning_rate"] != 0.5
    finally:
        a.send_signal(signal.SIGTERM)
        out, err = a.communicate(timeout=120)
    assert a.returncode == 0 and b"stopped by SIGTERM" in out, err.decode()[-2000:]
    assert WorkdirLock(workdir).holder() is None  # released, not left for a take-over


def _failing_first_step(monkeypatch, error: BaseException):
    """The first train step fails as compiling an oversized one does (after data, model and set-up)."""
    from sft_jax.trainer import setup

    def make(*args, **kwargs):
        def step(state, batch):
            raise error

        return step

    monkeypatch.setattr(setup, "make_train_step", make)


def test_a_run_failing_in_setup_leaves_nothing_behind(tiny_config, tmp_path, monkeypatch):
    """A workdir the failing run created is removed (with the parents it created); in a workdir that existed,
    only the released lock file stays. Also on KeyboardInterrupt."""
    from sft_jax.train import train_and_evaluate

    _failing_first_step(monkeypatch, RuntimeError("RESOURCE_EXHAUSTED: out of memory while compiling"))
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        train_and_evaluate(tiny_config, str(tmp_path / "new" / "run"))
    assert not (tmp_path / "new").exists()

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    _failing_first_step(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(tiny_config, str(existing))
    assert sorted(os.listdir(existing)) == ["notes.txt", LOCK_FILE]
    assert WorkdirLock(existing).holder() is None


def test_the_corrected_command_runs_after_a_setup_failure(cli_config, tmp_path):
    """Through the command line: a mesh the machine lacks fails in set-up with one line; the corrected command
    (another batch_size too, which a resume would refuse) trains, even over a labels.json that a run killed in
    set-up would leave; its config.json is the corrected one."""
    workdir = tmp_path / "run"
    bad = subprocess.run(_cmd(cli_config, workdir, "--config.mesh.data=2"), cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and len(_errors(bad.stderr)) == 1, bad.stderr[-2000:]
    assert "needs 2 devices" in _errors(bad.stderr)[0] and not workdir.exists()
    workdir.mkdir()
    (workdir / "labels.json").write_text(json.dumps({"labels": ["other", "labels"]}))
    good = subprocess.run(_cmd(cli_config, workdir, "--config.batch_size=4"), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stderr[-2000:]
    assert json.loads((workdir / "config.json").read_text())["batch_size"] == 4
    assert json.loads((workdir / "results.json").read_text())["step"] == 4
    assert WorkdirLock(workdir).holder() is None


def test_a_multi_process_run_takes_one_lock_and_all_processes_stop_when_it_is_held(cli_config, tmp_path):
    """Process 0 alone takes the lock (the others share its filesystem: taking it too would refuse their own
    run); when another run holds it, every process stops with one line naming that holder."""
    import socket

    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = WorkdirLock(workdir)
    holder.acquire()
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen(_cmd(cli_config, workdir, "--config.mesh.data=4",
                                   f"--config.distributed.coordinator_address=localhost:{port}",
                                   "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
                                   "--config.distributed.timeout_s=60"),
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        holder.release()
    for p, (_, err) in zip(procs, outs):
        errors = _errors(err)
        assert p.returncode == 1 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
        assert int(HOLDER.search(errors[0]).group(1)) == os.getpid()
    assert os.listdir(workdir) == [LOCK_FILE]
