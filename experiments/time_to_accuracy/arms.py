"""Runs one arm as a fresh process and times it the same way for both: the clock starts just before the process
is launched, and each evaluation is stamped when its line appears in the file the arm writes (sft_jax's
metrics.jsonl, the HF script's --metrics file). The arm is stopped at the first evaluation that reaches the
target (sft_jax has no such stop: it is sent SIGTERM, the HF script stops itself)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from experiments.time_to_accuracy.cases import Case, hf_flags, sft_jax_overrides

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
POLL_S = 0.1  # how often the file is read: the resolution of the times


def sft_jax_command(case: Case, seed: int, workdir: str, model: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "sft_jax.main", f"--config={case.config}", f"--workdir={workdir}"]
    return cmd + [f"--config.{k}={v}" for k, v in sft_jax_overrides(case, seed, model).items()]


def hf_command(case: Case, seed: int, workdir: str, model_dir: str) -> list[str]:
    return [sys.executable, os.path.join(HERE, "hf_trainer.py"), *hf_flags(case, seed, model_dir),
            f"--metrics={os.path.join(workdir, 'evals.jsonl')}", f"--output_dir={os.path.join(workdir, 'trainer')}"]


def evals_file(arm: str, workdir: str) -> str:
    return os.path.join(workdir, "metrics.jsonl" if arm == "sft_jax" else "evals.jsonl")


def run_arm(arm: str, cmd: list[str], case: Case, workdir: str, timeout_s: float = 6 * 3600) -> dict:
    """Runs `cmd` from a cold start in an emptied `workdir`; returns the command, the evaluations
    [{step, value, wall_s}] with wall_s from launch, time_to_target_s (None: not reached) and process_wall_s."""
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    path, log = evals_file(arm, workdir), os.path.join(workdir, "log.txt")
    print("$", " ".join(cmd).replace(ROOT + "/", ""), flush=True)
    evals, offset, hit, stop_sent, setup = [], 0, None, None, {}
    env = {**os.environ, "PYTHONPATH": ROOT}
    with open(log, "w") as out:
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        while True:
            done = proc.poll() is not None  # read once more after exit: the last line may have just landed
            now = time.time() - start
            if os.path.exists(path):
                with open(path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                complete = chunk[:chunk.rfind(b"\n") + 1]  # a line being written waits for the next poll
                offset += len(complete)
                for line in complete.decode().splitlines():
                    row = json.loads(line)
                    setup.update(row.get("setup", {}))  # what the HF script resolved (its optimizer, threads)
                    if case.metric in row:
                        evals.append({"step": row["step"], "value": row[case.metric], "wall_s": now})
                        if hit is None and case.reached(row[case.metric]):
                            hit = evals[-1]
            if hit is not None and not done and arm == "sft_jax" and stop_sent is None:
                proc.send_signal(signal.SIGTERM)  # its preemption path: a checkpoint, then a clean exit
                stop_sent = now
            if done or now > timeout_s or (stop_sent is not None and now - stop_sent > 60):
                break
            time.sleep(POLL_S)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        wall = time.time() - start
    if proc.returncode not in (0, -signal.SIGTERM) and hit is None:
        tail = open(log).read()[-3000:]
        raise RuntimeError(f"{arm} failed (exit {proc.returncode}); the end of {log}:\n{tail}")
    return {"arm": arm, "command": " ".join(cmd).replace(ROOT + "/", ""), "evals": evals,
            "time_to_target_s": hit["wall_s"] if hit else None, "step_at_target": hit["step"] if hit else None,
            "process_wall_s": wall, "exit_code": proc.returncode, **({"setup": setup} if setup else {})}
