"""SST-2 with all-MiniLM-L6-v2: head vs partial (K=3) vs full fine-tuning, and what each costs on STS-B.

    python -m experiments.sst2_strategies.run [--steps=N] [--strategies=head,partial,full]

Each strategy is one ordinary CLI run (configs/sst2.py:STRATEGY) in its own workdir under
experiments/sst2_strategies/workdirs/ (ignored by git; rerunning resumes or reuses finished runs).
Writes results.json, RESULTS.md and accuracy_vs_forgetting.png next to this file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def run(strategy: str, steps: int | None) -> dict:
    workdir = os.path.join(HERE, "workdirs", strategy)
    cmd = [sys.executable, "-m", "sft_jax.main", f"--config=configs/sst2.py:{strategy}", f"--workdir={workdir}"]
    if steps:
        cmd.append(f"--config.max_steps={steps}")
    print("$", " ".join(cmd), flush=True)
    t = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    results.update(strategy=strategy, command=" ".join(cmd[1:]), process_wall_s=time.time() - t,
                   learning_rate=config["learning_rate"], batch_size=config["batch_size"],
                   max_steps=config["max_steps"])
    return results


def write_report(rows: list[dict], command: str) -> None:
    with open(os.path.join(HERE, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for r in rows:
        ax.scatter(r["forgetting/stsb_spearman/drop"], 100 * r["eval/accuracy"], s=60)
        ax.annotate(r["strategy"], (r["forgetting/stsb_spearman/drop"], 100 * r["eval/accuracy"]),
                    textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("STS-B Spearman drop (before - after)")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.set_title("all-MiniLM-L6-v2 on SST-2: task gain vs forgetting")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "accuracy_vs_forgetting.png"), dpi=120)

    lines = [
        "# SST-2 fine-tuning strategies (all-MiniLM-L6-v2)",
        "",
        f"Produced by `make experiment-sst2` (= `{command}`) on this machine (2 CPU cores, float32).",
        "",
        "Data: the full SST-2 train split (67,349 phrases), batch 32, for the steps in the table (AdamW, warmup "
        "then linear decay to zero at max steps) with early stopping on dev accuracy "
        "(patience 3 evaluations, every 250 steps); the dev split (872 sentences) is the eval set, and the "
        "reported figures are those of the best checkpoint. Forgetting: Spearman correlation of the cosine "
        "similarity of mean-pooled embeddings with the STS-B dev scores (1,500 pairs), before and after.",
        "",
        "| strategy | trainable params | dev accuracy | dev macro-F1 | STS-B before | STS-B after | STS-B drop "
        "| max steps (epochs) | best step | examples/s | wall time (s) | lr |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {r['trainable_params']:,} / {r['total_params']:,} | "
            f"{100 * r['eval/accuracy']:.2f}% | {100 * r['eval/f1']:.2f} | "
            f"{r['forgetting/stsb_spearman/before']:.4f} | {r['forgetting/stsb_spearman/after']:.4f} | "
            f"{r['forgetting/stsb_spearman/drop']:.4f} | {r['max_steps']} ({r['max_steps'] * 32 / 67349:.2f}) | "
            f"{r['best_step']} | "
            f"{r.get('train/examples_per_s', float('nan')):.1f} | {r['process_wall_s']:.0f} | {r['learning_rate']:g} |")
    lines += ["", "![accuracy vs STS-B drop](accuracy_vs_forgetting.png)", "",
              "Commands (one per strategy):", ""]
    lines += [f"    python {r['command']}" for r in rows]
    lines += ["", "examples/s counts training steps only (compilation and checkpoint saves included, evaluation "
              "excluded); wall time is the whole process (data loading, STS-B probes, evaluations).", ""]
    with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
        f.write("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=None, help="override every strategy's max_steps")
    parser.add_argument("--strategies", default="full,partial,head")
    args = parser.parse_args()
    rows = [run(s, args.steps) for s in args.strategies.split(",")]
    write_report(rows, " ".join(["python -m experiments.sst2_strategies.run", *sys.argv[1:]]))
    print(open(os.path.join(HERE, "RESULTS.md")).read())


if __name__ == "__main__":
    main()
