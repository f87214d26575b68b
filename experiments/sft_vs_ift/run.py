"""SFT on plain input-output pairs vs instruction fine-tuning (IFT), same model, same compute.

    python -m experiments.sft_vs_ift.run [--budget=300] [--pairs=2000]

Both runs fully fine-tune SmolLM2-135M-Instruct on the same English->French Multi30k pairs for the same
training time. `sft` sees each pair as plain text, "{english}\\n" -> "{french}". `ift` sees the pair behind an
instruction ("Translate the following sentence into French.") in an Alpaca-style template, mixed with the first
150 Self-Instruct seed tasks. Each model (and the untouched base) is then evaluated by greedy generation on:
  plain        Multi30k val pairs in the plain format              BLEU (sacreBLEU)
  instruction  the same pairs behind the translation instruction   BLEU
  held-out     the last 25 Self-Instruct seed tasks (unseen)       ROUGE-L against their reference outputs
Training data files and workdirs go to workdirs/ (ignored by git).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys

from experiments.common import ROOT, markdown_table, run_cli

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(HERE, "workdirs")
DATA = os.path.join(ROOT, "..", "shared", "data")
INSTRUCTION = "Translate the following sentence into French."
PLAIN_TEMPLATE = "{input}\n"
HELD_OUT_FROM = 150  # seed tasks 150..174 are never trained on
NUM_EVAL = 48


def _lines(name: str) -> list[str]:
    with gzip.open(os.path.join(DATA, "multi30k", name), "rt", encoding="utf-8") as f:
        return f.read().splitlines()


def write_data(pairs: int) -> dict[str, str]:
    os.makedirs(WORK, exist_ok=True)
    en, fr = _lines("train.en.gz")[:pairs], _lines("train.fr.gz")[:pairs]
    val_en, val_fr = _lines("val.en.gz")[:NUM_EVAL], _lines("val.fr.gz")[:NUM_EVAL]
    with open(os.path.join(DATA, "self_instruct_seed", "seed_tasks.jsonl")) as f:
        seeds = [json.loads(line) for line in f]
    paths = {k: os.path.join(WORK, f"{k}.jsonl") for k in ("sft_train", "ift_train", "sft_val", "ift_val", "held_out")}

    def dump(key, records):
        with open(paths[key], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    dump("sft_train", [{"input": e, "output": t} for e, t in zip(en, fr)])
    dump("ift_train", [{"instruction": INSTRUCTION, "input": e, "output": t} for e, t in zip(en, fr)]
         + [{"instruction": s["instruction"], "instances": s["instances"]} for s in seeds[:HELD_OUT_FROM]])
    dump("sft_val", [{"input": e, "output": t} for e, t in zip(val_en, val_fr)])
    dump("ift_val", [{"instruction": INSTRUCTION, "input": e, "output": t} for e, t in zip(val_en, val_fr)])
    dump("held_out", [{"instruction": s["instruction"], "instances": s["instances"][:1]}
                      for s in seeds[HELD_OUT_FROM:]])
    return paths


def evaluate(workdir: str | None, paths: dict[str, str]) -> dict[str, float]:
    """Greedy generations of one model on the three evaluation sets, and their scores."""
    from sft_jax.data import sft
    from sft_jax.evaluate import text_metrics
    from sft_jax.generate import generate_ids
    from sft_jax.state import ModelDef
    from sft_jax.tasks.language_model import load_lm

    model, tok = load_lm("smollm2-135m-instruct" if workdir is None else None, workdir)
    model_def, params = ModelDef.split(model)
    eos = sorted(set(model.config.eos_ids) | {tok.eos_token_id})
    out, samples = {}, {}
    cases = [("plain", "sft_val", sft.PromptFormat(template=PLAIN_TEMPLATE), 48, "bleu"),
             ("instruction", "ift_val", sft.PromptFormat(), 48, "bleu"),
             ("held_out", "held_out", sft.PromptFormat(), 96, "rouge")]
    for name, key, fmt, max_new, metric in cases:
        records = sft.read_sft(paths[key])
        prompts = [sft.encode_prompt(r, tok, fmt, 384) for r in records]
        preds = []
        for start in range(0, len(prompts), 16):
            chunk = prompts[start: start + 16]
            tokens, lengths = generate_ids(model_def, params, chunk + [chunk[-1]] * (16 - len(chunk)),
                                           max_new_tokens=max_new, eos_ids=eos, pad_id=tok.pad_token_id)
            for i in range(len(chunk)):
                text = tok.decode(tokens[i, : lengths[i]].tolist(), skip_special_tokens=True).strip()
                # Translations are one line: a model that keeps going after it is cut there, for every model.
                preds.append(text.split("\n")[0].strip() if metric == "bleu" else text)
        refs = [sft.reference_output(r) for r in records]
        scores = text_metrics.compute([metric], preds, refs)
        out[name] = scores["bleu"] if metric == "bleu" else scores["rougeL"]
        samples[name] = [{"prompt": tok.decode(prompts[i]), "prediction": preds[i], "reference": refs[i]}
                         for i in range(2)]
    return {**out, "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=300.0, help="training seconds per run")
    parser.add_argument("--steps", type=int, default=0,
                        help="> 0: train this many steps per run instead of a time budget (equal compute that "
                             "does not depend on what else the machine is doing)")
    parser.add_argument("--pairs", type=int, default=2000, help="Multi30k training pairs")
    args = parser.parse_args()
    paths = write_data(args.pairs)
    budget = {"max_steps": args.steps} if args.steps else {"max_train_seconds": args.budget, "max_steps": 100000}
    common = {**budget, "eval_every": 100000, "checkpoint_every": 100,
              "schedule": "constant", "warmup_steps": 10, "data.max_eval_examples": NUM_EVAL, "packing": True,
              "max_length": 256, "buckets": "(256,)", "eval_generation.metrics": "()",
              "forgetting.wikitext2_max_tokens": 8192, "log_every": 5, "prompt.chat": False,
              "data.input_field": "input", "data.output_field": "output"}
    rows = [{"model": "base (no tuning)", **evaluate(None, paths)}]
    for name, template in (("sft", PLAIN_TEMPLATE), ("ift", None)):
        overrides = {**common, "data.train": paths[f"{name}_train"], "data.eval": paths[f"{name}_val"]}
        if template:
            overrides["prompt.template"] = template  # a real newline in the argument, not "\\n"
        workdir = os.path.join(WORK, name)
        r = run_cli("configs/xsum_smollm2.py:full", workdir, overrides)
        rows.append({"model": name, **evaluate(workdir, paths), "steps": r["step"],
                     "train_examples": r["train_examples"], "ppl_before": r["forgetting/wikitext2_ppl/before"],
                     "ppl_after": r["forgetting/wikitext2_ppl/after"], "command": r["command"]})
    write_report(rows, " ".join(["python -m experiments.sft_vs_ift.run", *sys.argv[1:]]), args)


def write_report(rows: list[dict], command: str, args) -> None:
    with open(os.path.join(HERE, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    names = ["plain", "instruction", "held_out"]
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.bar(np.arange(3) + i * width, [r[n] for n in names], width, label=r["model"])
    ax.set_xticks(np.arange(3) + width * (len(rows) - 1) / 2,
                  ["plain pairs (BLEU)", "instruction pairs (BLEU)", "held-out tasks (ROUGE-L)"])
    ax.legend()
    ax.set_title("SFT on plain pairs vs instruction tuning (SmolLM2-135M)")
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "sft_vs_ift.png"), dpi=120)
    table = markdown_table(
        ["model", "plain-format BLEU", "instruction-format BLEU", "held-out instructions ROUGE-L", "steps",
         "WikiText-2 ppl (8k tokens) before -> after"],
        [[r["model"], f"{r['plain']:.2f}", f"{r['instruction']:.2f}", f"{r['held_out']:.2f}", r.get("steps", "-"),
          f"{r['ppl_before']:.2f} -> {r['ppl_after']:.2f}" if "ppl_after" in r else "-"] for r in rows])
    lines = ["# SFT on plain input-output pairs vs instruction fine-tuning", "",
             f"Produced by `{command}` on this machine (2 CPU cores, float32).", "",
             "Both runs: full fine-tuning of SmolLM2-135M-Instruct for "
             + (f"{args.steps} steps" if args.steps else f"{args.budget:.0f} s of training") + " (batch 8, "
             "AdamW 3e-5 constant after 10 warmup steps, packed rows of 256 tokens), on the first "
             f"{args.pairs} Multi30k English->French training pairs; `ift` also gets the first 150 Self-Instruct "
             "seed tasks, all behind an Alpaca-style instruction template. Evaluation by greedy generation on the "
             f"first {NUM_EVAL} Multi30k val pairs (BLEU, first line of the output) in each format, and on the 25 "
             "held-out Self-Instruct seed tasks (ROUGE-L vs their reference output).", ""]
    lines += table
    lines += ["", "![scores](sft_vs_ift.png)", "", "Sample generations are in results.json. Commands of the "
              "training runs:", ""]
    lines += [f"    {r['command']}" for r in rows if "command" in r]
    lines.append("")
    with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
