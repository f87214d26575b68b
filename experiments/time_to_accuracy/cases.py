"""What each time-to-accuracy case trains, stated once: both arms (sft_jax's command line and the Hugging Face
`Trainer` script) are built from the same `Case`, so their model, data, batch, schedule and evaluation interval
cannot drift apart.

The targets are fixed here, before any run:
- minilm: SST-2 dev accuracy >= 0.88 (configs/sst2.py:full reached 0.893 at its best, step 2500 of 3000, in
  experiments/sst2_strategies).
- smollm2: XSum eval loss <= 2.80 on the first 32 held-out articles. LoRA rank 8 with these settings but
  max_steps=30 reached 2.765 at step 30 in experiments/forgetting (results_xsum.json); the untouched model
  scored 2.997 (max_length 512, 48 articles) in experiments/xsum_summarization. max_steps=40 leaves room.
"""

from __future__ import annotations

import dataclasses

from configs.common import shared_data


@dataclasses.dataclass(frozen=True)
class Case:
    """One comparison. `settings` are the values both arms take (sft_jax config keys; the HF script takes them
    as flags of the same names); `sft_jax_only` turns off what only sft_jax would do (probes, generation), so
    both arms do the same work."""

    name: str
    config: str  # sft_jax's config file:arg
    model: str  # sft_jax's short name; the HF arm loads the same weights (hf_trainer.py)
    metric: str  # the eval metric both arms write (sft_jax's metrics.jsonl key)
    mode: str  # "max": reached when metric >= target; "min": when metric <= target
    target: float
    settings: dict
    sft_jax_only: dict = dataclasses.field(default_factory=dict)

    def reached(self, value: float) -> bool:
        return value >= self.target if self.mode == "max" else value <= self.target


MINILM = Case(
    name="minilm", config="configs/sst2.py:full", model="minilm-l6", metric="eval/accuracy", mode="max", target=0.88,
    settings=dict(data_train=shared_data("sst2", "train.tsv"), data_eval=shared_data("sst2", "dev.tsv"),
                  batch_size=32, eval_batch_size=128, learning_rate=1e-4, weight_decay=0.01, clip_norm=1.0,
                  warmup_steps=100, max_steps=3000, eval_every=250, checkpoint_every=250, max_length=64,
                  buckets=(16, 32, 64), head_dropout=0.1),
    # Patience off: a run ends at the target or at max_steps, in both arms (the Trainer script has none).
    sft_jax_only={"forgetting.stsb": "", "early_stopping.patience": 0, "pooling": "mean"},
)

_XSUM = shared_data("xsum", "xsum-1000.jsonl")
SMOLLM2 = Case(
    name="smollm2", config="configs/xsum_smollm2.py:lora", model="smollm2-135m-instruct", metric="eval/loss",
    mode="min", target=2.80,
    settings=dict(data_train=_XSUM + "[:90%]", data_eval=_XSUM + "[90%:]", max_eval_examples=32,
                  batch_size=4, eval_batch_size=8, learning_rate=5e-4, weight_decay=0.0, clip_norm=1.0,
                  warmup_steps=3, max_steps=40, eval_every=5, checkpoint_every=5, max_length=256, buckets=(256,),
                  lora_rank=8, lora_alpha=16.0),
    sft_jax_only={"forgetting.wikitext2": "", "eval_generation.metrics": "()", "early_stopping.patience": 0,
                  "log_every": 5},
)

CASES = {c.name: c for c in (MINILM, SMOLLM2)}

# --smoke: the plumbing only (a handful of steps on a few examples); whether the target is reached is not the
# point, so it is one a few steps can reach or miss.
SMOKE = dict(batch_size=8, eval_batch_size=16, warmup_steps=1, max_steps=4, eval_every=2, checkpoint_every=2)
SMOKE_EXAMPLES = 64


def smoke(case: Case) -> Case:
    """The case shrunk to a plumbing check: SMOKE's schedule on the first SMOKE_EXAMPLES examples."""
    settings = {**case.settings, **SMOKE, "max_train_examples": SMOKE_EXAMPLES,
                "max_eval_examples": SMOKE_EXAMPLES // 2}
    if case.name == "smollm2":
        settings.update(batch_size=2, eval_batch_size=2, max_length=64, buckets=(64,))
    return dataclasses.replace(case, settings=settings)


def sft_jax_overrides(case: Case, seed: int, model: str | None = None) -> dict:
    """--config.KEY=VALUE of the sft_jax arm."""
    s = case.settings
    out = {"model": model or case.model, "seed": seed, "data.train": s["data_train"], "data.eval": s["data_eval"],
           "batch_size": s["batch_size"], "eval_batch_size": s["eval_batch_size"],
           "learning_rate": s["learning_rate"], "weight_decay": s["weight_decay"], "clip_norm": s["clip_norm"],
           "schedule": "linear", "warmup_steps": s["warmup_steps"], "warmup_ratio": 0.0,
           "max_steps": s["max_steps"], "eval_every": s["eval_every"], "checkpoint_every": s["checkpoint_every"],
           "max_length": s["max_length"], "buckets": "(" + ",".join(map(str, s["buckets"])) + ",)",
           "data.max_train_examples": s.get("max_train_examples", 0),
           "data.max_eval_examples": s.get("max_eval_examples", 0), **case.sft_jax_only}
    if "head_dropout" in s:
        out["head_dropout"] = s["head_dropout"]
    if "lora_rank" in s:
        out.update({"lora.rank": s["lora_rank"], "lora.alpha": s["lora_alpha"], "lora.dropout": 0.0})
    return out


def hf_flags(case: Case, seed: int, model_dir: str) -> list[str]:
    """The HF Trainer script's flags: the same settings under the same names."""
    flags = [f"--case={case.name}", f"--model_dir={model_dir}", f"--seed={seed}", f"--target={case.target}"]
    for key, value in case.settings.items():
        value = ",".join(map(str, value)) if isinstance(value, tuple) else value
        flags.append(f"--{key}={value}")
    return flags
