"""Fine-tuning that forgets less: L2-SP / EWC penalties, LLRD, gradual unfreezing, LP-FT, WiSE-FT."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sft_jax import groups, regularizers, sharding, strategies
from sft_jax.config_defaults import defaults, validate
from sft_jax.losses import classification_loss, simcse_loss
from sft_jax.models.classifier import bert_layout
from sft_jax.state import ModelDef
from sft_jax.train import train_and_evaluate
from sft_jax.train_step import make_train_step
from sft_jax.trainer.setup import make_optimizer

TEXTS = ["good movie, fun and great", "bad movie, dull and boring", "a great fun film", "dull, boring, bad",
         "fun", "bad", "great and good and fun", "boring"]
LABELS = [1, 0, 1, 0, 1, 0, 1, 0]


def rand_tree(key, shapes: dict) -> dict:
    keys = jax.random.split(key, len(shapes))
    return {k: jax.random.normal(kk, s) for kk, (k, s) in zip(keys, shapes.items())}


# ------------------------------------------------------------------------------------------- L2-SP / EWC


def test_l2sp_penalty_is_zero_at_the_anchor_and_has_the_analytic_gradient():
    shapes = {"a/kernel": (3, 4), "b/bias": (4,)}
    anchor = rand_tree(jax.random.key(0), shapes)
    params = rand_tree(jax.random.key(1), shapes)
    assert float(regularizers.penalty(anchor, anchor, None, 0.7)) == 0.0
    expected = 0.35 * sum(float(jnp.sum((params[k] - anchor[k]) ** 2)) for k in shapes)
    np.testing.assert_allclose(float(regularizers.penalty(params, anchor, None, 0.7)), expected, rtol=1e-6)
    grads = jax.grad(regularizers.penalty)(params, anchor, None, 0.7)
    for k in shapes:
        np.testing.assert_allclose(grads[k], 0.7 * (params[k] - anchor[k]), rtol=1e-6)
    # EWC: the same, weighted by F; with F = 1 it is L2-SP.
    fisher = {k: jnp.abs(v) for k, v in rand_tree(jax.random.key(2), shapes).items()}
    grads = jax.grad(regularizers.penalty)(params, anchor, fisher, 0.7)
    for k in shapes:
        np.testing.assert_allclose(grads[k], 0.7 * fisher[k] * (params[k] - anchor[k]), rtol=1e-6)
    ones = {k: jnp.ones(s) for k, s in shapes.items()}
    assert float(regularizers.penalty(params, anchor, ones, 0.7)) == float(
        regularizers.penalty(params, anchor, None, 0.7))


def test_ewc_with_unit_fisher_updates_exactly_as_l2sp():
    shapes = {"a/kernel": (3, 4), "b/bias": (4,)}
    params = rand_tree(jax.random.key(0), shapes)
    grads = rand_tree(jax.random.key(1), shapes)
    moved = {k: v + 0.1 for k, v in params.items()}
    l2sp = regularizers.anchor_penalty(0.5, list(shapes))
    ewc = regularizers.anchor_penalty(0.5, list(shapes), fisher=True)
    u1, _ = l2sp.update(grads, l2sp.init(params), moved)
    u2, _ = ewc.update(grads, ewc.init(params), moved)  # fisher initialised to ones
    for k in shapes:
        np.testing.assert_array_equal(u1[k], u2[k])
        np.testing.assert_allclose(u1[k], grads[k] + 0.5 * 0.1, rtol=1e-5)


def _params_of(model):
    """The flat parameter dict of a module (inside a traced loss)."""
    return ModelDef.split(model)[1]


def test_anchor_penalty_in_the_optimizer_equals_the_penalty_in_the_loss(tiny_trainer):
    """Two steps with the penalty as an optimizer transformation (anchor in the state) give the parameters of
    two steps with the penalty added to the loss; the head is not anchored."""
    weight = 3.0

    def with_penalty(labels, layout):
        anchored = [n for n in strategies.trainable_names(labels) if not n.startswith("head/")]
        inner = strategies.partition(labels, optax.adamw(1e-2))
        return optax.chain(regularizers.anchor_penalty(weight, anchored), inner)

    a = tiny_trainer("full", make_tx=with_penalty)
    anchor = {k: jnp.asarray(v) for k, v in a.host_params.items() if not k.startswith("head/")}

    def penalised_loss(model, batch, rng):
        loss, aux = classification_loss(model, batch, rng)
        return loss + regularizers.penalty(_params_of(model), anchor, None, weight), aux

    b = tiny_trainer("full", make_tx=lambda labels, layout: strategies.partition(labels, optax.adamw(1e-2)))
    b_fn = make_train_step(b.model_def, b.tx, penalised_loss, b.trainable, state_sharding=b.state_sharding,
                           batch_sharding=b.batch_sharding)
    batch = sharding.put_batch(a.batch(TEXTS, LABELS), a.batch_sharding)
    sa, sb = a.state, b.state
    for _ in range(2):
        sa, _ = a.train_fn(sa, batch)
        sb, _ = b_fn(sb, batch)
    for k in sa.params:
        np.testing.assert_allclose(sa.params[k], sb.params[k], rtol=2e-4, atol=2e-6, err_msg=k)
    assert not np.array_equal(sa.params["encoder/layers/0/mlp/up/kernel"], a.host_params[
        "encoder/layers/0/mlp/up/kernel"])
    # The anchor in the state is still the pre-trained weights (not aliased with the donated parameters).
    (anchor_state, _) = sa.opt_state
    np.testing.assert_array_equal(anchor_state.anchor["encoder/layers/0/mlp/up/kernel"],
                                  a.host_params["encoder/layers/0/mlp/up/kernel"])


def test_make_optimizer_anchors_pretrained_trainable_params_only(tiny_trainer):
    t = tiny_trainer("partial", frozen_layers=1)
    config = defaults()
    config.regularizer.ewc = 1.0
    _, _, anchored = make_optimizer(config, t.labels, t.layout, optax.constant_schedule(1e-3))
    assert anchored and not any(n.startswith("head/") for n in anchored)
    assert set(anchored) == {n for n in t.trainable if not n.startswith("head/")}
    assert not any(n.startswith(("encoder/embeddings/", "encoder/layers/0/")) for n in anchored)


def test_empirical_fisher_is_normalised_and_set_into_the_state(tiny_trainer):
    t = tiny_trainer("full")
    names = [n for n in t.trainable if not n.startswith("head/")]
    batch = t.batch(TEXTS, LABELS)
    fisher = regularizers.empirical_fisher(t.model_def, t.state.params, names, simcse_loss, [batch, batch])
    assert set(fisher) == set(names)
    values = np.concatenate([v.ravel() for v in fisher.values()])
    assert np.all(values >= 0) and np.isclose(values.mean(), 1.0, rtol=1e-5)
    assert fisher["encoder/layers/1/mlp/up/kernel"].std() > 0  # not uniform: it is an estimate, not ones
    tx = optax.chain(regularizers.anchor_penalty(1.0, names, fisher=True), t.tx)
    state = regularizers.set_fisher(tx.init(t.state.params), fisher)
    np.testing.assert_array_equal(state[0].fisher[names[0]], fisher[names[0]])


# ------------------------------------------------------------------------------------------------ LLRD


def test_llrd_plan_multipliers():
    plan = groups.plan_groups(bert_layout(6), llrd=0.8)
    assert plan["head"].lr_scale == 1.0
    for i in range(6):
        assert plan[f"layer{i}"].lr_scale == pytest.approx(0.8 ** (6 - i), rel=1e-12)
    assert plan["embeddings"].lr_scale == pytest.approx(0.8 ** 7, rel=1e-12)
    assert all(g.start == 0 for g in plan.values())


def test_llrd_first_update_per_layer_is_exactly_scaled():
    """First AdamW step (no decay, no clipping): update = -lr * scale * g / (|g| + eps), per parameter."""
    layout = bert_layout(3)
    names = ["encoder/embeddings/word_embeddings/embedding"] + [
        f"encoder/layers/{i}/mlp/up/kernel" for i in range(3)] + ["head/kernel"]
    labels = groups.group_labels({n: strategies.TRAINABLE for n in names}, layout)
    plan = groups.plan_groups(layout, llrd=0.5)
    lr = 1e-2
    tx = groups.grouped_optimizer(labels, plan, optax.constant_schedule(lr), warmup_steps=0, weight_decay=0.0,
                                  clip_norm=None)
    params = rand_tree(jax.random.key(0), {n: (4, 3) for n in names})
    grads = rand_tree(jax.random.key(1), {n: (4, 3) for n in names})
    updates, _ = tx.update(grads, tx.init(params), params)
    scales = {names[0]: 0.5 ** 4, names[1]: 0.5 ** 3, names[2]: 0.5 ** 2, names[3]: 0.5, names[4]: 1.0}
    for n in names:
        expected = -lr * scales[n] * grads[n] / (jnp.abs(grads[n]) + 1e-8)
        np.testing.assert_allclose(updates[n], expected, rtol=1e-5, err_msg=n)


# ------------------------------------------------------------------------ gradual unfreezing and LP-FT


def _phased(tiny_trainer, **overrides):
    config = defaults()
    config.learning_rate = 1e-2
    config.warmup_steps = 0
    config.schedule = "constant"
    for key, value in overrides.items():
        config[key].update(value)
    built = {}

    def make_tx(labels, layout):
        tx, built["phases"], _ = make_optimizer(config, labels, layout, optax.constant_schedule(1e-2))
        return tx

    t = tiny_trainer("full", make_tx=make_tx)
    traces = []

    def counting_loss(model, batch, rng):
        traces.append(1)  # runs once per trace (= per compilation), never per step
        return classification_loss(model, batch, rng)

    fns = groups.PhasedStep(built["phases"], lambda names: make_train_step(
        t.model_def, t.tx, counting_loss, names, state_sharding=t.state_sharding, batch_sharding=t.batch_sharding))
    return t, fns, traces


def _changed(params, host_params) -> set[str]:
    return {k for k in host_params if not np.array_equal(np.asarray(params[k]), host_params[k])}


def test_gradual_unfreezing_top_down_one_compilation_per_phase(tiny_trainer):
    t, fns, traces = _phased(tiny_trainer, gradual_unfreeze={"every": 2})
    # 2 blocks: head from 0, layer1 from 2, layer0 from 4, embeddings from 6.
    assert fns.starts == [0, 2, 4, 6]
    batch = sharding.put_batch(t.batch(TEXTS, LABELS), t.batch_sharding)
    state = t.state
    started = {"head/": 0, "encoder/layers/1/": 2, "encoder/layers/0/": 4, "encoder/embeddings/": 6}
    for step in range(8):
        state, _ = fns(step)(state, batch)
        changed = _changed(state.params, t.host_params)
        for prefix, start in started.items():
            group = {k for k in t.host_params if k.startswith(prefix)}
            if step < start:  # not yet unfrozen: bit-identical
                assert not changed & group, (step, prefix)
            else:
                assert changed & group, (step, prefix)
    assert len(traces) == 4  # one compilation per phase, not per step
    # The last group's Adam started fresh: its count is the steps since it started.
    delayed_state = state.opt_state[-1].inner_states["embeddings"].inner_state
    assert int(delayed_state.count) == 8
    adam_counts = [int(s.count) for s in jax.tree.leaves(delayed_state.inner, is_leaf=lambda s: hasattr(s, "mu"))
                   if hasattr(s, "mu")]
    assert adam_counts == [2]


def test_lp_ft_first_phase_leaves_the_backbone_bit_identical(tiny_trainer):
    t, fns, traces = _phased(tiny_trainer, lp_ft={"head_steps": 3, "head_learning_rate": 5e-2})
    batch = sharding.put_batch(t.batch(TEXTS, LABELS), t.batch_sharding)
    state = t.state
    for step in range(3):
        state, _ = fns(step)(state, batch)
    assert _changed(state.params, t.host_params) == {"head/kernel", "head/bias"}
    state, _ = fns(3)(state, batch)
    changed = _changed(state.params, t.host_params)
    assert "encoder/layers/0/mlp/up/kernel" in changed and "encoder/embeddings/word_embeddings/embedding" in changed
    assert len(traces) == 2


# ------------------------------------------------------------------------------------------------ WiSE-FT


def test_wise_ft_endpoints_are_exact_and_head_is_kept():
    shapes = {"encoder/w": (5, 3), "head/kernel": (3, 2)}
    pre = {k: np.asarray(v) for k, v in rand_tree(jax.random.key(0), shapes).items()}
    ft = rand_tree(jax.random.key(1), shapes)
    at0 = regularizers.wise_ft(pre, ft, 0.0, keep=["head/kernel"])
    at1 = regularizers.wise_ft(pre, ft, 1.0, keep=["head/kernel"])
    np.testing.assert_array_equal(at0["encoder/w"], pre["encoder/w"])
    np.testing.assert_array_equal(at1["encoder/w"], ft["encoder/w"])
    np.testing.assert_array_equal(at0["head/kernel"], ft["head/kernel"])
    np.testing.assert_allclose(regularizers.wise_ft(pre, ft, 0.25)["encoder/w"],
                               0.75 * pre["encoder/w"] + 0.25 * np.asarray(ft["encoder/w"]), rtol=1e-6)


def _write_stsb(path, n=24):
    rows = ["sentence1\tsentence2\tscore"]
    for i in range(n):
        rows.append(f"a good movie number {i}\ta {'great' if i % 2 else 'dull'} film number {i}\t{i % 5}.0")
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def test_train_with_ewc_llrd_and_wise_ft_sweep(tiny_config, tmp_path):
    """End to end: EWC (Fisher on a text file) + LLRD, the STS-B probe at every evaluation, and a WiSE-FT
    sweep whose endpoints reproduce the pre-trained probe (alpha 0) and the fine-tuned metrics (alpha 1), on the
    validation split it selects on (eval/) and on the reported split (test/) alike."""
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"this is generic sentence number {i} about many things\n" for i in range(64)))
    c = tiny_config
    c.regularizer.ewc = 10.0
    c.regularizer.fisher_data = str(text)
    c.regularizer.fisher_batches = 2
    c.regularizer.fisher_batch_size = 8
    c.llrd = 0.7
    c.wise_ft.alphas = (0.0, 0.5, 1.0)
    c.forgetting.stsb = _write_stsb(tmp_path / "stsb.tsv")
    c.forgetting.every_eval = True
    c.data.validation_fraction = 0.25
    workdir = tmp_path / "run"
    r = train_and_evaluate(c, str(workdir))
    assert r["wise_ft/1/eval/accuracy"] == r["eval/accuracy"]
    assert r["wise_ft/1/test/accuracy"] == r["test/accuracy"] and "wise_ft/0.5/test/accuracy" in r
    assert r["wise_ft/1/eval/loss"] == pytest.approx(r["eval/loss"], rel=1e-6)
    assert r["wise_ft/1/forgetting/stsb_spearman/after"] == r["forgetting/stsb_spearman/after"]
    assert r["wise_ft/0/forgetting/stsb_spearman/after"] == r["forgetting/stsb_spearman/before"]
    assert r["wise_ft/0/forgetting/stsb_spearman/drop"] == 0.0
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    probed = [x["step"] for x in lines if "forgetting/stsb_spearman" in x]
    assert probed == [2, 4]
    # Resuming the finished run restores the Fisher from the checkpoint instead of re-estimating it.
    assert train_and_evaluate(c, str(workdir))["step"] == 4


@pytest.mark.parametrize("key, value, message", [
    ("regularizer.l2sp", -1.0, "regularizer.l2sp"),
    ("regularizer.ewc", 1.0, "fisher_data"),
    ("llrd", 0.0, "config.llrd"),
    ("llrd", 1.5, "config.llrd"),
    ("gradual_unfreeze.blocks", 0, "gradual_unfreeze"),
    ("wise_ft.alphas", (0.5, 1.5), "wise_ft.alphas"),
])
def test_bad_forgetting_config_is_named(tiny_config, key, value, message):
    section, _, leaf = key.rpartition(".")
    (tiny_config[section] if section else tiny_config)[leaf] = value
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        validate(tiny_config)


def test_conflicting_forgetting_options_are_rejected(tiny_config):
    tiny_config.regularizer.l2sp = tiny_config.regularizer.ewc = 1.0
    tiny_config.regularizer.fisher_data = "x.txt"
    with pytest.raises(ValueError, match="l2sp or ewc"):
        validate(tiny_config)
    tiny_config.regularizer.ewc = 0.0
    tiny_config.gradual_unfreeze.every, tiny_config.lp_ft.head_steps = 10, 10
    with pytest.raises(ValueError, match="use one of them"):
        validate(tiny_config)
    tiny_config.gradual_unfreeze.every = 0
    tiny_config.strategy = "head"
    with pytest.raises(ValueError, match="need partial, full or lora"):
        validate(tiny_config)
