"""Issue 24's measured items: (A) QLoRA against bfloat16 LoRA, (B) AdamW moments in float32 / bfloat16 / 8 bits.

    python -m experiments.qlora_and_states.run --part=qlora  [--seeds=0,1,2] [--qlora_steps=40]
    python -m experiments.qlora_and_states.run --part=states [--seeds=0,1,2] [--states_steps=100]
    python -m experiments.qlora_and_states.run --part=report   # RESULTS.md, results.json and the plot only

Needs ../shared/data (xsum, sst2) and the installed SmolLM2-135M-Instruct / all-MiniLM-L6-v2 weights.

A. SmolLM2-135M-Instruct, LoRA (rank 8 on every attention and MLP projection) on XSum summaries
   (configs/xsum_smollm2.py: the first 900 of ../shared/data/xsum/xsum-1000.jsonl train, the last 100 are held
   out). Arms: `bf16` (param_dtype=bfloat16: the base stored in bfloat16), `int8` and `nf4` (quantize_base: the
   adapted projections' frozen kernels stored block-quantised, the rest of the base in bfloat16). Every arm
   computes in bfloat16 (config.dtype) and keeps its adapters in float32, so only the storage of the frozen
   base differs. Equal steps, same seeds (same adapter init and data order); one evaluation after the last step
   on all 100 held-out articles (eval loss, perplexity, next-token accuracy on the summary tokens).
B. all-MiniLM-L6-v2, full fine-tuning on SST-2 (configs/sst2.py:full). Arms: optimizer_state_dtype float32,
   bfloat16, int8. Equal steps, same seeds; one evaluation on the 872 dev sentences after the last step
   (nothing is selected on dev: no early stopping, no checkpoint choice).

Every training run is an ordinary CLI run (`python -m sft_jax.main ...`) in workdirs/<part>/<arm>_s<seed>; a
run that stopped part-way resumes from its checkpoint when the command is given again. What each run gave
(its overrides, command, code version, final metrics, step times and peak resident memory) is kept in
runs/<part>_<arm>_s<seed>.json, so finished runs are never repeated. Bytes are measured from the arrays a run
would hold (the stored parameters for A; the optimizer state for B) by building them in a child process of
this script (`--measure=PART:ARM`), kept in runs/bytes_<part>_<arm>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

import numpy as np

from experiments.common import ROOT, markdown_table

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = os.path.join(HERE, "runs")

QLORA_CONFIG = "configs/xsum_smollm2.py:lora"
STATES_CONFIG = "configs/sst2.py:full"
QLORA_ARMS = {"bf16": {"quantize_base": "none"}, "int8": {"quantize_base": "int8"},
              "nf4": {"quantize_base": "nf4"}}
STATES_ARMS = {"float32": {"optimizer_state_dtype": "float32"}, "bfloat16": {"optimizer_state_dtype": "bfloat16"},
               "int8": {"optimizer_state_dtype": "int8"}}
QLORA_BATCH, QLORA_LENGTH = 4, 256


def qlora_overrides(steps: int) -> dict:
    return {"param_dtype": "bfloat16", "dtype": "bfloat16", "max_length": QLORA_LENGTH,
            "buckets": (QLORA_LENGTH,), "batch_size": QLORA_BATCH, "max_steps": steps,
            "warmup_steps": max(1, steps // 10), "log_every": 1, "eval_every": steps, "checkpoint_every": 10,
            "early_stopping.patience": 0, "eval_batch_size": 8, "eval_generation.metrics": (),
            "forgetting.wikitext2": ""}


def states_overrides(steps: int) -> dict:
    return {"max_steps": steps, "warmup_steps": max(1, steps // 10), "log_every": 1, "eval_every": steps,
            "checkpoint_every": 50, "early_stopping.patience": 0, "forgetting.stsb": ""}


def code_version() -> dict:
    """The commit, and a hash of the uncommitted changes to the library and configs (others edit the tree)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout

    diff = git("diff", "HEAD", "--", "sft_jax", "configs")
    return {"git_rev": git("rev-parse", "HEAD").strip(),
            "uncommitted_library_diff_sha1": hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None}


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return f"{names[0]} x {len(names)} logical CPUs" if names else "unknown"


def run_child(cmd: list[str]) -> dict:
    """Runs `cmd` (output straight through), returning its wall time and peak resident set size."""
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return {"process_wall_s": time.time() - start, "peak_rss_mb": usage.ru_maxrss / 1024}


def step_times(workdir: str, batch: int) -> list[float]:
    """Seconds of each training step, from the cumulative examples/s the loop logs every step (its clock
    excludes evaluation): step 1 includes compilation."""
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    ends = {r["step"]: r["step"] * batch / r["train/examples_per_s"] for r in rows if "train/examples_per_s" in r}
    steps = sorted(ends)
    return [ends[s] - ends.get(s - 1, 0.0) for s in steps if s - 1 in ends or s == 1]


def train_run(part: str, arm: str, seed: int, config: str, overrides: dict, batch: int) -> dict:
    name = f"{part}_{arm}_s{seed}"
    record_path = os.path.join(RUNS, name + ".json")
    if os.path.exists(record_path):
        with open(record_path) as f:
            record = json.load(f)
        print(f"reusing {os.path.relpath(record_path, ROOT)}", flush=True)
        return record
    workdir = os.path.join(HERE, "workdirs", part, f"{arm}_s{seed}")
    resumed = os.path.exists(os.path.join(workdir, "checkpoints"))
    cmd = [sys.executable, "-m", "sft_jax.main", f"--config={config}", f"--workdir={workdir}"]
    cmd += [f"--config.{k}={v}" for k, v in overrides.items()]  # tuples as Python literals: "(256,)", "()"
    version = code_version()
    proc = run_child(cmd)
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    times = step_times(workdir, batch)
    record = {"part": part, "arm": arm, "seed": seed, "config": config, "overrides": overrides,
              "command": "python " + shlex.join(cmd[1:]).replace(ROOT + "/", ""), **version, "cpu": cpu_model(),
              "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), "resumed": resumed,
              "step_times_s": times, **proc, "results": results}
    os.makedirs(RUNS, exist_ok=True)
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)
    return record


# --- bytes, measured from the arrays (in a child process: `--measure=PART:ARM`) ---------------------------------

def _config(spec: str, overrides: dict):
    """The config a CLI run gets from `--config=spec --config.K=V ...`."""
    import importlib
    path, _, arg = spec.partition(":")
    c = importlib.import_module(path[:-3].replace("/", ".")).get_config(arg or None)
    c.update_from_flattened_dict(overrides)
    return c


def _nbytes(tree) -> int:
    import jax
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def measure_qlora(arm: str) -> dict:
    """Bytes of the stored parameters of an A run, grouped: the adapted projections' frozen kernels (quantised
    or bfloat16), the rest of the frozen base (embeddings, norms), the LoRA adapters."""
    import tempfile

    from sft_jax import tasks
    from sft_jax.rundir import RunDir
    from sft_jax.trainer import setup
    c = _config(QLORA_CONFIG, {**qlora_overrides(1), **QLORA_ARMS[arm], "data.max_train_examples": 8,
                               "data.max_eval_examples": 8})
    with tempfile.TemporaryDirectory() as tmp:
        task = tasks.get(c.task)(c, RunDir(tmp))
    params = setup.in_storage_dtype(task.params, c.param_dtype, task.layout)
    adapted = sorted(n[: -len("/lora_a")] for n in params if n.endswith("/lora_a"))
    groups = {"projections": [0, 0], "other_base": [0, 0], "lora": [0, 0]}  # [bytes, weights]
    for name, value in params.items():
        prefix = name.rsplit("/", 2)[0] if name.endswith(("/codes", "/absmax", "/absmax_step")) else \
            name.rsplit("/", 1)[0]
        nbytes = value.size * value.dtype.itemsize
        if name.endswith(("/lora_a", "/lora_b")):
            group, weights = "lora", value.size
        elif prefix in adapted:
            group = "projections"
            if name.endswith("/codes"):  # nf4 packs two weights a byte along the output
                weights = value.size * (2 if c.quantize_base == "nf4" else 1)
            elif name.endswith("/kernel"):
                weights = value.size
            else:
                weights = 0  # absmax, absmax_step: overhead of the weights counted with the codes
        else:
            group, weights = "other_base", value.size
        groups[group][0] += nbytes
        groups[group][1] += weights
    out = {f"{g}_{k}": v for g, (b, w) in groups.items() for k, v in (("bytes", b), ("weights", w))}
    out["base_bytes"] = out["projections_bytes"] + out["other_base_bytes"]
    out["base_weights"] = out["projections_weights"] + out["other_base_weights"]
    out["adapted_kernels"] = len(adapted)
    out["dtypes"] = sorted({f"{n.rsplit('/', 1)[-1]}:{v.dtype}" for n, v in params.items()
                            if n.startswith(adapted[0] + "/")})
    return out


def measure_quant_error() -> dict:
    """How far each stored form of the adapted projections' kernels is from the float32 weights loaded from
    the checkpoint: ||W' - W|| / ||W|| over all of them together, and the median over kernels."""
    import jax
    import jax.numpy as jnp

    from sft_jax.models import quant
    from sft_jax.models.finetuned import build_lm
    from sft_jax.state import ModelDef
    c = _config(QLORA_CONFIG, qlora_overrides(1))
    model, _ = build_lm(c.model, "lora", "float32", lora=c.lora, seed=0)
    _, params = ModelDef.split(model)
    kernels = {n[: -len("/lora_a")] + "/kernel" for n in params if n.endswith("/lora_a")}
    forms = {"bf16": jax.jit(lambda w: w.astype(jnp.bfloat16).astype(jnp.float32)),
             "int8": jax.jit(lambda w: quant.dequantize(quant.quantize(w, "int8"), "int8")),
             "nf4": jax.jit(lambda w: quant.dequantize(quant.quantize(w, "nf4"), "nf4"))}
    total = {f: 0.0 for f in forms}
    norm2, per_kernel = 0.0, {f: [] for f in forms}
    for name in sorted(kernels):
        w = jnp.asarray(params[name], jnp.float32)
        n2 = float(jnp.sum(w * w))
        norm2 += n2
        for f, fn in forms.items():
            e2 = float(jnp.sum(jnp.square(fn(w) - w)))
            total[f] += e2
            per_kernel[f].append((e2 / n2) ** 0.5)
    return {"kernels": len(kernels),
            "relative_error": {f: (total[f] / norm2) ** 0.5 for f in forms},
            "median_kernel_relative_error": {f: float(np.median(per_kernel[f])) for f in forms},
            "max_kernel_relative_error": {f: float(np.max(per_kernel[f])) for f in forms}}


def measure_timing(rounds: int = 6, steps: int = 3) -> dict:
    """Step time of the three A arms in one process, interleaved: each arm's train step built as the trainer
    builds it (trainer/setup.prepare), compiled, then `rounds` rounds in which every arm (in a rotating order)
    runs `steps` steps on the same batch (so no arm meets a recompilation). Per round, each arm's mean step;
    ratios against bf16 per round."""
    import tempfile

    import jax

    from sft_jax import sharding, tasks
    from sft_jax.checkpoint import Checkpoints
    from sft_jax.rundir import RunDir
    from sft_jax.trainer import setup
    runs, tmp = {}, tempfile.mkdtemp(prefix="qlora_timing_")
    for arm, extra in QLORA_ARMS.items():
        c = _config(QLORA_CONFIG, {**qlora_overrides(1000), **extra, "data.max_train_examples": 64,
                                   "data.max_eval_examples": 8})
        workdir = os.path.join(tmp, arm)
        os.makedirs(workdir)
        task = tasks.get(c.task)(c, RunDir(workdir))
        task.params = setup.in_storage_dtype(task.params, c.param_dtype, task.layout)
        task.model_def = setup.with_model_options(task.model_def, task.params, c)
        run = setup.prepare(c, task, Checkpoints(workdir), workdir)
        batch = sharding.put_batch(task.batches.batch(0), run.b_shard)
        state, fn = run.state, run.train_fns(0)
        t = time.time()
        for _ in range(2):  # compile and warm
            state, m = fn(state, batch)
            jax.block_until_ready(m["loss"])
        print(f"[timing] {arm}: built and compiled, first two steps {time.time() - t:.0f}s", flush=True)
        runs[arm] = [state, fn, batch]
    per_round = {a: [] for a in runs}
    arms = list(runs)
    for r in range(rounds):
        for arm in arms[r % len(arms):] + arms[: r % len(arms)]:
            state, fn, batch = runs[arm]
            t = time.time()
            for _ in range(steps):
                state, m = fn(state, batch)
                jax.block_until_ready(m["loss"])
            per_round[arm].append((time.time() - t) / steps)
            runs[arm][0] = state
        print(f"[timing] round {r + 1}/{rounds}: " + ", ".join(f"{a} {per_round[a][-1]:.2f}s" for a in arms),
              flush=True)
    ratios = {a: [x / b for x, b in zip(per_round[a], per_round["bf16"])] for a in arms if a != "bf16"}
    return {"rounds": rounds, "steps_per_round": steps, "batch": QLORA_BATCH, "length": QLORA_LENGTH,
            "cpu": cpu_model(), "step_s_per_round": per_round, "ratio_per_round": ratios}


def measure_states(arm: str) -> dict:
    """Bytes of a B run's optimizer state, from the arrays `tx.init` makes for the run's trainable parameters
    (as trainer/setup.prepare builds it); the Adam moments alone, and everything (the step counts too)."""
    import tempfile

    import jax

    from sft_jax import optim, strategies, tasks
    from sft_jax.rundir import RunDir
    from sft_jax.trainer import setup
    c = _config(STATES_CONFIG, {**states_overrides(100), **STATES_ARMS[arm], "data.max_train_examples": 64})
    with tempfile.TemporaryDirectory() as tmp:
        task = tasks.get(c.task)(c, RunDir(tmp))
    params = setup.in_storage_dtype(task.params, c.param_dtype, task.layout)
    labels = strategies.label_params(task.model_def.names,
                                     strategies.strategy_rules(c.strategy, task.layout, c.frozen_layers))
    trainable = strategies.trainable_names(labels)
    schedule = optim.make_schedule(c.learning_rate, c.max_steps, c.warmup_steps, c.schedule)
    tx, _, _ = setup.make_optimizer(c, labels, task.layout, schedule)
    state = jax.jit(tx.init)(params)
    moments = []

    def visit(node):
        if hasattr(node, "mu") and hasattr(node, "nu"):
            moments.append((node.mu, node.nu))
        elif isinstance(node, (tuple, list)):
            for child in node:
                visit(child)
        elif isinstance(node, dict):
            for child in node.values():
                visit(child)
        elif hasattr(node, "inner_states"):  # optax.partition
            visit(node.inner_states)
        elif hasattr(node, "inner_state"):  # optax's MaskedState
            visit(node.inner_state)

    visit(state)
    trained = int(sum(params[n].size for n in trainable))
    return {"trainable_params": trained, "param_bytes": _nbytes(params),
            "trainable_param_bytes": int(sum(params[n].size * params[n].dtype.itemsize for n in trainable)),
            "optimizer_state_bytes": _nbytes(state), "moment_bytes": _nbytes(moments),
            "moment_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(moments)})}


def measure_states_drift(seeds: list[int]) -> dict:
    """How far each B run's final parameters are from the float32-moment run of the same seed, relative to how
    far that run moved them from where training started (the task built with the seed: pre-trained encoder and
    the seed's head): ||w_arm - w_float32|| / ||w_float32 - w_0||, over all parameters together."""
    import tempfile

    import orbax.checkpoint as ocp

    from sft_jax import tasks
    from sft_jax.rundir import RunDir
    out = {}
    for seed in seeds:
        c = _config(STATES_CONFIG, {**states_overrides(100), "seed": seed, "data.max_train_examples": 64})
        with tempfile.TemporaryDirectory() as tmp:
            task = tasks.get(c.task)(c, RunDir(tmp))
        w0 = {k: np.asarray(v, np.float64) for k, v in task.params.items()}
        final = {}
        for arm in STATES_ARMS:
            root = os.path.join(HERE, "workdirs", "states", f"{arm}_s{seed}", "checkpoints", "latest")
            step = max(int(d) for d in os.listdir(root) if d.isdigit())
            final[arm] = {k: np.asarray(v, np.float64) for k, v in
                          ocp.StandardCheckpointer().restore(os.path.join(root, str(step), "params")).items()}
        ref = final["float32"]
        moved = np.sqrt(sum(np.sum((ref[k] - w0[k]) ** 2) for k in ref))
        out[str(seed)] = {"moved_norm": float(moved), **{
            arm: float(np.sqrt(sum(np.sum((final[arm][k] - ref[k]) ** 2) for k in ref)) / moved)
            for arm in STATES_ARMS if arm != "float32"}}
    return out


def measured(part: str, arm: str) -> dict:
    path = os.path.join(RUNS, f"bytes_{part}_{arm}.json")
    if not os.path.exists(path):
        run_child([sys.executable, "-m", "experiments.qlora_and_states.run", f"--measure={part}:{arm}"])
    with open(path) as f:
        return json.load(f)


# --- statistics and the report ------------------------------------------------------------------------------------

def interval(values) -> dict:
    """Mean, sample SD and the 95% t-interval of the mean."""
    from scipy import stats
    x = np.asarray(values, float)
    n = len(x)
    sd = float(x.std(ddof=1)) if n > 1 else float("nan")
    half = float(stats.t.ppf(0.975, n - 1) * sd / np.sqrt(n)) if n > 1 else float("nan")
    return {"n": n, "mean": float(x.mean()), "sd": sd, "lo": float(x.mean()) - half, "hi": float(x.mean()) + half}


def fmt(s: dict, digits: int = 4, scale: float = 1.0, signed: bool = False) -> str:
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    if s["n"] < 2:
        return f.format(s["mean"] * scale)
    return (f"{f.format(s['mean'] * scale)} ± {s['sd'] * scale:.{digits}f} "  # scale: the units shown
            f"[{f.format(s['lo'] * scale)}, {f.format(s['hi'] * scale)}]")


def steady(times: list[float]) -> float:
    """Median step time, steps 3 onward (step 1 compiles, step 2 can still carry start-up work)."""
    return statistics.median(times[2:]) if len(times) > 2 else float("nan")


def report_qlora(records: list[dict], bytes_: dict, seeds: list[int]) -> tuple[list[str], dict]:
    untrained = {r["arm"]: r for r in load_records() if r["part"] == "qlora0"}
    records = [r for r in records if r["part"] == "qlora"]
    arms = [a for a in QLORA_ARMS if any(r["arm"] == a for r in records)]
    by = {(r["arm"], r["seed"]): r for r in records}
    seeds = [s for s in seeds if all((a, s) in by for a in arms)]
    metric = {"eval loss": lambda r: r["results"]["eval/loss"],
              "perplexity": lambda r: r["results"]["eval/perplexity"],
              "token accuracy (%)": lambda r: 100 * r["results"]["eval/accuracy"]}
    per_seed = markdown_table(
        ["arm", "seed", "eval loss", "perplexity", "token accuracy", "final train loss", "median step (s)",
         "peak RSS (MB)"],
        [[r["arm"], r["seed"], f"{r['results']['eval/loss']:.4f}", f"{r['results']['eval/perplexity']:.3f}",
          f"{100 * r['results']['eval/accuracy']:.2f}%", f"{_last_train_loss(r):.4f}",
          f"{steady(r['step_times_s']):.2f}", f"{r['peak_rss_mb']:.0f}"] for a in arms for s in seeds
         for r in [by[(a, s)]]])
    rows, summary = [], {}
    err = bytes_.get("error")
    for a in arms:
        b = bytes_[a]
        summary[a] = {k: interval([f(by[(a, s)]) for s in seeds]) for k, f in metric.items()}
        summary[a]["step_s"] = interval([steady(by[(a, s)]["step_times_s"]) for s in seeds])
        u = untrained.get(a)
        summary[a]["untrained"] = {k: f(u) for k, f in metric.items()} if u else None
        row = [a, f"{8 * b['projections_bytes'] / b['projections_weights']:.3f}",
               f"{b['base_bytes'] / b['base_weights']:.3f}", f"{b['base_bytes'] / 1e6:.1f}",
               f"{100 * err['relative_error'][a]:.2f}%" if err else "-",
               f"{u['results']['eval/loss']:.4f}" if u else "-",
               *[fmt(summary[a][k], 2 if k != "eval loss" else 4) for k in metric]]
        rows.append(row)
    main = markdown_table(["arm", "bits / projection weight", "bytes / base parameter", "base MB",
                           "kernel error vs float32", "untrained eval loss", "eval loss", "perplexity",
                           "token accuracy (%)"], rows)
    diff_rows = []
    ref = "bf16"
    for a in arms:
        if a == ref:
            continue
        d = {k: interval([f(by[(a, s)]) - f(by[(ref, s)]) for s in seeds]) for k, f in metric.items()}
        ratio = interval([steady(by[(a, s)]["step_times_s"]) / steady(by[(ref, s)]["step_times_s"]) for s in seeds])
        summary[a]["diff_vs_bf16"] = {**d, "step_time_ratio": ratio}
        diff_rows.append([f"{a} - bf16", fmt(d["eval loss"], 4, signed=True), fmt(d["perplexity"], 3, signed=True),
                          fmt(d["token accuracy (%)"], 2, signed=True), fmt(ratio, 3)])
    diffs = markdown_table(["paired by seed", "eval loss", "perplexity", "token accuracy (points)",
                            "step-time ratio in the training runs (arm / bf16)"], diff_rows)
    timing = []
    tm = bytes_.get("timing")
    if tm:
        t_rows = []
        for a in arms:
            step = interval(tm["step_s_per_round"][a])
            ratio = interval(tm["ratio_per_round"][a]) if a in tm["ratio_per_round"] else None
            summary[a]["interleaved_step_s"] = step
            summary[a]["interleaved_ratio_vs_bf16"] = ratio
            t_rows.append([a, fmt(step, 3), fmt(ratio, 3) if ratio else "1"])
        timing = [f"### Step time, interleaved in one process ({tm['rounds']} rounds of {tm['steps_per_round']} "
                  f"steps per arm, rotating order, the same batch of {tm['batch']} x {tm['length']} tokens)", "",
                  *markdown_table(["arm", "seconds / step", "ratio to bf16 (per round)"], t_rows), ""]
    return [f"### Per arm (mean ± sample SD [95% t-interval], n = {len(seeds)} seeds)", "", *main, "",
            "### Paired differences against bfloat16 LoRA (same seed: same adapter init and data order)", "",
            *diffs, "", *timing, "### Every run", "", *per_seed], summary


def _last_train_loss(r: dict) -> float:
    path = os.path.join(HERE, "workdirs", r["part"], f"{r['arm']}_s{r['seed']}", "metrics.jsonl")
    if "final_train_loss" in r:
        return r["final_train_loss"]
    rows = [json.loads(line) for line in open(path)]
    return [x["train/loss"] for x in rows if "train/loss" in x][-1]


def report_states(records: list[dict], bytes_: dict, seeds: list[int]) -> tuple[list[str], dict]:
    arms = [a for a in STATES_ARMS if any(r["arm"] == a for r in records)]
    by = {(r["arm"], r["seed"]): r for r in records}
    seeds = [s for s in seeds if all((a, s) in by for a in arms)]
    metric = {"accuracy (%)": lambda r: 100 * r["results"]["eval/accuracy"],
              "eval loss": lambda r: r["results"]["eval/loss"]}
    summary, rows = {}, []
    for a in arms:
        b = bytes_[a]
        summary[a] = {k: interval([f(by[(a, s)]) for s in seeds]) for k, f in metric.items()}
        summary[a]["peak_rss_mb"] = interval([by[(a, s)]["peak_rss_mb"] for s in seeds])
        rows.append([a, f"{b['moment_bytes'] / b['trainable_params']:.3f}",
                     f"{b['optimizer_state_bytes'] / b['trainable_params']:.3f}",
                     f"{b['optimizer_state_bytes'] / 1e6:.1f}",
                     fmt(summary[a]["accuracy (%)"], 2), fmt(summary[a]["eval loss"], 4),
                     f"{summary[a]['peak_rss_mb']['mean']:.0f}"])
    main = markdown_table(["moments", "moment bytes / trained param", "optimizer-state bytes / trained param",
                           "optimizer state MB", "dev accuracy (%)", "dev loss", "peak RSS (MB, mean)"], rows)
    diff_rows = []
    for a in arms:
        if a == "float32":
            continue
        d = {k: interval([f(by[(a, s)]) - f(by[("float32", s)]) for s in seeds]) for k, f in metric.items()}
        summary[a]["diff_vs_float32"] = d
        drift = bytes_.get("drift")
        if drift:
            d["drift"] = interval([drift[str(s)][a] for s in seeds])
        diff_rows.append([f"{a} - float32", fmt(d["accuracy (%)"], 2, signed=True),
                          fmt(d["eval loss"], 2, scale=1e4, signed=True),
                          fmt(d["drift"], 3, scale=100) if drift else "-"])
    diffs = markdown_table(["paired by seed", "dev accuracy (points)", "dev loss (x 1e-4)",
                            "weight drift from the float32 run (% of its movement)"], diff_rows)
    per_seed = markdown_table(
        ["moments", "seed", "dev accuracy", "dev loss", "final train loss", "median step (s)", "peak RSS (MB)"],
        [[a, s, f"{100 * r['results']['eval/accuracy']:.2f}%", f"{r['results']['eval/loss']:.4f}",
          f"{_last_train_loss(r):.4f}", f"{steady(r['step_times_s']):.3f}", f"{r['peak_rss_mb']:.0f}"]
         for a in arms for s in seeds for r in [by[(a, s)]]])
    return [f"### Per arm (mean ± sample SD [95% t-interval], n = {len(seeds)} seeds)", "", *main, "",
            "### Paired differences against float32 moments (same seed: same head init, dropout and data order)",
            "", *diffs, "", "### Every run", "", *per_seed], summary


def plot(records: list[dict]) -> str | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    parts = [(p, arms, key, label) for p, arms, key, label in (
        ("qlora", QLORA_ARMS, "eval/loss", "XSum held-out eval loss (SmolLM2-135M LoRA)"),
        ("states", STATES_ARMS, "eval/accuracy", "SST-2 dev accuracy (MiniLM-L6 full FT)"))
        if any(r["part"] == p for r in records)]
    if not parts:
        return None
    fig, axes = plt.subplots(1, len(parts), figsize=(5 * len(parts), 3.6), squeeze=False)
    for ax, (p, arms, key, label) in zip(axes[0], parts):
        for i, a in enumerate(arms):
            vals = [r["results"][key] * (100 if key == "eval/accuracy" else 1) for r in records
                    if r["part"] == p and r["arm"] == a]
            if not vals:
                continue
            ax.scatter([i] * len(vals), vals, color="C0", alpha=0.6)
            if len(vals) > 1:
                s = interval(vals)
                ax.errorbar([i + 0.15], [s["mean"]], yerr=[[s["mean"] - s["lo"]], [s["hi"] - s["mean"]]],
                            fmt="o", color="C3", capsize=4)
            base = [r["results"][key] for r in records if r["part"] == p + "0" and r["arm"] == a]
            if base:
                ax.scatter([i - 0.15], base, marker="x", color="gray",
                           label="untrained (learning rate 0)" if i == 0 else None)
        if any(r["part"] == p + "0" for r in records):
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(arms)), list(arms))
        ax.set_title(label, fontsize=9)
        ax.set_ylabel("accuracy (%)" if key == "eval/accuracy" else "eval loss")
    fig.tight_layout()
    path = os.path.join(HERE, "arms.png")
    fig.savefig(path, dpi=110)
    return "arms.png"


def load_records() -> list[dict]:
    if not os.path.isdir(RUNS):
        return []
    out = []
    for name in sorted(os.listdir(RUNS)):
        if name.endswith(".json") and not name.startswith("bytes_"):
            with open(os.path.join(RUNS, name)) as f:
                r = json.load(f)
            workdir = os.path.relpath(os.path.join(HERE, "workdirs", r["part"], f"{r['arm']}_s{r['seed']}"), ROOT)
            r["command"] = "python " + shlex.join(  # shell-quoted, whatever version wrote the record
                ["-m", "sft_jax.main", f"--config={r['config']}", f"--workdir={workdir}",
                 *[f"--config.{k}={tuple(v) if isinstance(v, list) else v}" for k, v in r["overrides"].items()]])
            out.append(r)
    return out


def write_report(seeds: list[int]) -> None:
    records = load_records()
    sections, summary = [], {}
    notes_path = os.path.join(HERE, "NOTES.md")
    for part, fn, arms in (("qlora", report_qlora, QLORA_ARMS), ("states", report_states, STATES_ARMS)):
        rec = [r for r in records if r["part"] == part]
        if not rec:
            continue
        names = [*arms, "error", "timing", "drift"]
        bytes_ = {a: json.load(open(os.path.join(RUNS, f"bytes_{part}_{a}.json"))) for a in names
                  if os.path.exists(os.path.join(RUNS, f"bytes_{part}_{a}.json"))}
        lines, summary[part] = fn(rec, bytes_, seeds)
        summary[part + "_bytes"] = bytes_
        sections.append((part, lines, rec))
    with open(os.path.join(HERE, "results.json"), "w") as f:
        json.dump({"summary": summary, "runs": [{k: v for k, v in r.items() if k != "step_times_s"}
                                                 for r in records]}, f, indent=1)
    image = plot(records)
    head = {"qlora": "## A. QLoRA against bfloat16 LoRA: SmolLM2-135M-Instruct on XSum",
            "states": "## B. Adam moments in float32 / bfloat16 / 8 bits: all-MiniLM-L6-v2 on SST-2"}
    out = ["# QLoRA and narrow optimizer states (issue 24, items 4 and 5)", "",
           "Generated by `experiments/qlora_and_states/run.py` from the per-run files in `runs/` "
           "(`--part=report` rebuilds it); needs `../shared/data`. Hand-written conclusions are in the "
           "section after the tables (kept in `NOTES.md`). Produced by (`make experiment-qlora-states`):", "",
           "    python -m experiments.qlora_and_states.run --part=qlora --seeds=0,1,2 --qlora_steps=40",
           "    python -m experiments.qlora_and_states.run --part=states --seeds=0,1,2 --states_steps=100", ""]
    cpus = sorted({r["cpu"] for r in records})
    revs = sorted({(r["git_rev"][:10], r["uncommitted_library_diff_sha1"]) for r in records})
    out += [f"Machine: {', '.join(cpus)}, shared with other jobs. Code: "
            + ", ".join(f"{rev}" + (f" + uncommitted library diff {d}" if d else "") for rev, d in revs) + ".", ""]
    for part, lines, rec in sections:
        out += [head[part], "", *lines, "", "Commands (one per arm; seeds 1 and 2 differ only in `--config.seed`):",
                ""]
        out += [f"    {r['command']}" for r in rec if r["seed"] == min(x["seed"] for x in rec)] + [""]
        if part == "qlora":
            base = [r for r in records if r["part"] == "qlora0"]
            if base:
                out += ["The untrained evaluations (one step at learning rate 0):", ""]
                out += [f"    {r['command']}" for r in base] + [""]
    if image:
        out += [f"![per-seed values and 95% t-intervals]({image})", ""]
    if os.path.exists(notes_path):
        out += [open(notes_path).read()]
    with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
        f.write("\n".join(out))
    print("\n".join(out))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=("qlora", "states", "both", "report"), default="both",
                        help="both: A then B (about 1 + 0.3 hours on 2 shared CPU cores)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--qlora_steps", type=int, default=40)
    parser.add_argument("--states_steps", type=int, default=100)
    parser.add_argument("--measure", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        part, arm = args.measure.split(":")
        if args.measure == "qlora:error":
            out = measure_quant_error()
        elif args.measure == "qlora:timing":
            out = measure_timing()
        elif args.measure == "states:drift":
            out = measure_states_drift([int(x) for x in args.seeds.split(",")])
        else:
            out = measure_qlora(arm) if part == "qlora" else measure_states(arm)
        out.update(code_version())
        os.makedirs(RUNS, exist_ok=True)
        with open(os.path.join(RUNS, f"bytes_{part}_{arm}.json"), "w") as f:
            json.dump(out, f, indent=1)
        print(json.dumps(out), flush=True)
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    if args.part in ("qlora", "both"):
        for arm in QLORA_ARMS:
            measured("qlora", arm)
        for seed in seeds:  # the arms of a seed back to back, so their step times share the machine's load
            for arm, extra in QLORA_ARMS.items():
                train_run("qlora", arm, seed, QLORA_CONFIG, {**qlora_overrides(args.qlora_steps), **extra,
                                                             "seed": seed}, QLORA_BATCH)
                print(f"[qlora] {arm} seed {seed} done; {time.time() - t0:.0f}s elapsed", flush=True)
        # The untrained model of each arm through the same evaluation (one step at learning rate 0; the LoRA
        # adapters start at zero, so the seed does not matter): how much the storage alone costs.
        for arm, extra in QLORA_ARMS.items():
            train_run("qlora0", arm, 0, QLORA_CONFIG, {**qlora_overrides(1), **extra, "seed": 0,
                                                       "learning_rate": 0.0, "warmup_steps": 0}, QLORA_BATCH)
        measured("qlora", "error")
        measured("qlora", "timing")
    if args.part in ("states", "both"):
        for arm in STATES_ARMS:
            measured("states", arm)
        for seed in seeds:
            for arm, extra in STATES_ARMS.items():
                train_run("states", arm, seed, STATES_CONFIG, {**states_overrides(args.states_steps), **extra,
                                                               "seed": seed}, 32)
                print(f"[states] {arm} seed {seed} done; {time.time() - t0:.0f}s elapsed", flush=True)
        measured("states", "drift")
    write_report(seeds)


if __name__ == "__main__":
    main()
