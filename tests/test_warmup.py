"""Warm-up as a fraction of the run (config.warmup_ratio) and the warning when warm-up covers most of it."""

import types

import optax
import pytest

from sft_jax import optim


@pytest.mark.parametrize("steps, ratio, max_steps, expected", [
    (100, 0.0, 60, 100),   # a step count stays what it is, whatever max_steps
    (0, 0.1, 60, 6),       # a ratio follows max_steps
    (0, 0.06, 1500, 90),
    (0, 0.05, 10, 0),      # 0.5 rounds to even: no warm-up step
    (0, 0.0, 60, 0),
])
def test_warmup_steps_resolve_from_steps_or_ratio(steps, ratio, max_steps, expected):
    assert optim.resolve_warmup_steps(steps, ratio, max_steps) == expected


def test_ratio_schedule_peaks_at_the_resolved_step():
    warmup = optim.resolve_warmup_steps(0, 0.25, 40)
    schedule = optim.make_schedule(1.0, 40, warmup, "linear")
    assert float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(25)) == pytest.approx(0.5)


def test_warning_names_both_numbers_and_suggests_the_ratio():
    # configs/sst2.py with --config.max_steps=60 keeps warmup_steps=100: the whole run is warm-up.
    message = optim.long_warmup_warning(100, 0.0, 60)
    assert message.startswith("warning: warm-up covers 60 of the run's 60 steps")
    assert "config.warmup_steps=100" in message and "config.max_steps=60" in message
    assert "never reaches learning_rate" in message and "warmup_ratio" in message
    assert "peaks at step 40" in optim.long_warmup_warning(40, 0.0, 60)
    assert "config.warmup_ratio=0.7" in optim.long_warmup_warning(0, 0.7, 100)
    assert optim.long_warmup_warning(30, 0.0, 60) is None  # half of the run: no warning
    assert optim.long_warmup_warning(0, 0.5, 100) is None
    assert optim.long_warmup_warning(0, 0.0, 60) is None


def test_setting_both_steps_and_ratio_is_refused(tiny_config, tmp_path):
    from sft_jax import train

    tiny_config.warmup_steps, tiny_config.warmup_ratio = 10, 0.1
    with pytest.raises(ValueError) as e:
        train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
    assert str(e.value) == "config.warmup_steps=10 and config.warmup_ratio=0.1: set one of them (the other 0)"
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_run_mostly_warm_up_warns_once_on_stderr(tiny_config, tmp_path, capsys):
    from sft_jax import train

    tiny_config.warmup_steps, tiny_config.max_steps = 3, 4
    train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
    err = capsys.readouterr().err
    assert err.count("warning: warm-up covers 3 of the run's 4 steps (config.warmup_steps=3, "
                     "config.max_steps=4)") == 1, err


def test_layer_groups_re_warm_over_the_resolved_steps(monkeypatch):
    # Gradual unfreezing / LLRD / LP-FT: a group starting late warms up again over the run's warm-up steps.
    from sft_jax import groups
    from sft_jax.config_defaults import defaults
    from sft_jax.trainer import setup

    seen = {}
    monkeypatch.setattr(groups, "plan_groups", lambda layout, **kw: None)
    monkeypatch.setattr(groups, "group_labels", lambda labels, layout: labels)
    monkeypatch.setattr(groups, "phases", lambda labels, plan: None)
    monkeypatch.setattr(groups, "grouped_optimizer", lambda *a, **kw: seen.update(kw) or optax.identity())
    config = defaults()
    config.gradual_unfreeze.every, config.max_steps, config.warmup_ratio = 10, 200, 0.1
    layout = types.SimpleNamespace(fresh="")
    setup.make_optimizer(config, {}, layout, optax.constant_schedule(1.0))
    assert seen["warmup_steps"] == 20
