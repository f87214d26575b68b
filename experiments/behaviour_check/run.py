"""Short CLI runs of every task family and forgetting method, for checking that a refactor changes nothing.

    python -m experiments.behaviour_check.run --out=after.json [--repo=PATH_OF_ANOTHER_CHECKOUT]

Each run is `python -m sft_jax.main` on real models and real data (../shared/data) for a few steps; the output
holds each run's results.json without its timing keys. Two outputs (say, of the commits before and after a
refactor, on one machine) are compared with `--compare=A.json,B.json [--report=RESULTS.md]`: equal
`params_fingerprint`s mean bit-identical trained parameters, and every other metric must match too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
TIMING = ("train/examples_per_s", "train/tokens_per_s", "train/wall_time_s")

_TEXT = {"data.max_train_examples": 256, "max_steps": 4, "warmup_steps": 1, "eval_every": 2,
         "checkpoint_every": 2, "log_every": 1, "batch_size": 8, "eval_batch_size": 64}
_LM = {"max_steps": 3, "warmup_steps": 1, "eval_every": 3, "checkpoint_every": 3, "log_every": 1,
       "batch_size": 2, "eval_batch_size": 4, "max_length": 128, "buckets": "(128,)"}
_IMAGES = {"max_steps": 4, "warmup_steps": 1, "eval_every": 2, "checkpoint_every": 2, "log_every": 1,
           "batch_size": 16, "eval_batch_size": 50}


def runs(base_dir: str) -> list[tuple[str, str, dict]]:
    """(name, config, overrides) of each run; `base_dir` holds the workdirs (the image transfer needs one)."""
    wiki = os.path.join(DATA, "wikitext2_raw", "wiki.test.raw")
    cifar = os.path.join(DATA, "cifar10", "test")
    sst2 = {"data.train": os.path.join(DATA, "sst2", "train.tsv"), "data.eval": os.path.join(DATA, "sst2", "dev.tsv"),
            "forgetting.stsb": os.path.join(DATA, "stsb", "dev.tsv")}
    gsm8k = {"data.train": os.path.join(DATA, "gsm8k", "train.jsonl"),
             "data.eval": os.path.join(DATA, "gsm8k", "test.jsonl"), "data.max_eval_examples": 8,
             "data.max_train_examples": 64, "eval_generation.metrics": "('exact_match',)",
             "eval_generation.num_examples": 4, "eval_generation.max_new_tokens": 12,
             "eval_generation.batch_size": 4}
    return [
        ("text_partial", "configs/sst2.py:partial", {**_TEXT, **sst2}),
        ("text_ewc", "configs/sst2.py:full", {**_TEXT, **sst2, "regularizer.ewc": 100.0,
                                              "regularizer.fisher_data": wiki, "regularizer.fisher_batches": 2,
                                              "regularizer.fisher_batch_size": 4}),
        ("text_lpft_wiseft", "configs/sst2.py:full", {**_TEXT, **sst2, "lp_ft.head_steps": 2,
                                                      "wise_ft.alphas": "(0.5,)"}),
        ("lm_partial", "configs/shakespeare_lm.py:partial", {**_LM, "forgetting.wikitext2_max_tokens": 1024}),
        ("sft_lora", "configs/gsm8k_smollm2.py:lora", {**_LM, **gsm8k, "packing": False,
                                                       "eval_batch_size": 4}),
        ("image_base", "configs/cifar_pretrain.py", {**_IMAGES, "data.train": f"{cifar}[:40]",
                                                     "data.eval": f"{cifar}[980:]"}),
        ("image_transfer", "configs/cifar_transfer.py:partial,10",
         {**_IMAGES, "model": os.path.join(base_dir, "image_base"), "data.train": f"{cifar}[:20]",
          "data.eval": f"{cifar}[980:]", "forgetting.images": f"{cifar}[990:]", "wise_ft.alphas": "(0.5,)"}),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", default=ROOT, help="checkout whose sft_jax runs (its configs/ are used)")
    p.add_argument("--out", help="where to write {run: results}")
    p.add_argument("--only", default="", help="comma-separated run names (default: all)")
    p.add_argument("--compare", default="", help="A.json,B.json: print the differences and exit")
    p.add_argument("--report", default="", help="with --compare: also write the table to this markdown file")
    args = p.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare.split(","), report=args.report))
    base_dir = tempfile.mkdtemp(prefix="behaviour_check_")
    out = {}
    if args.out and args.only and os.path.exists(args.out):  # add these runs to an earlier output
        with open(args.out) as f:
            out = json.load(f)
    env = {**os.environ, "PYTHONPATH": args.repo}
    for name, config, overrides in runs(base_dir):
        if args.only and name not in args.only.split(","):
            continue
        workdir = os.path.join(base_dir, name)
        cmd = [sys.executable, "-m", "sft_jax.main", f"--config={config}", f"--workdir={workdir}"]
        cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
        print(f"[{name}]", " ".join(cmd[1:]), flush=True)
        start = time.time()
        subprocess.run(cmd, cwd=args.repo, env=env, check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(workdir, "results.json")) as f:
            results = json.load(f)
        out[name] = {k: v for k, v in results.items() if k not in TIMING}
        print(f"[{name}] {time.time() - start:.0f}s params_fingerprint={results['params_fingerprint']}", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1, sort_keys=True)
    shutil.rmtree(base_dir, ignore_errors=True)


def compare(path_a: str, path_b: str, report: str = "") -> int:
    with open(path_a) as f:
        a = json.load(f)
    with open(path_b) as f:
        b = json.load(f)
    rows, bad = [], 0
    for name in sorted(set(a) | set(b)):
        ra, rb = a.get(name, {}), b.get(name, {})
        diff = {k: (ra.get(k), rb.get(k)) for k in sorted(set(ra) | set(rb)) if ra.get(k) != rb.get(k)}
        rows.append((name, ra.get("params_fingerprint"), rb.get("params_fingerprint"), len(ra), diff))
        print(f"{name}: {'same' if not diff else f'{len(diff)} differ'} (params_fingerprint "
              f"{ra.get('params_fingerprint')} / {rb.get('params_fingerprint')})")
        for k, (va, vb) in diff.items():
            print(f"  {k}: {va} -> {vb}")
        bad += bool(diff)
    if report:
        lines = [f"| run | params_fingerprint ({os.path.basename(path_a)}) | ({os.path.basename(path_b)}) | "
                 "results keys | keys that differ |", "|---|---|---|---|---|"]
        lines += [f"| {n} | `{fa}` | `{fb}` | {count} | {', '.join(d) or 'none'} |" for n, fa, fb, count, d in rows]
        with open(report, "w") as f:
            f.write("\n".join(lines) + "\n")
    return int(bad > 0)


if __name__ == "__main__":
    main()
