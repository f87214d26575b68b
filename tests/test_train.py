"""train_and_evaluate end to end on the tiny BERT: outputs, resume, determinism, early stopping, predict,
and the STS-B forgetting probe against the sentence-transformers reference."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import CrashAfterSave, crash_after_save

from sft_jax.state import params_fingerprint
from sft_jax.tasks import classification, text
from sft_jax.train import train_and_evaluate

REPO = pathlib.Path(__file__).resolve().parents[1]
STSB_DEV = REPO.parent / "shared" / "data" / "stsb" / "dev.tsv"
# Depend on wall time, not on what was computed.
TIMING_KEYS = ("train/examples_per_s", "train/tokens_per_s", "train/wall_time_s")


def _comparable(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in TIMING_KEYS}


def _metric_lines(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(make_tiny_config, tmp_path_factory):
    """One uninterrupted 4-step run (eval and checkpoint every 2 steps): (config, workdir, results)."""
    tmp = tmp_path_factory.mktemp("finished")
    config = make_tiny_config(tmp)
    workdir = tmp / "run"
    return config, workdir, train_and_evaluate(config, str(workdir))


def test_end_to_end_outputs(finished_run):
    config, workdir, results = finished_run
    saved = json.loads((workdir / "results.json").read_text())
    assert saved == results
    for key in ("eval/accuracy", "eval/f1", "eval/loss", "trainable_params", "total_params", "params_fingerprint"):
        assert key in saved, key
    assert 0.0 <= saved["eval/accuracy"] <= 1.0 and 0.0 <= saved["eval/f1"] <= 1.0
    assert np.isfinite(saved["eval/loss"]) and saved["eval/loss"] > 0
    assert saved["trainable_params"] == saved["total_params"] > 0  # strategy "full"
    assert saved["step"] == 4 and saved["best_step"] in (2, 4) and saved["stopped_early"] is False

    lines = _metric_lines(workdir)
    assert [row["step"] for row in lines if "train/loss" in row] == [1, 2, 3, 4]  # log_every=1
    assert [row["step"] for row in lines if "eval/accuracy" in row] == [2, 4]
    assert all(np.isfinite(row["train/loss"]) for row in lines if "train/loss" in row)

    assert json.loads((workdir / "config.json").read_text())["model"] == config.model
    assert json.loads((workdir / "labels.json").read_text())["labels"] == ["negative", "positive"]
    assert list(workdir.glob("events.out.tfevents.*"))
    assert sorted(os.listdir(workdir / "checkpoints" / "latest")) == ["2", "4"]
    assert os.listdir(workdir / "checkpoints" / "best") == [str(saved["best_step"])]



def test_resume_after_crash_is_bit_identical(finished_run, tiny_config, tmp_path, monkeypatch):
    """A run killed right after its step-2 checkpoint, started again with the same command, ends where the
    uninterrupted run ends: same parameters (bit for bit on CPU), same metrics, no step logged twice."""
    _, _, expected = finished_run
    workdir = tmp_path / "run"
    with monkeypatch.context() as m:
        crash_after_save(m, 2)
        with pytest.raises(CrashAfterSave):
            train_and_evaluate(tiny_config, str(workdir))
    assert not (workdir / "results.json").exists()

    resumed = train_and_evaluate(tiny_config, str(workdir))
    assert _comparable(resumed) == _comparable(expected)
    assert [row["step"] for row in _metric_lines(workdir) if "train/loss" in row] == [1, 2, 3, 4]


def test_rerun_of_finished_run_does_not_train_more(finished_run, tmp_path):
    import shutil

    config, workdir, expected = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    again = train_and_evaluate(config, str(copy))
    assert again["params_fingerprint"] == expected["params_fingerprint"]
    assert len(_metric_lines(copy)) == len(_metric_lines(workdir))


def test_fresh_runs_are_deterministic(finished_run, tmp_path):
    config, _, expected = finished_run
    again = train_and_evaluate(config, str(tmp_path / "again"))
    assert _comparable(again) == _comparable(expected)


def test_early_stopping_reports_best_checkpoint(tiny_config, tmp_path, monkeypatch):
    """The early-stopping metric is scripted (0.6, 0.8, 0.7, ...) with patience 1: the run stops at step 3,
    and the reported metrics are the real evaluation of the step-2 parameters."""
    scripted = iter([0.6, 0.8, 0.7, 0.7, 0.7])
    real_evaluate = classification.evaluate
    seen = []  # (fingerprint, real metrics) per call

    def evaluate(eval_fn, params, *args, **kwargs):
        out = real_evaluate(eval_fn, params, *args, **kwargs)
        seen.append((params_fingerprint(params), dict(out)))
        if len(seen) <= 3:  # during training; later calls evaluate the best checkpoint
            out["eval/accuracy"] = next(scripted)
        return out

    monkeypatch.setattr(classification, "evaluate", evaluate)
    tiny_config.update(max_steps=10, eval_every=1, checkpoint_every=10)
    tiny_config.early_stopping.patience = 1
    results = train_and_evaluate(tiny_config, str(tmp_path / "run"))

    assert results["stopped_early"] is True
    assert results["step"] == 3 and results["best_step"] == 2
    assert len(seen) == 4
    best_fp, best_metrics = seen[1]
    assert results["best_params_fingerprint"] == best_fp != results["params_fingerprint"] == seen[2][0]
    assert seen[3][0] == best_fp  # the final evaluation ran on the best checkpoint's parameters
    for key, value in best_metrics.items():
        assert results[key] == value, key
    assert max(row["step"] for row in _metric_lines(tmp_path / "run")) == 3


def test_predict(finished_run):
    from sft_jax.predict import Predictor

    config, workdir, results = finished_run
    predictor = Predictor(str(workdir))
    (row,) = predictor.predict(["good movie"])
    assert row["label"] in ("negative", "positive")
    assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert row["probability"] == max(row["probabilities"].values()) == row["probabilities"][row["label"]]

    # The best checkpoint, used by default, is the one the reported eval accuracy comes from.
    records = [json.loads(line) for line in pathlib.Path(config.data.eval).read_text().splitlines()]
    rows = predictor.predict([r["text"] for r in records])
    accuracy = np.mean([p["label"] == r["label"] for p, r in zip(rows, records)])
    assert accuracy == pytest.approx(results["eval/accuracy"])

    texts = ["good movie", "dull and boring"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-m", "sft_jax.predict", f"--workdir={workdir}"]
                          + [f"--text={t}" for t in texts],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [p["text"] for p in printed] == texts
    for p, q in zip(printed, predictor.predict(texts)):
        assert p["label"] == q["label"]
        assert p["probability"] == pytest.approx(q["probability"], abs=1e-5)


@pytest.mark.skipif(not STSB_DEV.exists(), reason=f"{STSB_DEV} not found")
def test_stsb_probe_matches_sentence_transformers():
    """Mean-pooled all-MiniLM-L6-v2 on the 1,500 STS-B dev pairs: sentence-transformers reports 0.867."""
    from flax import nnx

    from sft_jax.evaluate.stsb import stsb_spearman
    from sft_jax.models.classifier import EncoderClassifier
    from sft_jax.models.loading.hf import load_bert, load_tokenizer
    from sft_jax.models.registry import resolve_model_dir
    from sft_jax.state import ModelDef

    try:
        model_dir = resolve_model_dir("minilm-l6")
    except ValueError as e:
        pytest.skip(str(e))
    encoder, config = load_bert(model_dir)
    model_def, params = ModelDef.split(EncoderClassifier(encoder, config.hidden_size, 2, rngs=nnx.Rngs(0)))
    embed = text.embed_fn(model_def)
    # Finer buckets than the default only cut padding (masked out, so the embeddings do not change).
    rho = stsb_spearman(lambda ids, mask: embed(params, ids, mask), load_tokenizer(model_dir), str(STSB_DEV),
                        buckets=(16, 24, 32, 48, 64, 128))
    assert rho == pytest.approx(0.867, abs=0.003)
