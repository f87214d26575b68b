"""XSum one-sentence summaries with SmolLM2-135M-Instruct: lora vs partial vs full under one CPU-time budget,
scored by ROUGE on held-out articles, with WikiText-2 perplexity before/after as the forgetting measure.

    python -m experiments.xsum_summarization.run [--budget=420] [--strategies=lora,partial,full]

Every strategy trains for the same wall-clock budget of training steps (`max_train_seconds`, evaluation
excluded) at a constant learning rate after warmup, then is evaluated once. The `base` row is the untouched
model through the same evaluation (one step at learning rate 0). Workdirs go to workdirs/ (ignored by git).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from experiments.common import budget_runs, markdown_table

HERE = os.path.dirname(os.path.abspath(__file__))
COMMON = {"data.max_eval_examples": 48, "eval_generation.num_examples": 32, "schedule": "constant",
          "warmup_steps": 10, "log_every": 5}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=420.0, help="training seconds per strategy")
    parser.add_argument("--strategies", default="lora,partial,full")
    args = parser.parse_args()
    rows = budget_runs("configs/xsum_smollm2.py", HERE, args.strategies.split(","), args.budget, COMMON)
    write_report(rows, " ".join(["python -m experiments.xsum_summarization.run", *sys.argv[1:]]), args.budget)


def write_report(rows: list[dict], command: str, budget: float) -> None:
    with open(os.path.join(HERE, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in rows:
        x, y = r["forgetting/wikitext2_ppl/rise"], r["eval/rougeL"]
        ax.scatter(x, y, s=60)
        ax.annotate(r["strategy"], (x, y), textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("WikiText-2 perplexity rise (after - before)")
    ax.set_ylabel("ROUGE-L on held-out XSum")
    ax.set_title(f"SmolLM2-135M on XSum, {budget:.0f} s of training each")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "rouge_vs_forgetting.png"), dpi=120)

    table = markdown_table(
        ["strategy", "trainable params", "steps", "train tokens/s", "eval loss", "ROUGE-1", "ROUGE-2", "ROUGE-L",
         "WikiText-2 ppl before", "after", "rise", "wall (s)"],
        [[r["strategy"], f"{r['trainable_params']:,}", r["step"],
          f"{r.get('train/tokens_per_s', 0):.0f}" if r["strategy"] != "base" else "-",
          f"{r['eval/loss']:.4f}", f"{r['eval/rouge1']:.2f}", f"{r['eval/rouge2']:.2f}", f"{r['eval/rougeL']:.2f}",
          f"{r['forgetting/wikitext2_ppl/before']:.2f}", f"{r['forgetting/wikitext2_ppl/after']:.2f}",
          f"{r['forgetting/wikitext2_ppl/rise']:+.2f}", f"{r['process_wall_s']:.0f}"] for r in rows])
    lines = ["# XSum summarization: LoRA vs partial vs full fine-tuning of SmolLM2-135M-Instruct", "",
             f"Produced by `{command}` on this machine (2 CPU cores, float32).", "",
             "Data: the 1,000 XSum test articles in ../shared/data/xsum; the first 900 train, the last 100 are "
             "held out (eval loss on the first 48 of them; ROUGE (rouge-score, stemmed F1 x100) of greedy "
             "generations, at most 48 new tokens, on the first 32). Prompt: a chat turn \"Summarize this article "
             "in one sentence.\" + the article, cut to fit 512 tokens; loss on the summary tokens only. "
             f"Each strategy trains for {budget:.0f} s (batch 8, AdamW, constant learning rate after 10 warmup "
             "steps: lora 5e-4 with rank 8 on all projections, partial 5e-5 with the first 20 of 30 blocks "
             "frozen, full 3e-5). Forgetting: WikiText-2 raw test perplexity (first 16,384 tokens, windows of "
             "512), before and after. `train tokens/s`: non-padding tokens per second of training "
             "(compilation included).", ""]
    lines += table
    lines += ["", "![ROUGE-L vs perplexity rise](rouge_vs_forgetting.png)", "", "Commands:", ""]
    lines += [f"    {r['command']}" for r in rows]
    lines.append("")
    with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
