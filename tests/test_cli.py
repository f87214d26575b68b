"""The `sft-jax` command (train | predict | generate | export | plan | lm_eval, each the `python -m` module) and the
train command's --help, which lists every config key with its default and the documentation written beside it
in config_defaults.defaults()."""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import subprocess
import sys

import pytest
from conftest import FAST_COMPILE_FLAG

from sft_jax import config_docs, console
from sft_jax.config_defaults import defaults

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE_FLAG)
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_every_config_key_has_documentation():
    docs = config_docs.key_docs()
    keys = [key for key, _ in config_docs.leaf_keys()]
    assert len(keys) > 100 and keys == [k for k, _ in config_docs.leaf_keys(defaults())]
    undocumented = [k for k in keys if not docs.get(k, "").strip()]
    assert not undocumented, f"document these keys with a comment beside them in defaults(): {undocumented}"


def test_docs_come_from_the_comments_beside_and_above_each_key():
    docs = config_docs.key_docs()
    assert docs["pooling"] == "cls | mean"  # on its line
    assert docs["warmup_ratio"].startswith("Warm-up as a fraction of max_steps, in [0, 1)")  # the block above
    assert docs["warmup_ratio"].endswith("which warmup_steps does not.")  # ... all of it
    assert docs["early_stopping.mode"].startswith("auto: min for loss-like metrics")  # above and beside
    assert docs["early_stopping.mode"].endswith("auto | max | min")
    assert docs["lora"].startswith("strategy=lora: low-rank adapters")  # a section's own


@pytest.mark.parametrize("command", [("sft_jax.main",), ("sft_jax.console", "train")], ids=["python-m", "sft-jax"])
def test_train_help_lists_config_keys_with_defaults_and_docs(command):
    proc = _run(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "--config: Config file: path[:arg]." in out and "--workdir: Directory for checkpoints" in out
    assert "  --config.learning_rate=5e-05\n      peak learning rate of AdamW\n" in out
    assert "  --config.warmup_ratio=0.0\n      Warm-up as a fraction of max_steps" in out
    assert "  --config.lora.rank=8\n      r: the inner dimension of each adapter" in out
    assert "  lora.*: strategy=lora: low-rank adapters" in out
    assert "  --config.mesh.fsdp=1\n      fully sharded data parallelism" in out
    assert out.count("\n  --config.") == len(config_docs.leaf_keys())


def test_sft_jax_help_lists_the_commands():
    proc = _run("sft_jax.console", "--help")
    assert proc.returncode == 0
    for name, (module, _) in console.COMMANDS.items():
        assert f"  {name} " in proc.stdout and f"(python -m {module})" in proc.stdout
    assert list(console.COMMANDS) == ["train", "predict", "generate", "export", "plan", "lm_eval", "interpolate"]
    no_command = _run("sft_jax.console")
    assert no_command.returncode == 2 and no_command.stdout.startswith("usage: sft-jax COMMAND")
    unknown = _run("sft_jax.console", "fit")
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == ("error: sft-jax fit: unknown command; expected one of train, predict, "
                                      "generate, export, plan, lm_eval, interpolate")


def test_each_command_runs_its_module():
    proc = _run("sft_jax.console", "predict", "--workdir=/nonexistent/run", "--text=hi")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr == _run("sft_jax.predict", "--workdir=/nonexistent/run", "--text=hi").stderr
    proc = _run("sft_jax.console", "plan", "--help")
    assert "--device_memory_gb" in proc.stdout and "Plan a run before launching it" in proc.stdout
    proc = _run("sft_jax.console", "generate", "--max_new_tokens=x")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "max_new_tokens" in proc.stderr


def test_a_command_whose_module_is_missing_says_so(monkeypatch, capsys):
    monkeypatch.setitem(console.COMMANDS, "export", ("sft_jax.no_such_export", "..."))
    with pytest.raises(SystemExit) as e:
        console.main(["export", "--workdir=x"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: sft-jax export: sft_jax.no_such_export is not in this "
                                               "installation of sft_jax")


def test_the_console_script_is_declared():
    scripts = importlib.metadata.entry_points(group="console_scripts", name="sft-jax")
    assert [s.value for s in scripts] == ["sft_jax.console:main"]


def test_train_warns_when_warm_up_covers_most_of_the_run(tiny_bert_dir, tmp_path):
    # configs/sst2.py keeps warmup_steps=100 when the run is shortened on the command line.
    data = REPO / "tests" / "data" / "bad" / "train_ok.jsonl"
    proc = _run("sft_jax.console", "train", "--config=configs/sst2.py:head", f"--workdir={tmp_path / 'run'}",
                f"--config.model={tiny_bert_dir}", f"--config.data.train={data}", f"--config.data.eval={data}",
                "--config.forgetting.stsb=", "--config.max_steps=2", "--config.batch_size=4",
                "--config.eval_batch_size=4")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: warm-up")]
    assert warnings == ["warning: warm-up covers 2 of the run's 2 steps (config.warmup_steps=100, "
                        "config.max_steps=2): the learning rate never reaches learning_rate; set "
                        "config.warmup_ratio (e.g. 0.06, with warmup_steps=0) for a warm-up that follows max_steps"]
