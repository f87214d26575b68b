"""RESULTS.md of the time-to-accuracy comparison, from results.json alone."""

from __future__ import annotations

import statistics

from experiments import protocol
from experiments.common import markdown_table

ARMS = ("sft_jax", "hf_trainer")
ARM_NAMES = {"sft_jax": "sft_jax (python -m sft_jax.main)", "hf_trainer": "HF Trainer (hf_trainer.py)"}


def summarise(runs: list[dict]) -> dict:
    """Over one arm's seeds: how many reached the target; of the runs that did, their times' mean, min, max and
    t-interval, and (when every such run records its step) the mean steps to target, time per step and time of
    the first evaluation."""
    reached = [r for r in runs if r["time_to_target_s"] is not None]
    times = [r["time_to_target_s"] for r in reached]
    out = {"seeds": len(runs), "reached": len(times)}
    if times:
        out.update(mean=statistics.mean(times), min=min(times), max=max(times), interval=protocol.summarize(times))
        if all(r.get("step_at_target") for r in reached):
            # Time per step up to the target (start-up included) and steps needed: the ratio is their product,
            # which tells speed apart from how many steps each arm's training took to get there.
            out.update(first_eval_s=statistics.mean(r["evals"][0]["wall_s"] for r in reached if r.get("evals")),
                       steps=statistics.mean(r["step_at_target"] for r in reached),
                       s_per_step=statistics.mean(r["time_to_target_s"] / r["step_at_target"] for r in reached))
    return out


def ratio(summaries: dict) -> float | None:
    """HF Trainer's mean time over sft_jax's (> 1: sft_jax is faster), when every seed of both reached it."""
    a, b = summaries["sft_jax"], summaries["hf_trainer"]
    if not (a["seeds"] and a["reached"] == a["seeds"] and b["seeds"] and b["reached"] == b["seeds"]):
        return None
    return b["mean"] / a["mean"]


def _time(s: dict) -> str:
    if not s["reached"]:
        return "not reached"
    note = "" if s["reached"] == s["seeds"] else f" ({s['reached']} of {s['seeds']} seeds reached it)"
    return f"{s['mean']:.0f} s [{s['min']:.0f}, {s['max']:.0f}]{note}"


def _interval(s: dict) -> str:
    return s["interval"].format(digits=0) + " s" if s["reached"] else "-"


def _per_step(s: dict) -> str:
    return f"{s['steps']:.0f} steps, {s['s_per_step']:.3f} s/step" if "steps" in s else "-"


def _first_eval(s: dict) -> str:
    return f"{s['first_eval_s']:.0f} s" if "first_eval_s" in s else "-"


def _settings(case: dict) -> list[str]:
    rows = [[k, v] for k, v in case["settings"].items()]
    return markdown_table(["setting (both arms)", "value"], rows)


def case_section(name: str, case: dict, runs: list[dict]) -> list[str]:
    direction = ">=" if case["mode"] == "max" else "<="
    lines = [f"## {name}: time to {case['metric']} {direction} {case['target']}", ""]
    summaries = {arm: summarise([r for r in runs if r["arm"] == arm]) for arm in ARMS}
    rows = [[ARM_NAMES[arm], summaries[arm]["seeds"], _time(summaries[arm]), _interval(summaries[arm]),
             _per_step(summaries[arm]), _first_eval(summaries[arm])] for arm in ARMS]
    lines += markdown_table(["arm", "seeds", "time to target: mean [min, max] over seeds",
                             "mean ± 95% t-interval", "mean steps to target, time per step",
                             "first evaluation at (start-up + one interval)"], rows)
    r = ratio(summaries)
    lines += ["", f"**Ratio HF Trainer / sft_jax: {r:.2f}x**" if r is not None else
              "Ratio HF Trainer / sft_jax: not computed (a seed of an arm did not reach the target).", ""]
    a, b = summaries["sft_jax"], summaries["hf_trainer"]
    if r is not None and "steps" in a and "steps" in b:
        lines += [f"Of it, time per step (start-up included) gives {b['s_per_step'] / a['s_per_step']:.2f}x and "
                  f"the steps each arm needed {b['steps'] / a['steps']:.2f}x (HF / sft_jax, means over seeds). The "
                  "step counts move in units of the evaluation interval, so the second factor is coarse.", ""]
    per_run = [[r["seed"], r["arm"], "not reached" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.1f}",
                r["step_at_target"] if r["step_at_target"] is not None else "-",
                " ".join(f"{e['step']}:{e['value']:.4f}" for e in r["evals"]),
                f"{r['process_wall_s']:.0f}", f"{r['load_before']:.2f}"] for r in runs]
    lines += markdown_table(["seed", "arm", "time to target (s)", "step", "evaluations (step:value)",
                             "process wall (s)", "1-min load before"], per_run)
    lines += ["", *_settings(case), "", "Commands (seed 0):", ""]
    lines += [f"    {r['command']}" for r in runs if r["seed"] == runs[0]["seed"]]
    return lines + [""]


def _made_by(made_by: dict, smoke: bool) -> list[str]:
    m = made_by["machine"]
    return [f"Produced by `{made_by['command']}` at code version {made_by['code_version']}"
            + (" (a --smoke run: a plumbing check, not a measurement)" if smoke else "") + ".", "",
            f"Machine: {m.get('cpu', m['cpu_model'])}, {m['cores']} cores used by each arm (XLA:CPU's threads; "
            f"torch.set_num_threads({m['cores']})); JAX {m['jax']}, PyTorch {m['torch']}, transformers "
            f"{m['transformers']}.", ""]


def _smollm2_source(results: dict) -> str:
    """What the sft_jax arm's SmolLM2 runs loaded, read from their recorded commands."""
    commands = [r["command"] for r in results["runs"] if r["case"] == "smollm2" and r["arm"] == "sft_jax"]
    if commands and all("--config.model=smollm2-135m-instruct " in c for c in commands):
        return "sft_jax's arm loads the GGUF file itself, so its time holds dequantising the Q4 blocks."
    return "sft_jax's arm loads that same export (its command's --config.model)."


def render(results: dict) -> str:
    made_by = {name: case.get("made_by", results) for name, case in results["cases"].items()}
    one_invocation = all(m == next(iter(made_by.values())) for m in made_by.values())
    lines = ["# Time to accuracy: sft_jax's command line against a Hugging Face Trainer script", ""]
    if one_invocation:
        lines += _made_by(next(iter(made_by.values())), results.get("smoke"))
    else:
        lines += ["Each case below says which invocation made it, at which code version, on which machine.", ""]
    lines += ["Each run is a fresh process started in an emptied folder; the clock starts just before the process "
             "is launched, so imports, tokenisation, model loading, compilation, checkpoints and every evaluation "
             "are inside the time. An evaluation's time is when its line appears in the file the arm writes "
             f"(read every {results['poll_s']} s); a run ends at the first evaluation that reaches the target. "
             "Seeds run alternately (sft_jax seed 0, HF seed 0, sft_jax seed 1, ...), so slow drift in the "
             "machine's load falls on both arms. Each arm's times are given as min-max over seeds and as the "
             "protocol's mean ± 95% t-interval (experiments/protocol.py). Beyond the shared settings: sft_jax "
             "runs its config with the STS-B / "
             "WikiText-2 probes and generation off and no early-stopping patience; the HF script uses the "
             "Trainer's defaults otherwise (its default optimizer, dataloader without workers, float32, sdpa "
             "attention, eager). The HF arm's SmolLM2 is sft_jax's export of the same GGUF weights (made once, "
             f"before any timing), with PEFT LoRA on the same projections; {_smollm2_source(results)}", ""]
    for name, case in results["cases"].items():
        section = case_section(name, case, [r for r in results["runs"] if r["case"] == name])
        if not one_invocation:
            section[2:2] = _made_by(made_by[name], results.get("smoke"))
        lines += section
    return "\n".join(lines)
