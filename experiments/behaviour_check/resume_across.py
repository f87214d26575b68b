"""Does a checkpoint written by one checkout resume in another? A short SST-2 run (MiniLM, partial) is killed
by checkout A right after its step-2 checkpoint, resumed to step 4 by checkout B, and compared with B's
uninterrupted run: equal `params_fingerprint`s mean the resume is bit-identical.

    python -m experiments.behaviour_check.resume_across --repos=/tmp/before,.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), os.pardir,
                    "shared", "data")
_WORKER = """
import json, sys
mode, workdir, data = sys.argv[1:4]
try:
    from sft_jax import platform
    platform.configure_cpu()
except ImportError:  # checkouts from before sft_jax.platform set the CPU up on import
    import sft_jax
from configs.sst2 import get_config
from sft_jax.checkpoint import Checkpoints
from sft_jax.train import train_and_evaluate

c = get_config("partial")
c.data.train, c.data.eval, c.forgetting.stsb = f"{data}/sst2/train.tsv", f"{data}/sst2/dev.tsv", ""
c.data.max_train_examples, c.max_steps, c.warmup_steps, c.eval_every, c.checkpoint_every = 256, 4, 1, 2, 2
c.batch_size, c.eval_batch_size, c.log_every = 8, 64, 1
if mode == "kill":
    save_latest = Checkpoints.save_latest

    def save_then_die(self, state, meta):
        save_latest(self, state, meta)
        self.wait()
        if int(state.step) == 2:
            sys.exit(3)

    Checkpoints.save_latest = save_then_die
r = train_and_evaluate(c, workdir)
print(json.dumps({"step": r["step"], "params_fingerprint": r["params_fingerprint"]}))
"""


def _run(repo: str, mode: str, workdir: str) -> dict | None:
    proc = subprocess.run([sys.executable, "-c", _WORKER, mode, workdir, os.path.abspath(DATA)], cwd=repo,
                          env={**os.environ, "PYTHONPATH": repo}, capture_output=True, text=True)
    if mode == "kill":
        assert proc.returncode == 3, proc.stderr[-2000:]
        return None
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repos", required=True, help="A,B: A writes the checkpoint, B resumes it")
    a, b = (os.path.abspath(r) for r in p.parse_args().repos.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        _run(a, "kill", os.path.join(tmp, "split"))
        resumed = _run(b, "resume", os.path.join(tmp, "split"))
        whole = _run(b, "whole", os.path.join(tmp, "whole"))
    same = resumed == whole
    print(f"killed at step 2 by {a}, resumed by {b}: {resumed['params_fingerprint']}; uninterrupted in {b}: "
          f"{whole['params_fingerprint']} -> {'bit-identical' if same else 'DIFFERENT'}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
