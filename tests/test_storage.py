"""Workdirs and data off local paths (`sft_jax.storage`): `file://` URLs train and resume; against a local S3 server
(moto), data on s3:// trains, its errors name the URL, the run files of a workdir read
and write there, and an s3:// workdir stops in one line (orbax cannot write checkpoints there)."""

from __future__ import annotations

import json
import pathlib

import pytest
from conftest import resumed_after_crash, sentiment_records, write_jsonl

from sft_jax import storage
from sft_jax.data.errors import DataError
from sft_jax.data.lm import read_documents
from sft_jax.data.random_access import open_records, scan
from sft_jax.data.sources import read_classification
from sft_jax.train import train_and_evaluate

BUCKET = "sft-jax-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A local S3 server (moto) with one bucket; the environment points boto at it. Yields the bucket's URL."""
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[test]')")
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[test]')")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as env:
        for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}",
                           "SFT_JAX_CACHE": str(tmp_path_factory.mktemp("cache"))}.items():
            env.setenv(key, value)
        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir(BUCKET)
        try:
            yield f"s3://{BUCKET}"
        finally:
            fsspec.filesystem("s3").clear_instance_cache()
            server.stop()


def _put(url: str, text: str) -> str:
    with storage.open(url, "w") as f:
        f.write(text)
    return url


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


@pytest.fixture(scope="module")
def url_run(make_tiny_config, tmp_path_factory, request):
    """A run whose workdir is a file:// URL and whose data is on s3:// (file:// URLs where moto is not installed),
    killed after its step-2 checkpoint and resumed: (config, workdir path, results)."""
    tmp = tmp_path_factory.mktemp("url_run")
    config = make_tiny_config(tmp)
    try:
        bucket = request.getfixturevalue("s3")
        config.data.train = _put(f"{bucket}/data/train.jsonl", pathlib.Path(config.data.train).read_text())
        config.data.eval = _put(f"{bucket}/data/eval.jsonl", pathlib.Path(config.data.eval).read_text())
    except pytest.skip.Exception:
        config.data.train = pathlib.Path(config.data.train).as_uri()
        config.data.eval = pathlib.Path(config.data.eval).as_uri()
    workdir = tmp / "run"
    with pytest.MonkeyPatch.context() as m:
        results = resumed_after_crash(config, workdir.as_uri(), m, step=2)
    return config, workdir, results


def test_url_workdir_and_data_train_and_resume(url_run):
    config, workdir, results = url_run
    assert results["step"] == 4 and results["eval/accuracy"] > 0.5
    assert json.loads((workdir / "results.json").read_text())["params_fingerprint"] == results["params_fingerprint"]
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "train/loss" in m] == [1, 2, 3, 4]  # the resume logged no step twice
    assert (workdir / "checkpoints" / "latest").is_dir()
    assert json.loads((workdir / "config.json").read_text())["data"]["train"] == config.data.train


def test_s3_data_errors_name_the_url_and_a_changed_object_is_fetched_again(s3):
    url = _put(f"{s3}/data/bad.jsonl", _jsonl(sentiment_records(2)) + "{not json\n")
    with pytest.raises(DataError, match=rf"^{url}:3: malformed JSON"):
        read_classification(url)
    _put(url, _jsonl(sentiment_records(3)))
    assert [e.where for e in read_classification(url)] == [f"{url}:1", f"{url}:2", f"{url}:3"]
    with pytest.raises(DataError, match=rf"^{s3}/data/missing.jsonl: file not found$"):
        read_classification(f"{s3}/data/missing.jsonl")
    docs = _put(f"{s3}/data/docs.txt", "".join(f"document {i}\n" for i in range(10)))
    assert [(d.where, d.text) for d in read_documents(docs + "[10%:30%]")] == [(f"{docs}:2",
                                                                                "document 1\ndocument 2\n")]


def test_s3_training_file_streams_from_its_mirror_named_by_its_url(s3):
    url = _put(f"{s3}/data/stream.jsonl", _jsonl(sentiment_records(2)) + "\n{not json\n")
    records = open_records(url)
    assert [records[0][0], records[1][0]] == [f"{url}:1", f"{url}:2"]
    first, second = next(iter(scan(url))), records[1]
    assert first == records[0] and second[1] == sentiment_records(2)[1]
    with pytest.raises(DataError, match=rf"^{url}:4: malformed JSON"):
        records[2]
    with pytest.raises(DataError, match=rf"^{url}:4: malformed JSON"):
        list(scan(url))
    with pytest.raises(DataError, match=rf"^{s3}/data/gone.jsonl: file not found$"):
        open_records(f"{s3}/data/gone.jsonl")


def test_s3_workdir_stops_in_one_line_before_writing(s3, tiny_config):
    workdir = f"{s3}/runs/one"
    with pytest.raises(ValueError, match=r"writes checkpoints only to local \(or mounted\) paths and gs://, not s3://"):
        train_and_evaluate(tiny_config, workdir)
    assert not storage.exists(workdir)


def test_run_files_lock_and_metrics_on_s3(s3, capsys):
    from sft_jax.data.batching import LabelVocab
    from sft_jax.rundir import METRICS_FILE, RunDir
    from sft_jax.trainer.metrics import drop_after, last_step
    from sft_jax.workdir_lock import WorkdirLock

    run = RunDir(f"{s3}/runs/files")
    run.write_config({"model": "m", "seed": 1})
    run.write_labels(LabelVocab(["neg", "pos"]))
    run.write_results({"eval/accuracy": 0.5})
    assert run.has_trained() and run.read_config() == {"model": "m", "seed": 1}
    assert run.read_labels().labels == ["neg", "pos"]
    assert json.loads(storage.read_bytes(run.file("results.json"))) == {"eval/accuracy": 0.5}
    assert sorted(storage.listdir(run.path)) == ["config.json", "labels.json", "results.json"]  # no .tmp left

    metrics = storage.Appender(run.file(METRICS_FILE))
    for step in (1, 2, 3):
        metrics.write(json.dumps({"step": step}) + "\n")
        assert last_step(run.file(METRICS_FILE)) == step  # on the store after each write, not at close
    metrics.close()
    assert drop_after(run.file(METRICS_FILE), 2) == 1
    assert storage.read_bytes(run.file(METRICS_FILE)).decode() == '{"step": 1}\n{"step": 2}\n'

    _put(run.file("config.json"), '{"model": ')
    with pytest.raises(ValueError, match=rf"^{run.path}/config.json is damaged"):
        run.read_config()

    lock = WorkdirLock(run.path)
    assert lock.acquire() is None and not lock.held
    assert "object stores have no locks" in capsys.readouterr().err


def test_file_urls_are_local_paths(tmp_path):
    assert storage.normalize(tmp_path.as_uri()) == str(tmp_path)
    with pytest.raises(ValueError, match="file:// URL must name a local absolute path"):
        storage.normalize("file://host/x")
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(2))
    assert [e.where for e in read_classification(data.as_uri())] == [f"{data}:1", f"{data}:2"]
