"""Split CIFAR-10 (issue 29 item 6): five two-class stages on the CIFAR ViT, plain fine-tuning against L2-SP,
EWC, LoRA per stage and replay (class-incremental only), task- and class-incremental, several seeds; the accuracy
matrix, average accuracy and BWT (and FWT, task-incremental) of each, with t-intervals over seeds.

    PYTHONPATH=. python -m experiments.continual.run [--methods=plain,l2sp,ewc,lora,replay] [--scenarios=task,class]
        [--seeds=0,1,2] [--base=WORKDIR]
    PYTHONPATH=. python -m experiments.continual.run --decoder [--strategies=lora] [--seeds=0,1,2]
    PYTHONPATH=. python -m experiments.continual.run --report      # RESULTS.md and continual.png again

--decoder runs the decoder sequence instead (configs/continual_decoder.py: SmolLM2-135M-Instruct on XSum, then
GSM8K, then English-French translation, the WikiText-2 probe in every stage) into workdirs/decoder_STRATEGY_sSEED.

Each sequence is one command line (configs/continual_cifar.py:METHOD,SCENARIO) in workdirs/SCENARIO_METHOD_sSEED
(ignored by git; a finished one is read back). The starting model is a run of configs/cifar_pretrain.py
(--base, or trained first into workdirs/base). Each finished sequence's config.json, results.json and
continual.json, and every stage's results.json and metrics.jsonl, are kept with the code version under
runs/SCENARIO_METHOD/seed_SEED; RESULTS.md and the plot are made from those files only.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from experiments import protocol
from experiments.common import markdown_table, run_cli

HERE = os.path.dirname(os.path.abspath(__file__))
WORKDIRS = os.path.join(HERE, "workdirs")
FIGURES = ("continual/average_accuracy", "continual/bwt", "continual/fwt")
# Replay needs one head for every class (a head per stage cannot score another stage's images).
UNDEFINED = {("replay", "task")}


def keep(workdir: str, arm: str, seed: int, command: str) -> str:
    """The sequence's config, results and matrix, and each stage's results and metrics, with provenance."""
    stages = sorted(os.listdir(os.path.join(workdir, "stages")), key=int)
    files = ["config.json", "results.json", "continual.json"]
    files += [os.path.join("stages", i, name) for i in stages for name in ("results.json", "metrics.jsonl")]
    return protocol.keep_run(workdir, HERE, arm, seed, command, files=files)


def report(runs: list[dict]) -> str:
    lines = ["# Split CIFAR-10: five two-class stages", "",
             "Made by `python -m experiments.continual.run` from the kept runs in runs/ only. Starting model: the "
             "CIFAR ViT of configs/cifar_pretrain.py, trained from scratch on airplane, automobile, bird, cat and "
             "deer, **so it has seen the classes of stages 1-2 and half of stage 3**. Each stage: 150 steps of 64 "
             "images, best checkpoint on a validation split carved from the stage's training images, scored on "
             "the stage's 400 held-out images. Cells: mean ± half-width of the 95% t-interval over seeds [n].",
             "", protocol.provenance_line(runs), ""]
    for scenario in ("task", "class"):
        arms = sorted({r["arm"] for r in runs if r["arm"].startswith(scenario + "_")})
        if not arms:
            continue
        lines += [f"## {scenario}-incremental", ""]
        rows = []
        for arm in arms:
            cells = [arm.split("_", 1)[1]]
            for key in FIGURES:
                values = [r["results"][key] for r in runs if r["arm"] == arm and key in r["results"]]
                cells.append(protocol.summarize(values).format(scale=100, digits=1) if values else "n/a")
            rows.append(cells)
        lines += markdown_table(["method", "average accuracy (%)", "BWT (points)", "FWT (points)"], rows) + [""]
        lines += paired_table(runs, scenario, arms)
        lines += ["Accuracy matrices (%, mean over seeds): row i after stage i, column j stage j's held-out "
                  "images.", ""]
        for arm in arms:
            lines += [f"{arm.split('_', 1)[1]}:", ""] + matrix_table(
                [r["results"]["continual/accuracy_matrix"] for r in runs if r["arm"] == arm]) + [""]
    if any(r["arm"].startswith("class_") for r in runs):
        lines += ["Replay has no task-incremental arm: its memory of earlier classes needs one head over all of "
                  "them.", ""]
    if runs:
        lines += ["Read with these limits:", "",
                  "- The L2-SP (0.01) and EWC (100) weights were fixed before the runs, not tuned on the validation "
                  "split; EWC is online (each stage's Fisher added to the earlier ones), so its pull grows stage by "
                  "stage, and a weaker or stronger weight moves it along the stability / plasticity trade-off "
                  "(compare its diagonal with plain fine-tuning's).",
                  "- Each stage's best checkpoint is chosen on held-out images of that stage's own classes; in the "
                  "class-incremental setting this favours the newest classes over the replayed ones.",
                  "- Replay keeps 50 training images per earlier class (100 per stage, 400 by the last stage beside "
                  "the stage's 1,440).",
                  "- Task-incremental stages are two-way choices (chance 50%); class-incremental cells are over "
                  "all classes seen so far (chance 1 / (2 (i + 1)) after stage i).", ""]
    decoder = [r for r in runs if r["arm"].startswith("decoder_")]
    if decoder:
        lines += decoder_report(decoder)
    return "\n".join(lines)


def decoder_report(runs: list[dict]) -> list[str]:
    """The decoder sequence: its accuracy and loss matrices, transfer figures and WikiText-2 after each stage."""
    names = ("XSum", "GSM8K", "en-fr")
    lines = ["## Decoder sequence: XSum, then GSM8K, then English-French", "",
             "configs/continual_decoder.py: 60 steps of 4 examples a stage, bfloat16 matmuls, best checkpoint "
             "on 10% of each stage's training data; scored on 100 held-out examples per stage. Cells: next-token "
             "accuracy on the target tokens (%), or their loss, mean over seeds; figures: mean ± half-width of "
             "the 95% t-interval [n].", "",
             protocol.decoder_line(runs), ""]
    for arm in sorted({r["arm"] for r in runs}):
        mine = [r["results"] for r in runs if r["arm"] == arm]
        lines += [f"### {arm.split('_', 1)[1]}", ""]
        cells = [protocol.summarize([m[k] for m in mine]).format(scale=100, digits=2) for k in FIGURES]
        lines += markdown_table(["average accuracy (%)", "BWT (points)", "FWT (points)"], [cells]) + [""]
        for key, first, scale, what in (
                ("continual/accuracy_matrix", "continual/initial_accuracy", 100, "accuracy (%)"),
                ("continual/loss_matrix", "continual/initial_loss", 1, "loss (nats)")):
            mean = scale * np.mean(np.asarray([m[key] for m in mine], float), axis=0)
            initial = scale * np.mean(np.asarray([m[first] for m in mine], float), axis=0)
            rows = [["base"] + [f"{v:.2f}" for v in initial]]
            rows += [[f"after {names[i]}"] + [f"{v:.2f}" for v in row] for i, row in enumerate(mean)]
            lines += [f"Next-token {what}:", ""] + markdown_table(["model"] + list(names), rows) + [""]
        ppl = [["base", protocol.summarize([m["continual/stage_0/forgetting/wikitext2_ppl/before"]
                                            for m in mine]).format(digits=2)]]
        ppl += [[f"after {names[i]}", protocol.summarize(
            [m[f"continual/stage_{i}/forgetting/wikitext2_ppl/after"] for m in mine]).format(digits=2)]
            for i in range(len(names))]
        lines += ["WikiText-2 perplexity (the probe above):", ""] + markdown_table(["model", "perplexity"], ppl)
        lines += [""]
    arms = sorted({r["arm"].split("_", 1)[1] for r in runs})
    if len(arms) == 1:
        lines += [f"Read with this limit: one strategy ({arms[0]}) was run, so these figures describe it alone; "
                  "how much of its small forgetting is owed to the strategy needs the same sequence with plain "
                  f"full fine-tuning beside it (`--decoder --strategies=full`). 60 steps a stage is a short "
                  "budget: each stage's own gain is modest too.", ""]
    return lines


def paired_table(runs: list[dict], scenario: str, arms: list[str]) -> list[str]:
    """Each method minus plain fine-tuning, seed by seed (the arms share seeds), with the t-interval."""
    plain = f"{scenario}_plain"
    if plain not in arms:
        return []
    rows = []
    for arm in arms:
        if arm == plain:
            continue
        cells = [arm.split("_", 1)[1] + " - plain"]
        for key in FIGURES[:2]:
            values = protocol.by_arm(runs, key)
            cells.append(protocol.paired(values[arm], values[plain]).format(scale=100, digits=1))
        rows.append(cells)
    return ["Paired differences from plain fine-tuning (same seed):", ""] + markdown_table(
        ["method", "average accuracy (points)", "BWT (points)"], rows) + [""]


def matrix_table(matrices: list[list[list[float]]]) -> list[str]:
    mean = 100 * np.mean(np.asarray(matrices, float), axis=0)
    return markdown_table(["after"] + [f"stage {j}" for j in range(mean.shape[1])],
                          [[f"stage {i}"] + [f"{v:.1f}" for v in row] for i, row in enumerate(mean)])


def plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for arm in sorted({r["arm"] for r in runs if not r["arm"].startswith("decoder_")}):
        mine = [r["results"] for r in runs if r["arm"] == arm]
        ax.scatter([100 * m["continual/bwt"] for m in mine], [100 * m["continual/average_accuracy"] for m in mine],
                   label=arm, marker="o" if arm.startswith("task") else "s")
    ax.set_xlabel("backward transfer (points; < 0: forgetting)")
    ax.set_ylabel("average accuracy after the last stage (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="plain,l2sp,ewc,lora,replay")
    p.add_argument("--scenarios", default="task,class")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--base", default="", help="a finished configs/cifar_pretrain.py workdir")
    p.add_argument("--steps", type=int, default=0, help="steps per stage (default: the config's 150); with "
                   "--out, a plumbing check whose runs are not kept")
    p.add_argument("--out", default="", help="workdirs here instead of workdirs/, nothing kept")
    p.add_argument("--report", action="store_true")
    p.add_argument("--decoder", action="store_true", help="the decoder sequence (configs/continual_decoder.py)")
    p.add_argument("--strategies", default="lora", help="--decoder: strategies, a sequence each")
    args = p.parse_args()
    if args.decoder and not args.report:
        for seed in (int(s) for s in args.seeds.split(",")):
            for strategy in args.strategies.split(","):
                arm = f"decoder_{strategy}"
                workdir = os.path.join(args.out or WORKDIRS, f"{arm}_s{seed}")
                quick = {"max_steps": args.steps, "eval_every": args.steps, "checkpoint_every": args.steps,
                         "data.max_eval_examples": 8, "forgetting.wikitext2_max_tokens": 1024}
                results = run_cli(f"configs/continual_decoder.py:{strategy}", workdir,
                                  {"seed": seed, **(quick if args.steps else {})})
                if not args.out:
                    keep(workdir, arm, seed, results["command"])
        if args.out:
            return
    elif not args.report:
        workdirs = args.out or WORKDIRS
        base = args.base or os.path.join(workdirs, "base")
        if not os.path.exists(os.path.join(base, "results.json")):
            run_cli("configs/cifar_pretrain.py", base)
        seeds = [int(s) for s in args.seeds.split(",")]
        for seed in seeds:  # seeds outermost: a cut-short run still has every arm at the first seeds
            for scenario in args.scenarios.split(","):
                for method in args.methods.split(","):
                    if (method, scenario) in UNDEFINED:
                        continue
                    arm = f"{scenario}_{method}"
                    workdir = os.path.join(workdirs, f"{arm}_s{seed}")
                    steps = {"max_steps": args.steps, "eval_every": args.steps, "checkpoint_every": args.steps}
                    results = run_cli(f"configs/continual_cifar.py:{method},{scenario}", workdir,
                                      {"model": os.path.abspath(base), "seed": seed, **(steps if args.steps else {})})
                    if not args.out:
                        keep(workdir, arm, seed, results["command"])
        if args.out:
            return
    runs = protocol.load_runs(HERE)
    with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
        f.write(report(runs))
    if runs:
        plot(runs, os.path.join(HERE, "continual.png"))
    print(f"wrote {os.path.join(HERE, 'RESULTS.md')}")


if __name__ == "__main__":
    main()
