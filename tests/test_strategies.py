"""Which parameters learn: strategy rules, the optax partition, and what a train step does to frozen ones."""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import numpy as np
import optax
import pytest

from sft_jax import optim, strategies
from sft_jax.losses import classification_loss
from sft_jax.models.classifier import bert_layout
from sft_jax.state import count_params
from sft_jax.train_step import train_step

FROZEN, TRAINABLE = strategies.FROZEN, strategies.TRAINABLE
LEAVES = ("attention/query/kernel", "attention/out/bias", "attention_norm/scale", "mlp/up/kernel", "mlp_norm/bias")
TEXTS = ["good movie, fun and great", "bad movie, dull and boring", "a great fun film", "dull, boring, bad",
         "fun", "bad", "great and good and fun", "boring"]
LABELS = [1, 0, 1, 0, 1, 0, 1, 0]


def layout_names(num_layers: int) -> list[str]:
    """Parameter paths shaped like EncoderClassifier's, for `num_layers` blocks."""
    names = [f"encoder/embeddings/{n}" for n in ("word_embeddings/embedding", "norm/scale", "norm/bias")]
    names += [f"encoder/layers/{i}/{leaf}" for i in range(num_layers) for leaf in LEAVES]
    return names + ["head/kernel", "head/bias"]


def labels_for(strategy: str, num_layers: int, frozen_layers: int = 0) -> dict[str, str]:
    rules = strategies.strategy_rules(strategy, bert_layout(num_layers), frozen_layers)
    return strategies.label_params(layout_names(num_layers), rules)


def frozen_layer_ids(labels: dict[str, str]) -> set[int]:
    return {int(n.split("/")[2]) for n, label in labels.items() if n.startswith("encoder/layers/") and label == FROZEN}


# ----------------------------------------------------------------------------------------------- rules


def test_partial_freezes_embeddings_and_first_blocks():
    labels = labels_for("partial", 6, frozen_layers=3)
    assert all(labels[n] == FROZEN for n in labels if n.startswith("encoder/embeddings/"))
    assert frozen_layer_ids(labels) == {0, 1, 2}
    assert all(labels[n] == TRAINABLE for n in labels if n.startswith("encoder/layers/") and int(n.split("/")[2]) >= 3)
    assert labels["head/kernel"] == labels["head/bias"] == TRAINABLE


@pytest.mark.parametrize("k", [1, 2])
def test_partial_block_regex_does_not_catch_two_digit_layers(k):
    # "layers/1" must not match "layers/10" or "layers/11".
    labels = labels_for("partial", 12, frozen_layers=k)
    assert frozen_layer_ids(labels) == set(range(k))


def test_partial_all_layers_frozen_leaves_only_head():
    labels = labels_for("partial", 6, frozen_layers=6)
    assert strategies.trainable_names(labels) == ("head/bias", "head/kernel")


def test_head_and_full():
    head = labels_for("head", 6)
    assert strategies.trainable_names(head) == ("head/bias", "head/kernel")
    full = labels_for("full", 6)
    assert set(full.values()) == {TRAINABLE}


def test_lora_trains_adapters_and_a_fresh_head_only():
    from sft_jax.models.finetuned import decoder_layout

    names = layout_names(2) + [f"encoder/layers/{i}/attention/query/lora_{ab}" for i in range(2) for ab in "ab"]
    labels = strategies.label_params(names, strategies.strategy_rules("lora", bert_layout(2)))
    assert strategies.trainable_names(labels) == tuple(sorted(
        ["head/bias", "head/kernel"] + [n for n in names if "/lora_" in n]))
    # A decoder has no fresh layers: its LM head and final norm stay frozen beside the adapters.
    decoder = ["embed/embedding", "layers/0/attn/q/kernel", "layers/0/attn/q/lora_a", "layers/0/attn/q/lora_b",
               "final_norm/scale", "lm_head/kernel"]
    labels = strategies.label_params(decoder, strategies.strategy_rules("lora", decoder_layout(1)))
    assert strategies.trainable_names(labels) == ("layers/0/attn/q/lora_a", "layers/0/attn/q/lora_b")


def test_bad_strategy_or_frozen_layers_raise():
    with pytest.raises(ValueError, match="unknown strategy"):
        strategies.strategy_rules("lorax", bert_layout(6))
    with pytest.raises(ValueError, match="frozen_layers=7"):
        strategies.strategy_rules("partial", bert_layout(6), frozen_layers=7)
    with pytest.raises(ValueError, match="matches no rule"):
        strategies.label_params(["head/kernel"], [("^encoder/", FROZEN)])


# ------------------------------------------------------------------------------- training the tiny model

STRATEGY_CASES = [("head", 0), ("partial", 1), ("full", 0)]


def _adam_states(opt_state) -> list[optax.ScaleByAdamState]:
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    return [x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)]


@pytest.mark.parametrize("strategy,frozen_layers", STRATEGY_CASES)
def test_frozen_params_bit_identical_and_stateless(tiny_trainer, strategy, frozen_layers):
    t = tiny_trainer(strategy, frozen_layers, learning_rate=1e-2)
    frozen = [n for n, label in t.labels.items() if label == FROZEN]
    if strategy == "full":
        assert not frozen
    elif strategy == "head":
        assert set(t.trainable) == {"head/kernel", "head/bias"}
    else:
        assert all(n.startswith(("encoder/embeddings/", "encoder/layers/0/")) for n in frozen)
        assert any(n.startswith("encoder/layers/1/") for n in t.trainable)

    state, batch = t.state, t.batch(TEXTS, LABELS)
    for _ in range(5):
        state, metrics = t.train_fn(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    after = {k: np.asarray(v) for k, v in state.params.items()}
    for name in frozen:
        assert after[name].tobytes() == t.host_params[name].tobytes(), f"frozen {name} changed"
    for name in t.trainable:
        assert after[name].tobytes() != t.host_params[name].tobytes(), f"trainable {name} did not change"

    # Adam moments exist for trainable parameters only; frozen ones are MaskedNode placeholders.
    (adam,) = _adam_states(state.opt_state)
    for moments in (adam.mu, adam.nu):
        assert set(moments) == set(t.labels)
        for name in frozen:
            assert isinstance(moments[name], optax.MaskedNode)
        for name in t.trainable:
            assert moments[name].shape == after[name].shape
    leaves = jax.tree.leaves(state.opt_state)
    assert 2 * len(t.trainable) <= len(leaves) <= 2 * len(t.trainable) + 4  # + step counters
    moment_size = sum(int(np.prod(x.shape)) for x in leaves if np.ndim(x) > 0)
    assert moment_size == 2 * count_params(after, t.trainable)


def test_results_report_trainable_and_total_params(tiny_config, tiny_trainer, tmp_path):
    from sft_jax.train import train_and_evaluate

    tiny_config.strategy = "head"
    tiny_config.max_steps = 2
    results = train_and_evaluate(tiny_config, str(tmp_path / "run"))
    saved = json.loads(pathlib.Path(tmp_path / "run" / "results.json").read_text())
    hidden, num_labels = 32, 2
    assert saved["trainable_params"] == results["trainable_params"] == hidden * num_labels + num_labels
    total = sum(v.size for v in tiny_trainer("full").host_params.values())
    assert saved["total_params"] == total
    assert total > 30522 * hidden  # the word embeddings alone


def test_weight_decay_skips_biases_and_norms(tiny_trainer):
    params = tiny_trainer("full").host_params
    mask = optim.decay_mask(params)
    for name, decayed in mask.items():
        leaf = name.rsplit("/", 1)[1]
        assert decayed == (leaf in ("kernel", "embedding")), name
    assert mask["encoder/embeddings/norm/scale"] is False
    assert mask["encoder/layers/0/attention_norm/bias"] is False

    # With zero gradients Adam's step is 0, so the update is the decay alone: -lr * wd * p, or nothing.
    lr, wd = 0.1, 0.5
    tx = optim.adamw(optax.constant_schedule(lr), weight_decay=wd, clip_norm=None)
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    for name, decayed in mask.items():
        expected = -lr * wd * params[name] if decayed else np.zeros_like(params[name])
        np.testing.assert_allclose(np.asarray(updates[name]), expected, rtol=1e-6, atol=1e-9, err_msg=name)


def _count_primitive(jaxpr, name: str) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    n += _count_primitive(sub, name)
    return n


def test_only_trainable_subtree_is_differentiated(tiny_trainer):
    """Counts matmuls in the traced step: the backward pass of `head` has just the head's weight gradient,
    while `full` differentiates every encoder matmul too."""
    batch = tiny_trainer("full").batch(TEXTS, LABELS)

    def step_dots(strategy, frozen_layers=0):
        t = tiny_trainer(strategy, frozen_layers)
        fn = functools.partial(train_step, model_def=t.model_def, tx=t.tx, loss_fn=classification_loss,
                               trainable=t.trainable)
        return _count_primitive(jax.make_jaxpr(fn)(t.state, batch).jaxpr, "dot_general")

    t = tiny_trainer("full")
    forward = jax.make_jaxpr(lambda p: classification_loss(t.model_def.merge(p), batch, None))(t.state.params)
    fwd = _count_primitive(forward.jaxpr, "dot_general")
    head, partial, full = step_dots("head"), step_dots("partial", 1), step_dots("full")
    assert fwd >= 12  # 2 layers x (q, k, v, scores, context, out, up, down) + head
    assert head <= fwd + 2  # d head/kernel (and at most one more)
    assert head < partial < full
    assert full >= 2 * fwd - 2  # every forward matmul gets its input and/or weight gradient
