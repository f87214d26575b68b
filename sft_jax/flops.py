"""Model FLOPs of a train step: what MFU divides by, and what the planner reports."""

from __future__ import annotations

import dataclasses
import re

import numpy as np


def _unit(name: str) -> float:
    """Position of a parameter along the network: -1 embeddings, i for block i, inf for the head."""
    m = re.search(r"layers/(\d+)/", name)
    if m:
        return int(m.group(1))
    return -1 if re.search(r"embed", name) else float("inf")


def step_flops(shapes: dict, trainable, attn: dict, seq_len: int, tokens: int, tied_head: bool = False) -> float:
    """Model FLOPs of one train step (the MFU convention, stated in RESULTS.md).

    Per token, each matmul weight of N entries costs 2N forward, 2N for the gradient of its input when any
    trainable parameter lies at or below its block (backprop must pass through it), and 2N for its own
    gradient when it trains: 6N for `full`, as in the usual 6 * params * tokens. Embedding lookups cost
    nothing, except a tied embedding that is also the LM head (counted as a matmul there). Attention scores
    and the weighted sum add 4 * seq_len * width per layer forward (halved when causal: only the lower
    triangle is needed) and twice that backward in blocks the gradient passes through."""
    trainable = set(trainable)
    lowest = min((_unit(n) for n in trainable), default=float("inf"))
    total = 0.0
    for name, shape in shapes.items():
        matmul = len(shape) == 2 and not re.search(r"embed", name)
        if tied_head and name == "embed/embedding":
            matmul, unit = True, float("inf")  # the LM head: at the top of the network
        else:
            unit = _unit(name)
        if not matmul:
            continue
        n = float(np.prod(shape))
        total += 2 * n + (2 * n if unit >= lowest else 0) + (2 * n if name in trainable else 0)
    per_layer = 4.0 * seq_len * attn["width"] * (0.5 if attn["causal"] else 1.0)
    for layer in range(attn["layers"]):
        total += per_layer * (3 if layer >= lowest else 1)
    return total * tokens


@dataclasses.dataclass(frozen=True)
class FlopsModel:
    """What `step_flops` needs of a model: its plain per-layer parameter shapes (not scanned, not quantised), the
    trained ones among them, its attention (layers, width = heads x head_dim, causal) and whether its LM head is
    the tied embedding. `per_step(rows, seq_len)`: the model FLOPs of one train step on a rows x seq_len batch."""

    shapes: dict
    trainable: tuple[str, ...]
    attn: dict
    tied_head: bool = False

    _cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def per_step(self, rows: int, seq_len: int) -> float:
        key = (rows, seq_len)  # a run has a few batch shapes (its buckets) and asks at every step
        if key not in self._cache:
            self._cache[key] = step_flops(self.shapes, self.trainable, self.attn, seq_len, rows * seq_len,
                                          tied_head=self.tied_head)
        return self._cache[key]


def decoder_flops_model(config, model_config) -> FlopsModel:
    """The `FlopsModel` of `config`'s decoder run, counted on the plain model (adapters included) whatever the
    run's storage: scanned layers and a quantised base change how weights are held, not the matmuls done."""
    from flax import nnx

    from sft_jax import strategies
    from sft_jax.models.decoder import DecoderLM
    from sft_jax.models.finetuned import adapt_lm, decoder_layout
    from sft_jax.state import ModelDef

    plain = nnx.eval_shape(lambda: adapt_lm(DecoderLM(model_config, rngs=nnx.Rngs(0)), config.strategy,
                                            config.lora, config.seed))
    model_def, params = ModelDef.split(plain)
    labels = strategies.label_params(model_def.names, strategies.strategy_rules(
        config.strategy, decoder_layout(model_config.num_layers), config.frozen_layers))
    return FlopsModel({k: tuple(v.shape) for k, v in params.items()}, tuple(strategies.trainable_names(labels)),
                      {"layers": model_config.num_layers, "width": model_config.num_heads * model_config.head_dim,
                       "causal": True}, tied_head=plain.lm_head is None)
