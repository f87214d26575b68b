"""SFT on one task's plain input-output pairs vs instruction fine-tuning (IFT) on a balanced task mixture, both
from the same base model (Gemma 3 270M, not instruction-tuned), under the experiment protocol.

    PYTHONPATH=. python -m experiments.sft_vs_ift.run [--steps=330] [--seeds=0,1,2] [--pairs=2000]
    PYTHONPATH=. python -m experiments.sft_vs_ift.run --report

Arms (configs/gemma3_sft.py:full, the same steps, batch, schedule and seeds):
  sft  the first --pairs Multi30k English->French pairs as plain text, "{english}\\n" -> "{french}"
  ift  a mixture of two sources, drawn with equal weight row by row (sft_jax/data/mixture.py): the same pairs
       behind a translation instruction, and the first 150 Self-Instruct seed tasks, all in one Alpaca-style
       instruction template
Each tuned model is scored in the format it was trained in (its intended format); the base model in the plain
format (a base model continues text) and in the instruction format. Every model is also scored in the other
format, and on held-out instructions, since those show what each kind of tuning does and does not teach:
  translation  the first NUM_EVAL Multi30k val pairs, greedy, first line of the output   BLEU (sacreBLEU)
  held-out     Self-Instruct seed tasks 150..174 (never trained on), instruction format    ROUGE-L
Nothing is selected: the final model of each run is scored once. The WikiText-2 probe is the shared one
(configs.common.WIKITEXT2_PROBE). Workdirs and the written data go to workdirs/ (ignored by git); each run's
config, results, metrics and scores (generation.json) are kept with the code version under runs/ARM/seed_SEED,
the base model's scores in base.json, and RESULTS.md and the plot are made from those files only.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os

from experiments import protocol
from experiments.common import ROOT, cli_command, markdown_table, run_cli

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(HERE, "workdirs")
DATA = os.path.join(ROOT, "..", "shared", "data")
CONFIG = "configs/gemma3_sft.py:full"
ARMS = ("sft", "ift")
INSTRUCTION = "Translate the following sentence into French."
PLAIN_TEMPLATE = "{input}\n"
HELD_OUT_FROM = 150  # seed tasks 150..174 are never trained on
NUM_EVAL = 48
INTENDED = {"base": "plain", "sft": "plain", "ift": "instruction"}
SCORES = (("plain", "translation, plain format (BLEU)"), ("instruction", "translation, instruction format (BLEU)"),
          ("held_out", "held-out instructions (ROUGE-L)"))


def _lines(name: str) -> list[str]:
    with gzip.open(os.path.join(DATA, "multi30k", name), "rt", encoding="utf-8") as f:
        return f.read().splitlines()


def write_data(pairs: int) -> dict[str, str]:
    """The training and evaluation files of both arms, under workdirs/; returns their paths."""
    os.makedirs(WORK, exist_ok=True)
    en, fr = _lines("train.en.gz")[:pairs], _lines("train.fr.gz")[:pairs]
    val_en, val_fr = _lines("val.en.gz")[:NUM_EVAL], _lines("val.fr.gz")[:NUM_EVAL]
    with open(os.path.join(DATA, "self_instruct_seed", "seed_tasks.jsonl")) as f:
        tasks = [json.loads(line) for line in f]
    paths = {k: os.path.join(WORK, f"{k}.jsonl") for k in (
        "sft_train", "ift_translate", "ift_tasks", "plain_val", "instruction_val", "held_out")}
    records = {
        "sft_train": [{"input": e, "output": t} for e, t in zip(en, fr)],
        "ift_translate": [{"instruction": INSTRUCTION, "input": e, "output": t} for e, t in zip(en, fr)],
        "ift_tasks": [{"instruction": s["instruction"], "instances": s["instances"]} for s in tasks[:HELD_OUT_FROM]],
        "plain_val": [{"input": e, "output": t} for e, t in zip(val_en, val_fr)],
        "instruction_val": [{"instruction": INSTRUCTION, "input": e, "output": t} for e, t in zip(val_en, val_fr)],
        "held_out": [{"instruction": s["instruction"], "instances": s["instances"][:1]}
                     for s in tasks[HELD_OUT_FROM:]],
    }
    for key, rows in records.items():
        with open(paths[key], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return paths


def arm_overrides(arm: str, paths: dict[str, str], seed: int, steps: int) -> dict:
    common = {"seed": seed, "max_steps": steps, "warmup_steps": max(1, min(30, steps // 10)), "eval_every": steps,
              "checkpoint_every": steps, "early_stopping.patience": 0}
    if arm == "sft":  # a real newline in the argument, not "\\n"
        return {**common, "data.train": paths["sft_train"], "data.eval": paths["plain_val"],
                "prompt.template": PLAIN_TEMPLATE}
    mixture = tuple({"train": paths[k], "weight": 1.0, "name": k} for k in ("ift_translate", "ift_tasks"))
    return {**common, "data.mixture": repr(mixture), "data.eval": paths["instruction_val"]}


def evaluate(model: str | None, workdir: str | None, paths: dict[str, str]) -> dict:
    """Greedy generations of one model (`model` untouched, or the run in `workdir`) on the three evaluation
    sets: {"plain", "instruction", "held_out"} scores and two samples of each."""
    from sft_jax.data import sft
    from sft_jax.evaluate import text_metrics
    from sft_jax.generate import generate_ids
    from sft_jax.state import ModelDef
    from sft_jax.tasks.language_model import load_lm

    lm, tok = load_lm(model, workdir)
    model_def, params = ModelDef.split(lm)
    eos = sorted(set(lm.config.eos_ids) | {tok.eos_token_id})
    out, samples = {}, {}
    cases = [("plain", "plain_val", sft.PromptFormat(template=PLAIN_TEMPLATE), 48, "bleu"),
             ("instruction", "instruction_val", sft.PromptFormat(), 48, "bleu"),
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
                # A translation is one line: a model that keeps going is cut there, every model alike.
                preds.append(text.split("\n")[0].strip() if metric == "bleu" else text)
        refs = [sft.reference_output(r) for r in records]
        scores = text_metrics.compute([metric], preds, refs)
        out[name] = scores["bleu"] if metric == "bleu" else scores["rougeL"]
        samples[name] = [{"prompt": tok.decode(prompts[i]), "prediction": preds[i], "reference": refs[i]}
                         for i in range(2)]
    return {**out, "samples": samples}


def run_arm(arm: str, seed: int, steps: int, paths: dict[str, str]) -> None:
    """Trains (or reads back) one run, scores it, and keeps its files with generation.json."""
    workdir = os.path.join(WORK, f"{arm}_s{seed}")
    overrides = arm_overrides(arm, paths, seed, steps)
    if protocol.kept_results(HERE, arm, seed, cli_command(CONFIG, workdir, overrides)) is not None:
        print(f"kept already: {arm} seed {seed}", flush=True)  # by an earlier session, generation.json with it
        return
    results = run_cli(CONFIG, workdir, overrides)
    scores_path = os.path.join(workdir, "generation.json")
    if not os.path.exists(scores_path):
        _write_json(scores_path, evaluate(None, workdir, paths))
    protocol.keep_run(workdir, HERE, arm, seed, results["command"],
                      files=protocol.RUN_FILES + ("generation.json",))


def evaluate_base(paths: dict[str, str]) -> None:
    """base.json: the untouched model's scores (greedy decoding: one evaluation, no seed), with the code version."""
    path = os.path.join(HERE, "base.json")
    if os.path.exists(path):
        return
    from configs.gemma3_sft import get_config

    model = get_config().model
    _write_json(path, {"model": model, **evaluate(model, None, paths), **protocol.code_version()})


def _write_json(path: str, value: dict) -> None:
    """Written whole or not at all: a file that exists is a finished evaluation (a rerun skips it)."""
    with open(path + ".partial", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".partial", path)


def scores(run: dict) -> dict:
    with open(os.path.join(protocol.run_dir(HERE, run["arm"], run["seed"]), "generation.json")) as f:
        return json.load(f)


def report(runs: list[dict]) -> str:
    protocol.check_equal_budget({f"{r['arm']}_{r['seed']}": r["config"] for r in runs})
    with open(os.path.join(HERE, "base.json")) as f:
        base = json.load(f)
    steps = runs[0]["config"]["max_steps"]
    c = runs[0]["config"]
    lines = ["# SFT on plain pairs vs instruction tuning on a task mixture, from a base model", "",
             "Made by `python -m experiments.sft_vs_ift.run` from the kept runs in runs/ and base.json only. "
             f"Both arms: full fine-tuning for {steps} steps of {c['batch_size']} (AdamW {c['learning_rate']:g}, "
             f"{c['warmup_steps']} warm-up steps then {c['schedule']}, {c['dtype']} matmuls). `sft`: Multi30k "
             "English->French pairs as plain text. `ift`: the same pairs behind a translation instruction and 150 "
             "Self-Instruct seed tasks, drawn with equal weight (about half of the rows each), in an Alpaca-style "
             f"template. Translation: BLEU on the first {NUM_EVAL} Multi30k val pairs (greedy, first line of the "
             "output); held-out: ROUGE-L on Self-Instruct seed tasks 150-174, never trained on. The final model "
             "of each run is scored once. Cells: mean ± half-width of the 95% t-interval [interval] (n).", "",
             protocol.decoder_line(runs), "", protocol.provenance_line(runs), ""]
    by = {arm: {r["seed"]: scores(r) for r in runs if r["arm"] == arm} for arm in ARMS}
    lines += ["## Each model in its intended format", ""]
    rows = [["base (no tuning)", f"plain: {base['plain']:.2f}", f"{base['held_out']:.2f}", "-"]]
    ppl = protocol.summarize([r["results"]["forgetting/wikitext2_ppl/before"] for r in runs]).mean
    for arm in ARMS:
        if by[arm]:
            fmt = INTENDED[arm]
            mine = [r["results"]["forgetting/wikitext2_ppl/after"] for r in runs if r["arm"] == arm]
            rows.append([arm, f"{fmt}: " + protocol.summarize([s[fmt] for s in by[arm].values()]).format(digits=2),
                         protocol.summarize([s["held_out"] for s in by[arm].values()]).format(digits=2),
                         protocol.summarize(mine).format(digits=2)])
    lines += markdown_table(["model", "translation BLEU (format)", "held-out ROUGE-L",
                             f"WikiText-2 ppl after (before: {ppl:.2f})"], rows) + [""]
    if by["sft"] and by["ift"]:
        diffs = [["ift - sft, translation in each one's format",
                  protocol.paired({s: v["instruction"] for s, v in by["ift"].items()},
                                  {s: v["plain"] for s, v in by["sft"].items()}).format(digits=2)],
                 ["ift - sft, held-out ROUGE-L", protocol.paired(
                     {s: v["held_out"] for s, v in by["ift"].items()},
                     {s: v["held_out"] for s, v in by["sft"].items()}).format(digits=2)]]
        lines += ["Paired by seed:", ""] + markdown_table(["difference", "points"], diffs) + [""]
    lines += ["## Every model in every format", "", "The cross-format cells show how far each kind of tuning "
              "binds a model to its format.", ""]
    rows = [["base (no tuning)"] + [f"{base[k]:.2f}" for k, _ in SCORES]]
    rows += [[arm] + [protocol.summarize([s[k] for s in by[arm].values()]).format(digits=2) for k, _ in SCORES]
             for arm in ARMS if by[arm]]
    lines += markdown_table(["model"] + [name for _, name in SCORES], rows) + [""]
    lines += ["![scores](sft_vs_ift.png)", "", "Sample generations are in each run's generation.json. Commands "
              "(seed 0):", ""] + [f"    {r['provenance']['command']}" for r in runs if r["seed"] == 0]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    with open(os.path.join(HERE, "base.json")) as f:
        base = json.load(f)
    models = [("base", [base])] + [(arm, [scores(r) for r in runs if r["arm"] == arm]) for arm in ARMS]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(models)
    for i, (name, score_list) in enumerate(models):
        means = [np.mean([s[k] for s in score_list]) for k, _ in SCORES]
        errors = [protocol.summarize([s[k] for s in score_list]).high - m if len(score_list) > 1 else 0
                  for (k, _), m in zip(SCORES, means)]
        ax.bar(np.arange(len(SCORES)) + i * width, means, width, yerr=errors, capsize=3, label=name)
    ax.set_xticks(np.arange(len(SCORES)) + width * (len(models) - 1) / 2, [n for _, n in SCORES], fontsize=8)
    ax.legend()
    ax.set_title("SFT vs instruction tuning from Gemma 3 270M (base); 95% intervals over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=330, help="optimizer steps per run (30 of them warm-up)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--pairs", type=int, default=2000, help="Multi30k training pairs")
    p.add_argument("--report", action="store_true")
    args = p.parse_args()
    if not args.report:
        paths = write_data(args.pairs)
        evaluate_base(paths)
        for seed in (int(s) for s in args.seeds.split(",")):  # seeds outermost: a cut-short run has both arms
            for arm in ARMS:
                run_arm(arm, seed, args.steps, paths)
    protocol.write_results(HERE, report, plot, "sft_vs_ift.png")


if __name__ == "__main__":
    main()
