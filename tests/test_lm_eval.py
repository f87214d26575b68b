"""The lm-evaluation-harness model `sft_jax`: per-request log-likelihoods and greedy generations equal to the
harness's own `hf` backend on the same tiny model; the forgetting probe `forgetting.lm_eval_tasks`; the
harness command line on the run it wrote. Tasks are the hand-written ones in tests/data/lm_eval_tasks."""

from __future__ import annotations

import json
import os
import pathlib
import runpy
import shutil
import sys

import numpy as np
import pytest

pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")

TASKS_DIR = str(pathlib.Path(__file__).parent / "data" / "lm_eval_tasks")
TASKS = ["tiny_mc", "tiny_gen", "tiny_ppl"]


@pytest.fixture(scope="module")
def sharp_llama_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny random LLaMA with sharper attention and larger residual updates (as in test_generate): at init
    scale it gives every token nearly the same probability and repeats one token, which would hide errors."""
    import transformers

    out = tmp_path_factory.mktemp("sharp_llama")
    model = transformers.LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    scale = {"q_proj": 8, "k_proj": 8, "v_proj": 10, "o_proj": 10, "mlp.": 3}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.mul_(next((f for s, f in scale.items() if s in name), 1))
    model.save_pretrained(out, safe_serialization=True)
    for f in os.listdir(tiny_llama_dir):
        if f.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(os.path.join(tiny_llama_dir, f), out)
    return out


def _evaluate(model, model_args=None, batch_size=None):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, model_args=model_args, tasks=TASKS, batch_size=batch_size, bootstrap_iters=0,
                           task_manager=TaskManager(include_path=TASKS_DIR, include_defaults=False), log_samples=True)


def _responses(results, task):
    """Each document's responses, in document order: [(loglikelihood, is_greedy)...], [text] or [loglikelihood]."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[r[0] for r in s["resps"]] for s in samples]


def test_requests_equal_the_hf_backend(sharp_llama_dir):
    from sft_jax.lm_eval import SftJaxLM

    hf = _evaluate("hf", f"pretrained={sharp_llama_dir},dtype=float32,device=cpu", batch_size=1)
    # Batches of 4 on a 2-device FSDP mesh: 2 length buckets, the last batch filled up with copies.
    ours = _evaluate(SftJaxLM(model=str(sharp_llama_dir), mesh="fsdp:2", batch_size=4))
    mc_hf, mc = _responses(hf, "tiny_mc"), _responses(ours, "tiny_mc")
    assert [len(d) for d in mc] == [3, 3, 3, 3]
    np.testing.assert_allclose([[ll for ll, _ in d] for d in mc], [[ll for ll, _ in d] for d in mc_hf],
                               rtol=1e-5, atol=1e-4)
    assert [[g for _, g in d] for d in mc] == [[g for _, g in d] for d in mc_hf]
    assert len({round(ll, 2) for d in mc for ll, _ in d}) > 6  # the choices do differ: the test can fail
    gen_hf, gen = _responses(hf, "tiny_gen"), _responses(ours, "tiny_gen")
    assert gen == gen_hf and any(g[0].strip() for g in gen)
    np.testing.assert_allclose(_responses(ours, "tiny_ppl"), _responses(hf, "tiny_ppl"), rtol=1e-5)
    for task, metric in (("tiny_mc", "acc,none"), ("tiny_gen", "exact_match,none"),
                         ("tiny_ppl", "word_perplexity,none")):
        assert ours["results"][task][metric] == pytest.approx(hf["results"][task][metric], rel=1e-5)


def test_forgetting_probe_and_command_line_on_the_run(sharp_llama_dir, tmp_path, monkeypatch):
    from conftest import lm_config

    from sft_jax.trainer import train_and_evaluate

    config = lm_config(sharp_llama_dir, tmp_path, "lora")
    config.max_steps = config.eval_every = config.checkpoint_every = 1
    config.learning_rate = 0.1  # one step that moves the probe's perplexity
    config.forgetting.lm_eval_tasks = ("tiny_mc", "tiny_ppl")
    config.forgetting.lm_eval_include_path = TASKS_DIR
    config.forgetting.lm_eval_limit = 3
    workdir = tmp_path / "run"
    results = train_and_evaluate(config, str(workdir))
    acc, ppl = "forgetting/lm_eval/tiny_mc/acc", "forgetting/lm_eval/tiny_ppl/word_perplexity"
    # Which way is better comes from the harness: accuracy drops, perplexity rises.
    assert results[f"{acc}/drop"] == pytest.approx(results[f"{acc}/before"] - results[f"{acc}/after"])
    assert results[f"{ppl}/rise"] == pytest.approx(results[f"{ppl}/after"] - results[f"{ppl}/before"])
    assert results[f"{ppl}/rise"] != 0  # the probe saw the trained weights

    # `python -m sft_jax.lm_eval`, the harness's command line with the model registered, on the run's best
    # checkpoint (`workdir=`: LoRA merged, one device): the metrics the probe got from the train state's params.
    # In-process: a fresh interpreter would spend its time importing JAX, torch and the harness.
    out = tmp_path / "harness"
    _command_line(monkeypatch, "--model", "sft_jax", "--model_args", f"workdir={workdir},mesh=data:1",
                  "--tasks", "tiny_mc,tiny_ppl", "--include_path", TASKS_DIR, "--limit", "3", "--output_path", str(out))
    written = json.loads(next(out.rglob("results_*.json")).read_text())
    assert written["config"]["model"] == "sft_jax"
    for task, metric in (("tiny_mc", "acc"), ("tiny_ppl", "word_perplexity"), ("tiny_ppl", "byte_perplexity")):
        assert written["results"][task][f"{metric},none"] == pytest.approx(
            results[f"forgetting/lm_eval/{task}/{metric}/after"], rel=1e-5)


def _command_line(monkeypatch, *args: str) -> None:
    """Runs `python -m sft_jax.lm_eval ARGS` in this process, the harness indexing only the tasks of
    --include_path, not its own thousands of task files (seconds)."""
    from lm_eval.tasks import TaskManager

    assert TaskManager.__init__.__defaults__ == (None, None, True, None)  # verbosity, include_path, include_defaults
    monkeypatch.setattr(TaskManager.__init__, "__defaults__", (None, None, False, None))
    monkeypatch.setattr(sys, "argv", ["sft_jax.lm_eval", *args])
    runpy.run_module("sft_jax.lm_eval", run_name="__main__", alter_sys=True)


def test_command_line_errors_are_one_line(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        _command_line(monkeypatch, "--model", "sft_jax", "--model_args", f"workdir={tmp_path}", "--tasks", "tiny_mc",
                      "--include_path", TASKS_DIR)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and err[-1].startswith(f"error: {tmp_path}") and "Traceback" not in "".join(err)


def test_unknown_task_and_model_args_are_one_line_errors(sharp_llama_dir):
    from sft_jax.lm_eval import SftJaxLM, parse_mesh

    with pytest.raises(ValueError, match=r"model_args \['temperature'\]: unknown to the sft_jax model"):
        SftJaxLM(model=str(sharp_llama_dir), temperature=0.5)
    with pytest.raises(ValueError, match="mesh='fsdp=2': expected AXIS:SIZE pairs"):
        parse_mesh("fsdp=2")
    assert parse_mesh("fsdp:4/tensor:2") == {"fsdp": 4, "tensor": 2}


def test_bad_probe_keys_are_one_line_errors(tiny_llama_dir, tmp_path):
    from conftest import lm_config

    from sft_jax.config_defaults import validate

    config = lm_config(tiny_llama_dir, tmp_path, "full")
    config.forgetting.lm_eval_tasks = ("tiny_mc",)
    config.forgetting.lm_eval_include_path = str(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"^config.forgetting.lm_eval_include_path: .*missing: no such folder$"):
        validate(config)
    config.forgetting.lm_eval_include_path, config.forgetting.lm_eval_limit = TASKS_DIR, -1
    with pytest.raises(ValueError, match=r"^config.forgetting.lm_eval_limit: must be >= 0, got -1$"):
        validate(config)
