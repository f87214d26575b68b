"""Time to accuracy from a cold start: sft_jax's command line against a Hugging Face `Trainer` script with the same
model, data, batch, schedule and evaluation interval (issue 27 item 3; the settings and targets: cases.py).

    python -m experiments.time_to_accuracy.run [--cases=minilm,smollm2] [--seeds=0,1,2]
    python -m experiments.time_to_accuracy.run --report        # RESULTS.md again from results.json
    python -m experiments.time_to_accuracy.run --smoke         # a few steps on 64 examples: the plumbing only

Writes results.json (every run: command, code version, evaluations with their times, time to target) after each
run and RESULTS.md at the end, beside this file (or in --out). Workdirs: OUT/workdirs/CASE/ARM_sSEED (ignored by
git). Run it on a quiet machine: anything else running is inside the times.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import subprocess
import sys

from experiments.time_to_accuracy import arms, report
from experiments.time_to_accuracy.cases import CASES, Case, smoke

HERE = arms.HERE


def machine() -> dict:
    from experiments.benchmarks.machine import cpu_line, describe_cpu

    cpu = describe_cpu()
    return {"cpu_model": cpu["model_name"] or "unknown", "cpu": cpu_line(cpu), "cores": len(os.sched_getaffinity(0)),
            **{name: importlib.metadata.version(name) for name in ("jax", "torch", "transformers")}}


def code_version() -> str:
    """HEAD's short hash, "+dirty" when sft_jax/ or this experiment has uncommitted changes."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=arms.ROOT).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "sft_jax", "experiments/time_to_accuracy"],
                           capture_output=True, text=True, cwd=arms.ROOT).stdout.strip()
    return head + ("+dirty" if dirty else "")


def smollm2_hf_dir(cache: str) -> str:
    """SmolLM2 as a Hugging Face directory, exported once by sft_jax from the registry's GGUF file (the same
    weights, float32), with its tokenizer (chat template included): what the HF arm loads."""
    path = os.path.join(cache, "smollm2_hf")
    if not os.path.exists(os.path.join(path, "config.json")):
        from sft_jax.models.loading.hf import load_tokenizer
        from sft_jax.models.loading.lm import export_hf, load_decoder
        from sft_jax.models.registry import resolve_checkpoint

        lm, _ = load_decoder("smollm2-135m-instruct")
        export_hf(lm, path, tokenizer=load_tokenizer(resolve_checkpoint("smollm2-135m-instruct").path))
    return path


def hf_model_dir(case: Case, out: str, given: dict[str, str]) -> str:
    if case.name in given:
        return given[case.name]
    if case.name == "minilm":
        from sft_jax.models.registry import resolve_model_dir

        return str(resolve_model_dir(case.model))
    return smollm2_hf_dir(os.path.join(out, "workdirs"))


def run_case(case: Case, seeds: list[int], out: str, models: dict[str, str], save) -> list[dict]:
    """Both arms, seeds alternating between them; `save(runs)` after each run."""
    hf_dir = hf_model_dir(case, out, models)
    # Both arms start from the same file: where the case's model is a GGUF (smollm2), sft_jax loads the float32
    # export the HF arm loads, so neither arm's time holds dequantising Q4 blocks.
    sft_jax_model = models.get(case.name) or (hf_dir if case.name == "smollm2" else None)
    runs = []
    for seed in seeds:
        for arm in report.ARMS:
            workdir = os.path.join(out, "workdirs", case.name, f"{arm}_s{seed}")
            cmd = (arms.sft_jax_command(case, seed, workdir, sft_jax_model) if arm == "sft_jax"
                   else arms.hf_command(case, seed, workdir, hf_dir))
            load = os.getloadavg()[0]
            r = arms.run_arm(arm, cmd, case, workdir)
            runs.append({"case": case.name, "seed": seed, "load_before": load, "load_after": os.getloadavg()[0], **r})
            t = r["time_to_target_s"]
            print(f"{case.name} {arm} seed {seed}: " + ("not reached" if t is None else
                  f"{case.metric} reached at step {r['step_at_target']} after {t:.1f} s"), flush=True)
            save(runs)
    return runs


def carry_other_cases(path: str, results: dict, running: list[str]) -> None:
    """Keeps, from an earlier results.json at `path`, the cases this invocation does not run (their runs and
    their own command, code version and machine under "made_by"), so one case can be rerun alone."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        earlier = json.load(f)
    if earlier.get("smoke"):
        return
    made_by = {k: earlier[k] for k in ("command", "code_version", "machine")}
    for name, case in earlier["cases"].items():
        if name not in running:
            results["cases"][name] = {**case, "made_by": case.get("made_by", made_by)}
            results["runs"] += [r for r in earlier["runs"] if r["case"] == name]


def parse_setting(old, text: str):
    """A --set value in the type of the setting it replaces (buckets: comma-separated ints)."""
    return tuple(int(x) for x in text.split(",")) if isinstance(old, tuple) else type(old)(text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="minilm", help="comma-separated: minilm,smollm2 (smollm2 is slow)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--smoke", action="store_true", help="a few steps on 64 examples: the plumbing only")
    parser.add_argument("--report", action="store_true", help="only write RESULTS.md from results.json")
    parser.add_argument("--out", default=HERE, help="where results.json, RESULTS.md and workdirs/ go")
    parser.add_argument("--model", action="append", default=[],
                        help="CASE=DIR: another model directory for both arms (e.g. a tiny one in tests)")
    parser.add_argument("--data", action="append", default=[], help="CASE=TRAIN,EVAL: other data for both arms")
    parser.add_argument("--set", action="append", default=[],
                        help="KEY=VALUE: a setting of every case changed for both arms (e.g. max_steps=100)")
    args = parser.parse_args()
    path = os.path.join(args.out, "results.json")
    if not args.report:
        models = dict(m.split("=", 1) for m in args.model)
        data = {k: v.split(",", 1) for k, v in (d.split("=", 1) for d in args.data)}
        made_by = {"command": " ".join(["python -m experiments.time_to_accuracy.run", *sys.argv[1:]]),
                   "code_version": code_version(), "machine": machine()}
        results = {**made_by, "smoke": args.smoke, "poll_s": arms.POLL_S, "cases": {}, "runs": []}
        if not args.smoke:
            carry_other_cases(path, results, args.cases.split(","))
        os.makedirs(args.out, exist_ok=True)
        for name in args.cases.split(","):
            case = smoke(CASES[name]) if args.smoke else CASES[name]
            changed = {k: parse_setting(case.settings[k], v) for k, v in (kv.split("=", 1) for kv in args.set)}
            if name in data:
                changed.update(data_train=data[name][0], data_eval=data[name][1])
            case = dataclasses.replace(case, settings={**case.settings, **changed})
            results["cases"][name] = {"metric": case.metric, "mode": case.mode, "target": case.target,
                                      "config": case.config, "settings": case.settings,
                                      "sft_jax_only": case.sft_jax_only, "made_by": made_by}
            done = list(results["runs"])

            def save(runs, done=done):
                results["runs"] = done + runs
                with open(path, "w") as f:
                    json.dump(results, f, indent=1)

            run_case(case, [int(s) for s in args.seeds.split(",")], args.out, models, save)
    with open(path) as f:
        results = json.load(f)
    text = report.render(results)
    with open(os.path.join(args.out, "RESULTS.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
