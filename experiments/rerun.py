"""Reruns one kept run of an experiment from its recorded command and says whether the rerun lands inside the
arm's reported interval: the reviewer's check of a kept result, in one command.

    PYTHONPATH=. python -m experiments.rerun experiments/cifar_transfer full_50 1 [--metric=eval/accuracy]

The command recorded in runs/ARM/seed_SEED/provenance.json runs again with its workdir moved to
EXPERIMENT/workdirs/rerun/ARM_sSEED (or --workdir; emptied first). It runs the code at hand: when that is not the
recorded commit, or the tree is dirty, a warning says so (check the commit out for an exact rerun). Compared, for
each metric (default: every numeric eval/, test/ and forgetting/ result the kept run has): the kept run's value,
the rerun's, and the arm's mean with its 95% t-interval over the kept seeds; also whether the final parameters'
fingerprints agree (bit-identical training). Exit status 1 when a compared metric falls outside the interval.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys

from experiments import protocol
from experiments.common import markdown_table

METRIC_PREFIXES = ("eval/", "test/", "forgetting/")
RUNNER = ("python", "-m", "sft_jax.main")  # the only kind of recorded command this tool reruns


def kept_arm(experiment_dir: str, arm: str) -> list[dict]:
    runs = [r for r in protocol.load_runs(experiment_dir) if r["arm"] == arm]
    if not runs:
        raise SystemExit(f"{experiment_dir}/runs/{arm}: no kept runs of arm {arm!r}")
    return runs


def rerun_command(command: str, workdir: str) -> list[str]:
    """The recorded command with its --workdir replaced; SystemExit naming what stops it from running here."""
    argv = shlex.split(command)
    if tuple(argv[:3]) != RUNNER:
        raise SystemExit(f"recorded command is not `{' '.join(RUNNER)} ...`, rerun it by hand: {command}")
    out = [sys.executable, *argv[1:3]]
    for arg in argv[3:]:
        if arg.startswith("--workdir="):
            arg = f"--workdir={workdir}"
        else:
            value = arg.split("=", 1)[-1]
            # Another run's workdir (a base model, an earlier stage): ignored by git, so absent from a fresh clone.
            if "/workdirs/" in value and not os.path.exists(os.path.join(protocol.ROOT, value)):
                raise SystemExit(f"the recorded command reads {value}, which is not here: make it first "
                                 "(the experiment's run.py does)")
        out.append(arg)
    return out


def numeric_metrics(results: dict) -> list[str]:
    return [k for k, v in results.items() if k.startswith(METRIC_PREFIXES) and isinstance(v, (int, float))
            and not isinstance(v, bool)]


def compare(kept: dict, rerun: dict, arm_runs: list[dict], metrics: list[str]) -> tuple[list[list[str]], bool]:
    """Table rows (metric, kept, rerun, arm's interval, inside) and whether every rerun value is inside."""
    rows, inside_all = [], True
    for key in metrics:
        if key not in rerun:
            raise SystemExit(f"the rerun's results.json has no {key!r}")
        s = protocol.summarize([r["results"][key] for r in arm_runs if key in r["results"]])
        inside = bool(s.low <= rerun[key] <= s.high) if s.n >= 2 else None  # not numpy.bool_: "is" tests below
        inside_all &= inside is not False
        rows.append([key, f"{kept['results'][key]:.6g}", f"{rerun[key]:.6g}", s.format(digits=4),
                     {True: "yes", False: "**no**", None: "- (one seed)"}[inside]])
    return rows, inside_all


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiment", help="an experiment's folder, e.g. experiments/cifar_transfer")
    p.add_argument("arm")
    p.add_argument("seed", type=int)
    p.add_argument("--metric", action="append", default=[], help="a results.json key (repeatable)")
    p.add_argument("--workdir", default="", help="default: EXPERIMENT/workdirs/rerun/ARM_sSEED")
    args = p.parse_args(argv)
    arm_runs = kept_arm(args.experiment, args.arm)
    kept = next((r for r in arm_runs if r["seed"] == args.seed), None)
    if kept is None:
        raise SystemExit(f"arm {args.arm!r} has no kept seed {args.seed} (kept: {[r['seed'] for r in arm_runs]})")
    provenance = kept["provenance"]
    here = protocol.code_version()
    if provenance.get("commit") != here["commit"] or here["dirty"]:
        print(f"warning: the kept run was made at {provenance.get('commit')}; this tree is {here['commit']}"
              f"{' (dirty)' if here['dirty'] else ''}: `git checkout {provenance.get('commit')}` for an exact rerun",
              flush=True)
    workdir = os.path.abspath(args.workdir or os.path.join(args.experiment, "workdirs", "rerun",
                                                           f"{args.arm}_s{args.seed}"))
    cmd = rerun_command(provenance["command"], workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=protocol.ROOT, check=True)
    with open(os.path.join(workdir, "results.json")) as f:
        rerun = json.load(f)
    rows, inside = compare(kept, rerun, arm_runs, args.metric or numeric_metrics(kept["results"]))
    print("\n".join(markdown_table(["metric", f"kept (seed {args.seed})", "rerun", "arm over kept seeds", "inside"],
                                   rows)))
    fingerprint = kept["results"].get("params_fingerprint")
    if fingerprint is not None:
        same = fingerprint == rerun.get("params_fingerprint")
        print(f"final parameters' fingerprint: {'identical' if same else 'different'} "
              f"(kept {fingerprint}, rerun {rerun.get('params_fingerprint')})")
    print("every compared metric inside the arm's interval" if inside else "a metric fell outside the interval")
    return 0 if inside else 1


if __name__ == "__main__":
    sys.exit(main())
