"""Language-model runs out of sft_jax (`python -m sft_jax.export`): --format=hf of a full run is the merged
model transformers loads, with its card; --format=peft of a LoRA run is what `peft` loads on the base model; the
refusals are one line. (Classifiers: test_export_classifiers.py; a module apart so that the two share the test
workers.)"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _export_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sft_jax.export", *args], capture_output=True, text=True,
                          timeout=600, cwd=pathlib.Path(__file__).parents[1])


def _one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _one_line_refusal(call, *fragments: str) -> None:
    """`call()` raises the ValueError the command line prints as its one `error:` line."""
    with pytest.raises(ValueError) as e:
        call()
    assert "\n" not in str(e.value), str(e.value)
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)


def test_cli_language_model_run(tiny_llama_dir, tmp_path):
    """A full fine-tuning run of a decoder: hf is the merged model transformers loads, with its card; peft
    is refused in one line (no adapters); gguf writes a file or says in one line that it is unavailable. The
    refusals the command line makes one line of (test_cli_one_line_errors) are checked without a process each."""
    from conftest import lm_config

    from sft_jax.export import export
    from sft_jax.train import train_and_evaluate

    workdir = tmp_path / "lm"
    train_and_evaluate(lm_config(tiny_llama_dir, tmp_path, "full"), str(workdir))
    result = _export_cli(f"--workdir={workdir}", "--format=hf", f"--out={tmp_path / 'hf'}")
    assert result.returncode == 0, result.stderr
    assert transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).config.model_type == "llama"
    assert "| strategy | full |" in (tmp_path / "hf" / "README.md").read_text()
    _one_line_refusal(lambda: export(str(workdir), "peft", tmp_path / "peft"), "strategy is 'full'", "--format=hf")
    result = _export_cli(f"--workdir={workdir}", "--format=gguf", "--gguf_type=q8_0", f"--out={tmp_path / 'gguf'}")
    if result.returncode == 0:
        assert (tmp_path / "gguf" / "model-q8_0.gguf").is_file() and (tmp_path / "gguf" / "README.md").is_file()
    else:
        _one_error_line(result, "gguf")
    _one_line_refusal(lambda: export(str(workdir), "gguf", tmp_path / "g", gguf_type="q3"), "gguf")
    assert not (tmp_path / "peft").exists() and not (tmp_path / "g").exists()


def test_peft_export_of_a_lora_run_loads_in_peft(tiny_llama_dir, tmp_path):
    """--format=peft of a LoRA run: `peft` puts the adapters on the transformers base and gives the logits of
    the merged --format=hf export."""
    peft = pytest.importorskip("peft")
    from conftest import lm_config

    from sft_jax.export import export
    from sft_jax.train import train_and_evaluate

    workdir = str(tmp_path / "lora")
    config = lm_config(tiny_llama_dir, tmp_path, "lora")
    config.learning_rate = 5e-2
    train_and_evaluate(config, workdir)
    adapters = export(workdir, "peft", tmp_path / "peft")
    merged = export(workdir, "hf", tmp_path / "hf")
    assert (adapters / "adapter_config.json").is_file() and "LoRA adapters" in (adapters / "README.md").read_text()
    ids = torch.tensor([[1, 520, 3000, 45, 9, 77]])
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    with torch.no_grad():
        plain = base(ids).logits
        adapted = peft.PeftModel.from_pretrained(base, str(adapters)).eval()(ids).logits
        want = transformers.AutoModelForCausalLM.from_pretrained(str(merged))(ids).logits
    assert (adapted - plain).abs().max() > 1e-4  # the adapters learned something
    assert (adapted - want).abs().max() < 1e-4
