"""The sft_jax side of the benchmark: the train step `train_and_evaluate` would run, on a synthetic batch,
and the FLOP count of one step (the MFU numerator)."""

from __future__ import annotations

import optax

from experiments.benchmarks.cases import FROZEN_LAYERS, MODELS, synthetic_batch
from sft_jax import optim, sharding, strategies
from sft_jax.config_defaults import defaults
from sft_jax.flops import step_flops
from sft_jax.losses import classification_loss, lm_loss
from sft_jax.state import ModelDef
from sft_jax.train_step import compiler_options, compute_cast_plan, make_train_step, with_compute_params
from sft_jax.trainer.setup import init_state

# config.cpu_matmuls for the steps built here; None: the config default (ab/cpu_matmuls.py sets it).
CPU_MATMULS = None


class OursStep:
    """sft_jax's jitted, donated train step for (model, strategy, dtype) with AdamW (weight decay 0.01,
    clipping at 1.0), on a one-device mesh; `step()` runs one step and waits for it."""

    def __init__(self, model: str, strategy: str, dtype: str, batch: int, seq_len: int,
                 model_dir: str | None = None):
        c = defaults()  # model_dir: the same architecture from another directory (a tiny one in the smoke test)
        c.model, c.strategy, c.dtype = model_dir or MODELS[model], strategy, dtype
        c.frozen_layers = FROZEN_LAYERS[model] if strategy == "partial" else 0
        if model == "minilm":
            from sft_jax.tasks.text import TextClassifier

            task = TextClassifier(c, num_labels=2)
            self.model_def, params, layout, loss_fn = task.model_def, task.params, task.layout, classification_loss
            cfg = self.model_def.merge(params).encoder.config
            self.attn = dict(layers=cfg.num_hidden_layers, width=cfg.hidden_size, causal=False)
            self.tied = False
        else:
            from sft_jax.models.finetuned import build_lm, decoder_layout

            lm, cfg = build_lm(c.model, strategy, dtype, lora=c.lora, seed=0)
            self.model_def, params = ModelDef.split(lm)
            layout, loss_fn = decoder_layout(cfg.num_layers), lm_loss
            self.attn = dict(layers=cfg.num_layers, width=cfg.num_heads * cfg.head_dim, causal=True)
            self.tied = cfg.tie_embeddings and "lm_head/kernel" not in params
        self.model, self.layout = model, layout
        labels = strategies.label_params(self.model_def.names, strategies.strategy_rules(strategy, layout,
                                                                                         c.frozen_layers))
        self.trainable = strategies.trainable_names(labels)
        self.shapes = {k: v.shape for k, v in params.items()}
        tx = strategies.partition(labels, optim.adamw(optax.constant_schedule(1e-5), weight_decay=0.01,
                                                      clip_norm=1.0))
        mesh = sharding.make_mesh({"data": 1})
        p_shard = sharding.param_shardings(self.model_def.names, mesh)
        self.state, state_shard = init_state(params, tx, p_shard, mesh, seed=0)
        b_shard = sharding.batch_sharding(mesh)
        host_batch = synthetic_batch(model, batch, seq_len)
        # As train_and_evaluate does: frozen bfloat16 matmul weights cast once, not every step.
        plan = compute_cast_plan(self.model_def, loss_fn, params, host_batch, self.trainable)
        self.state, state_shard = with_compute_params(self.state, plan, state_shard)
        self.fn = make_train_step(self.model_def, tx, loss_fn, self.trainable, state_sharding=state_shard,
                                  batch_sharding=b_shard,
                                  compiler_options=compiler_options(CPU_MATMULS or c.cpu_matmuls,
                                                                    decoder=model != "minilm"))
        self.batch = sharding.put_batch(host_batch, b_shard)
        self.tokens = batch * seq_len

    def step(self) -> float:
        self.state, m = self.fn(self.state, self.batch)
        return float(m["loss"])

    def flops_per_step(self, seq_len: int) -> float:
        return step_flops(self.shapes, self.trainable, self.attn, seq_len, self.tokens,
                          tied_head=self.tied)


def matmul_peak(dtype: str, n: int, repeats: int = 5, library: str | None = None) -> float:
    """Best FLOP/s of an n x n x n jitted matmul in `dtype` on the default device (float32 accumulation
    for bfloat16 inputs, as the models' matmuls do). `library`: a `config.cpu_matmuls` value, the CPU matmul
    library to compile it with (None: XLA's own; ignored off CPU, as in the train step)."""
    from sft_jax.trainer.throughput import matmul_peak as peak

    return peak(dtype, n, repeats, compiler_options(library or "xla") or None)
