"""W&B (offline) and MLflow (a file store) beside metrics.jsonl: a tiny run killed after logging step 3 and
resumed from its step-2 checkpoint sends each tracker every step of metrics.jsonl once, with its values, in one
tracker run; the config and results.json go in too. A tracker named without its package is one line. No network.
"""

from __future__ import annotations

import json
import pathlib
import struct
import sys

import pytest

wandb = pytest.importorskip("wandb")
pytest.importorskip("mlflow")

from sft_jax.checkpoint import Checkpoints  # noqa: E402
from sft_jax.train import train_and_evaluate  # noqa: E402
from sft_jax.trainer.metrics import MetricWriter  # noqa: E402

# Wall-time metrics: the resumed process recomputes step 3 with the same values except these, and the trackers
# keep the killed process's step 3.
TIMING_KEYS = ("train/examples_per_s", "train/tokens_per_s", "train/mfu")


class CrashAfterStep3(Exception):
    pass


@pytest.fixture(scope="module")
def resumed_run(make_tiny_config, tmp_path_factory):
    """(config, workdir, results, metrics.jsonl rows, MLflow URI) of a 4-step run logging to W&B and MLflow,
    killed after its step-3 line and resumed."""
    tmp = tmp_path_factory.mktemp("trackers")
    uri = (tmp / "mlruns").as_uri()
    config = make_tiny_config(tmp)
    config.eval_every = 4  # one evaluation, at the end: the killed process compiles no eval step
    config.logging.wandb = "sft-jax-test"
    config.logging.wandb_mode = "offline"
    config.logging.mlflow = uri
    config.logging.mlflow_experiment = "tiny"
    workdir = tmp / "run"
    with pytest.MonkeyPatch.context() as m:
        m.setenv("WANDB_MODE", "offline")
        m.setenv("WANDB_DIR", str(tmp / "wandb_dir"))
        m.setenv("WANDB_SILENT", "true")
        m.setenv("WANDB_CONSOLE", "off")
        m.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file stores without it
        (tmp / "wandb_dir").mkdir()
        with m.context() as crash:
            write, save_latest = MetricWriter.write, Checkpoints.save_latest

            def write_then_crash(self, step, values):
                write(self, step, values)
                if step == 3:
                    raise CrashAfterStep3

            def save_and_wait(self, state, meta):  # a killed process's background save dies with it
                save_latest(self, state, meta)
                self.wait()

            crash.setattr(MetricWriter, "write", write_then_crash)
            crash.setattr(Checkpoints, "save_latest", save_and_wait)
            with pytest.raises(CrashAfterStep3):
                train_and_evaluate(config, str(workdir))
        results = train_and_evaluate(config, str(workdir))
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return config, workdir, results, rows, uri, tmp / "wandb_dir"


def _expected(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} of metrics.jsonl."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step":
                out.setdefault(key, []).append((row["step"], value))
    return out


def _without_timing(series: dict) -> dict:
    return {k: v for k, v in series.items() if k not in TIMING_KEYS}


def test_mlflow_gets_every_step_once_in_one_run(resumed_run):
    from mlflow.tracking import MlflowClient

    config, workdir, results, rows, uri, _ = resumed_run
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]  # the resume re-logged step 3
    run_id = json.loads((workdir / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tiny")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    expected = _expected(rows)
    got = {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
           for key in expected}
    assert _without_timing(got) == _without_timing(expected)
    assert [s for s, _ in got["train/examples_per_s"]] == [1, 2, 3, 4]

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["learning_rate"] == str(config.learning_rate)
    assert run.data.params["logging.mlflow_experiment"] == "tiny"
    assert run.data.metrics["final/eval/accuracy"] == results["eval/accuracy"]
    assert run.data.metrics["final/trainable_params"] == results["trainable_params"]
    assert run.data.tags["final/params_fingerprint"] == str(results["params_fingerprint"])


def _wandb_records(path: pathlib.Path):
    """The protobuf records of a .wandb file (LevelDB's log format: 32 KiB blocks of checksummed chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero-filled rest of a block
            pos += 32768 - pos % 32768
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_gets_every_step_once_in_one_run(resumed_run):
    config, workdir, results, rows, _, wandb_dir = resumed_run
    run_id = json.loads((workdir / "trackers.json").read_text())["wandb"]
    files = sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2  # the killed process's and the resumed one's: one W&B run, synced as one
    got: dict[str, list[tuple[int, float]]] = {}
    summary, run_config = {}, {}
    for path in files:
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                assert record.run.run_id == run_id and record.run.project == "sft-jax-test"
                run_config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "config":
                run_config.update({item.key: json.loads(item.value_json) for item in record.config.update})
            elif kind == "history":
                step = record.history.step.num
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):
                        got.setdefault(key, []).append((step, json.loads(item.value_json)))
            elif kind == "summary":
                for item in record.summary.update:
                    summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    expected = _expected(rows)
    assert _without_timing(got) == _without_timing(expected)
    assert [s for s, _ in got["train/examples_per_s"]] == [1, 2, 3, 4]
    assert run_config["learning_rate"] == config.learning_rate
    assert run_config["logging"]["wandb"] == "sft-jax-test"
    assert summary["eval/accuracy"] == results["eval/accuracy"]
    assert summary["params_fingerprint"] == results["params_fingerprint"]


def test_missing_package_is_one_line(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow fails, as where it is not installed
    tiny_config.logging.mlflow = "http://127.0.0.1:1"
    with pytest.raises(ValueError) as e:
        train_and_evaluate(tiny_config, str(tmp_path / "run"))
    message = str(e.value)
    assert "\n" not in message and "config.logging.mlflow" in message
    assert "pip install mlflow-skinny==3.18.0" in message
    assert not (tmp_path / "run").exists()  # refused before the workdir is made


def test_unknown_wandb_mode_is_refused(tiny_config, tmp_path):
    tiny_config.logging.wandb_mode = "sync"
    with pytest.raises(ValueError, match=r"config.logging.wandb_mode: 'sync' is not one of"):
        train_and_evaluate(tiny_config, str(tmp_path / "run"))
