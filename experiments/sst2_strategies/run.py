"""SST-2 with all-MiniLM-L6-v2: head vs partial (embeddings + blocks 0-2 frozen) vs full fine-tuning, and what
each costs on STS-B, under the experiment protocol (experiments/protocol.py).

    PYTHONPATH=. python -m experiments.sst2_strategies.run [--budgets=equal,peer,peer_random] [--seeds=0,1,2]
        [--strategies=head,partial,full] [--steps=1000]
    PYTHONPATH=. python -m experiments.sst2_strategies.run --report     # RESULTS.md and the plot again

Two budgets, each its own table:
- equal: configs/sst2.py:STRATEGY (its learning rates), every strategy for the same `--steps` optimizer steps of
  32; 10% of the training sentences held out (drawn with the seed) to choose the best checkpoint (evaluated
  every 250 steps, no early stop); the dev set is scored once, on that checkpoint, never selected on.
- peer: the peer's recipe (peer_torch.py's docstring), run by sft_jax (`PEER`) and by peer_torch.py (PyTorch +
  transformers alone) with the same seeds: 8,000 training sentences, one epoch (250 steps), the final model
  scored, as the peer did.
- peer_random: sft_jax at the peer's recipe with batches of random examples (`data.group_window=1`), as the
  peer draws them: whether sft_jax's length-sorted batches account for its larger STS-B drop.
Each run is one command in workdirs/ARM_sSEED (ignored by git; a finished one is read back); its config,
results and metrics are kept with the code version under runs/ARM/seed_SEED, and RESULTS.md and the plot are
made from those files only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from configs.common import shared_data
from experiments import protocol
from experiments.common import markdown_table, run_cli

HERE = os.path.dirname(os.path.abspath(__file__))
WORKDIRS = os.path.join(HERE, "workdirs")
STRATEGIES = ("head", "partial", "full")
EQUAL_STEPS = 1000
# sft_jax keys for the peer's recipe (peer_torch.py); per strategy, its learning rate.
PEER = {"data.max_train_examples": 8000, "max_steps": 250, "batch_size": 32, "max_length": 64,
        "warmup_steps": 0, "warmup_ratio": 0.1, "schedule": "linear", "weight_decay": 0.01, "clip_norm": 1.0,
        "pooling": "mean", "head_dropout": 0.0, "eval_every": 250, "checkpoint_every": 250,
        "early_stopping.patience": 0}
PEER_LEARNING_RATES = {"head": 1e-3, "partial": 5e-5, "full": 5e-5}
# The peer's figures as issue 28 quotes them (one run each, PyTorch + transformers): dev accuracy, STS-B after.
QUOTED = {"head": (0.755, 0.867), "partial": (0.822, 0.832), "full": (0.837, 0.828)}
ACCURACY = {"equal": "test/accuracy", "peer": "eval/accuracy"}  # the reported split's key in each budget
DROP = "forgetting/stsb_spearman/drop"


def equal_run(strategy: str, seed: int, steps: int) -> tuple[str, str]:
    workdir = os.path.join(WORKDIRS, f"equal_{strategy}_s{seed}")
    results = run_cli(f"configs/sst2.py:{strategy}", workdir, {
        "seed": seed, "max_steps": steps, "warmup_steps": 100, "data.validation_fraction": 0.1,
        "early_stopping.patience": 0, "eval_every": 250, "checkpoint_every": 250})
    return workdir, results["command"]


def peer_sft_jax_run(strategy: str, seed: int) -> tuple[str, str]:
    workdir = os.path.join(WORKDIRS, f"peer_sftjax_{strategy}_s{seed}")
    results = run_cli(f"configs/sst2.py:{strategy}", workdir,
                      {"seed": seed, **PEER, "learning_rate": PEER_LEARNING_RATES[strategy]})
    return workdir, results["command"]


def peer_random_run(strategy: str, seed: int) -> tuple[str, str]:
    """`peer_sft_jax_run` with batches of random examples (data.group_window=1), as the peer draws them, where
    sft_jax by default sorts windows of 50 batches by length."""
    workdir = os.path.join(WORKDIRS, f"peer_sftjax_random_{strategy}_s{seed}")
    results = run_cli(f"configs/sst2.py:{strategy}", workdir, {"seed": seed, **PEER, "data.group_window": 1,
                                                               "learning_rate": PEER_LEARNING_RATES[strategy]})
    return workdir, results["command"]


def peer_torch_run(strategy: str, seed: int) -> tuple[str, str]:
    workdir = os.path.join(WORKDIRS, f"peer_torch_{strategy}_s{seed}")
    cmd = [sys.executable, "-m", "experiments.sst2_strategies.peer_torch", f"--strategy={strategy}",
           f"--seed={seed}", f"--workdir={workdir}", f"--train={shared_data('sst2', 'train.tsv')}",
           f"--dev={shared_data('sst2', 'dev.tsv')}", f"--stsb={shared_data('stsb', 'dev.tsv')}"]
    if not os.path.exists(os.path.join(workdir, "results.json")):
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=protocol.ROOT, check=True)
    return workdir, "python " + " ".join(cmd[1:]).replace(protocol.ROOT + "/", "")


def summary_rows(runs: list[dict], arms: list[str], accuracy: str) -> list[list[str]]:
    rows = []
    for arm in arms:
        mine = [r["results"] for r in runs if r["arm"] == arm]
        rows.append([arm, str(len(mine)),
                     protocol.summarize([m[accuracy] for m in mine]).format(scale=100, digits=1),
                     protocol.summarize([m["forgetting/stsb_spearman/after"] for m in mine]).format(digits=3),
                     protocol.summarize([m[DROP] for m in mine]).format(digits=3)])
    return rows


def report(runs: list[dict]) -> str:
    lines = ["# SST-2 fine-tuning strategies (all-MiniLM-L6-v2)", "",
             "Made by `python -m experiments.sst2_strategies.run` from the kept runs in runs/ only (each run's "
             "config, results, metrics and code version). Cells: mean ± half-width of the 95% t-interval over "
             "seeds [interval] (n). STS-B: Spearman correlation of the cosine similarity of mean-pooled "
             "embeddings with the STS-B dev scores (1,500 pairs); drop = before - after.", "",
             protocol.provenance_line(runs), ""]
    equal = [a for a in (f"equal_{s}" for s in STRATEGIES) if any(r["arm"] == a for r in runs)]
    if equal:
        steps = {r["config"]["max_steps"] for r in runs if r["arm"] in equal}
        protocol.check_equal_budget({r["arm"]: r["config"] for r in runs if r["arm"] in equal})
        lines += ["## Equal budget", "",
                  f"configs/sst2.py per strategy (learning rate head 2e-3, partial and full 1e-4), {steps.pop()} "
                  "steps of 32 for every strategy, best checkpoint chosen on 10% of the training sentences "
                  "(drawn with the seed), SST-2 dev (872 sentences) scored once on it.", ""]
        lines += markdown_table(["arm", "runs", "SST-2 dev accuracy (%)", "STS-B after", "STS-B drop"],
                                summary_rows(runs, equal, ACCURACY["equal"])) + [""]
        pairs = [("equal_full", "equal_partial"), ("equal_full", "equal_head"), ("equal_partial", "equal_head")]
        acc, drop = protocol.by_arm(runs, ACCURACY["equal"]), protocol.by_arm(runs, DROP)
        rows = [[f"{a} - {b}", protocol.paired(acc[a], acc[b]).format(scale=100, digits=1),
                 protocol.paired(drop[a], drop[b]).format(digits=3)] for a, b in pairs if a in acc and b in acc]
        if rows:
            lines += ["Paired differences (same seed):", ""]
            lines += markdown_table(["arms", "accuracy (points)", "STS-B drop"], rows) + [""]
    peer = [a for s in STRATEGIES for a in (f"peer_sftjax_{s}", f"peer_sftjax_random_{s}", f"peer_torch_{s}")
            if any(r["arm"] == a for r in runs)]
    if peer:
        lines += ["## The peer's budget", "",
                  "The recipe of peer_torch.py: 8,000 training sentences (shuffled with the seed), one epoch of 32 "
                  "(250 steps), at most 64 tokens, AdamW (weight decay 0.01, biases and norms undecayed), linear "
                  "warm-up over 10% then linear decay, clipping 1.0, learning rate head 1e-3, partial and full "
                  "5e-5, mean pooling into one linear layer; the final model scored. `peer_sftjax`: sft_jax's "
                  "command line with those settings (no head dropout); `peer_sftjax_random`: the same with batches "
                  "of random examples (data.group_window=1) instead of sft_jax's default windows of 50 batches "
                  "sorted by length; `peer_torch`: PyTorch + transformers alone, same seeds (the seeds draw "
                  "different subsets and orders in sft_jax and PyTorch).", ""]
        lines += markdown_table(["arm", "runs", "SST-2 dev accuracy (%)", "STS-B after", "STS-B drop"],
                                summary_rows(runs, peer, ACCURACY["peer"])) + [""]
        acc, drop = protocol.by_arm(runs, ACCURACY["peer"]), protocol.by_arm(runs, DROP)
        rows = [[f"{s}: random - sorted batches", protocol.paired(acc[a], acc[b]).format(scale=100, digits=1),
                 protocol.paired(drop[a], drop[b]).format(digits=3)]
                for s in STRATEGIES for a, b in [(f"peer_sftjax_random_{s}", f"peer_sftjax_{s}")]
                if a in acc and b in acc]
        if rows:
            lines += ["sft_jax's batches, paired by seed (the same 8,000 examples, batched differently):", ""]
            lines += markdown_table(["arms", "accuracy (points)", "STS-B drop"], rows) + [""]
        lines += ["The figures issue 28 quotes for the peer (one run each): "
                  + "; ".join(f"{s} {100 * a:.1f}%, STS-B 0.867 -> {b:.3f}" for s, (a, b) in QUOTED.items())
                  + ".", ""]
    lines += ["![accuracy vs STS-B drop](accuracy_vs_forgetting.png)", "", "Commands (seed 0 of each arm):", ""]
    lines += [f"    {r['provenance']['command']}" for r in runs if r["seed"] == 0]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for arm in sorted({r["arm"] for r in runs}):
        mine = [r["results"] for r in runs if r["arm"] == arm]
        key = ACCURACY[arm.split("_", 1)[0]]
        ax.scatter([m[DROP] for m in mine], [100 * m[key] for m in mine], label=arm,
                   marker={"equal": "o", "peer": "s"}[arm.split("_", 1)[0]], alpha=0.8)
    ax.set_xlabel("STS-B Spearman drop (before - after)")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.set_title("all-MiniLM-L6-v2 on SST-2: each run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="equal,peer")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=EQUAL_STEPS, help="the equal budget's steps")
    p.add_argument("--report", action="store_true")
    args = p.parse_args()
    if not args.report:
        for seed in (int(s) for s in args.seeds.split(",")):  # seeds outermost: a cut-short run has every arm
            for strategy in args.strategies.split(","):
                for budget in args.budgets.split(","):
                    if budget == "equal":
                        done = [("equal", *equal_run(strategy, seed, args.steps))]
                    elif budget == "peer_random":
                        done = [("peer_sftjax_random", *peer_random_run(strategy, seed))]
                    else:
                        done = [("peer_sftjax", *peer_sft_jax_run(strategy, seed)),
                                ("peer_torch", *peer_torch_run(strategy, seed))]
                    for arm, workdir, command in done:
                        protocol.keep_run(workdir, HERE, f"{arm}_{strategy}", seed, command)
    protocol.write_results(HERE, report, plot, "accuracy_vs_forgetting.png")


if __name__ == "__main__":
    main()
