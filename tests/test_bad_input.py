"""Bad input stops the run before training, with one line naming the file and line (or the config key).

The bad files are committed under tests/data/bad/; each test also checks that no checkpoint was saved.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
from conftest import FAST_COMPILE_FLAG

from sft_jax.config_defaults import defaults, validate
from sft_jax.data.sources import DataError, read_classification

REPO = pathlib.Path(__file__).resolve().parents[1]
BAD = pathlib.Path(__file__).resolve().parent / "data" / "bad"


def _saved_steps(workdir: pathlib.Path) -> list[str]:
    """Step directories orbax wrote under WORKDIR/checkpoints/{latest,best}/."""
    return sorted(f"{p.parent.name}/{p.name}" for p in (workdir / "checkpoints").glob("*/*") if p.name.isdigit())


def _fails_before_training(config, workdir: pathlib.Path, exc=DataError) -> str:
    from sft_jax.train import train_and_evaluate

    with pytest.raises(exc) as info:
        train_and_evaluate(config, str(workdir))
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    assert _saved_steps(workdir) == []
    assert not (workdir / "metrics.jsonl").exists()  # never got as far as a step
    return message


# (file under tests/data/bad, whether it is given as train or eval data, what the message must start with
# after "PATH").
BAD_FILES = [
    ("malformed.jsonl", "train", ":3: malformed JSON"),
    ("malformed.jsonl", "eval", ":3: malformed JSON"),
    ("missing_text.jsonl", "train", ":2: missing field 'text'"),
    ("missing_label.jsonl", "train", ":3: missing field 'label'"),
    ("missing_label.jsonl", "eval", ":3: missing field 'label'"),
    ("unseen_label.jsonl", "eval", ":2: label 'neutral' is not one of the training labels"),
    ("empty.jsonl", "train", ": no examples"),
    ("empty.jsonl", "eval", ": no examples"),
    ("not_utf8.jsonl", "train", ":2: not valid UTF-8"),
    ("not_utf8.tsv", "train", ":3: not valid UTF-8"),
    ("label_list.jsonl", "train", ":1: field 'label' must be a string or an int, got list"),
    ("empty_text.jsonl", "train", ":2: field 'text' is empty"),
    ("wrong_columns.tsv", "train", ":3: expected 2 columns, found 3"),
    ("no_label_column.csv", "train", ":1: header has no column 'label'"),
]
READ_ERRORS = {name: expected for name, _, expected in BAD_FILES if name != "unseen_label.jsonl"}


@pytest.mark.parametrize("name", sorted(READ_ERRORS))
def test_reader_names_file_and_line(name):
    path = BAD / name
    with pytest.raises(DataError) as info:
        read_classification(str(path))
    assert str(info.value).startswith(f"{path}{READ_ERRORS[name]}"), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name, role, expected", BAD_FILES, ids=[f"{n}-{r}" for n, r, _ in BAD_FILES])
def test_bad_file_stops_run_before_training(tiny_config, tmp_path, name, role, expected):
    path = BAD / name
    tiny_config.data[role] = str(path)
    message = _fails_before_training(tiny_config, tmp_path / "run")
    assert message.startswith(f"{path}{expected}"), message


def test_missing_and_unreadable_paths(tiny_config, tmp_path):
    missing = tmp_path / "no_such_file.jsonl"
    tiny_config.data.train = str(missing)
    assert _fails_before_training(tiny_config, tmp_path / "run") == f"{missing}: file not found"
    tiny_config.data.train = str(BAD)
    assert _fails_before_training(tiny_config, tmp_path / "run").startswith(f"{BAD}: is a directory")
    other = tmp_path / "data.xlsx"
    other.write_text("x")
    tiny_config.data.train = str(other)
    assert "unknown format '.xlsx'" in _fails_before_training(tiny_config, tmp_path / "run")
    not_parquet = tmp_path / "data.parquet"
    not_parquet.write_text("x")
    tiny_config.data.train = str(not_parquet)
    assert _fails_before_training(tiny_config, tmp_path / "run").startswith(f"{not_parquet}: cannot read")
    tiny_config.data.train = "tfds:sft_jax_no_such_dataset:train"
    tiny_config.data.tfds_data_dir = str(tmp_path / "tfds")
    assert _fails_before_training(tiny_config, tmp_path / "run").startswith(
        "tfds:sft_jax_no_such_dataset:train: cannot open TFDS dataset")


def test_single_label_training_data(tiny_config, tmp_path):
    one = tmp_path / "one_label.jsonl"
    one.write_text('{"text": "good", "label": "positive"}\n{"text": "great", "label": "positive"}\n')
    tiny_config.data.train = str(one)
    assert _fails_before_training(tiny_config, tmp_path / "run").startswith(f"{one}: found 1 label(s)")


def test_unknown_config_key():
    c = defaults()
    c.data.train, c.data.eval = "train.jsonl", "eval.jsonl"
    validate(c)
    c.not_a_key = 1
    with pytest.raises(ValueError, match=r"^unknown config key 'not_a_key'$"):
        validate(c)
    c = defaults()
    c.data.trian = "x"
    with pytest.raises(ValueError, match=r"^unknown config key 'data.trian'$"):
        validate(c)


def test_unknown_key_and_strategy_stop_train_and_evaluate(tiny_config, tmp_path):
    tiny_config.learning_rat = 1e-3
    message = _fails_before_training(tiny_config, tmp_path / "run", exc=ValueError)
    assert message == "unknown config key 'learning_rat'"
    del tiny_config["learning_rat"]
    tiny_config.strategy = "bogus"
    message = _fails_before_training(tiny_config, tmp_path / "run", exc=ValueError)
    assert message.startswith("config.strategy: unknown strategy 'bogus'")


def test_failed_rerun_keeps_last_good_checkpoint(tiny_config, tmp_path):
    from sft_jax.train import train_and_evaluate

    workdir = tmp_path / "run"
    tiny_config.max_steps = 2
    train_and_evaluate(tiny_config, str(workdir))
    saved = _saved_steps(workdir)
    assert "latest/2" in saved
    labels = (workdir / "labels.json").read_text()
    results = (workdir / "results.json").read_text()

    tiny_config.max_steps = 4  # a resume that would train further, on broken data
    tiny_config.data.train = str(BAD / "malformed.jsonl")
    with pytest.raises(DataError, match="malformed.jsonl:3: malformed JSON"):
        train_and_evaluate(tiny_config, str(workdir))
    # Different labels than the workdir's run: refused, rather than training a head with shuffled classes.
    relabelled = tmp_path / "relabelled.jsonl"
    relabelled.write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n')
    tiny_config.data.train = str(relabelled)
    with pytest.raises(DataError, match=r"labels \['neg', 'pos'\] differ from \['negative', 'positive'\]"):
        train_and_evaluate(tiny_config, str(workdir))
    assert _saved_steps(workdir) == saved
    assert (workdir / "labels.json").read_text() == labels
    assert (workdir / "results.json").read_text() == results


# ------------------------------------------------------------------------------------------------ the CLI


def _cli(tmp_path: pathlib.Path, model_dir, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device is plenty here
    env.update(HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE_FLAG)
    args = [sys.executable, "-m", "sft_jax.main", "--config=configs/sst2.py:partial",
            f"--workdir={tmp_path / 'run'}", f"--config.model={model_dir}",
            f"--config.data.train={BAD / 'train_ok.jsonl'}", f"--config.data.eval={BAD / 'train_ok.jsonl'}",
            "--config.forgetting.stsb=", "--config.max_steps=2", *overrides]
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_cli_unknown_key(tiny_bert_dir, tmp_path):
    proc = _cli(tmp_path, tiny_bert_dir, "--config.not_a_key=1")
    line = _error_line(proc)
    assert "not_a_key" in line and "unknown config key" in line
    assert not (tmp_path / "run").exists()


def test_cli_unknown_strategy(tiny_bert_dir, tmp_path):
    proc = _cli(tmp_path, tiny_bert_dir, "--config.strategy=bogus")
    line = _error_line(proc)
    assert "config.strategy" in line and "'bogus'" in line
    assert _saved_steps(tmp_path / "run") == []


def test_cli_malformed_data(tiny_bert_dir, tmp_path):
    bad = BAD / "malformed.jsonl"
    proc = _cli(tmp_path, tiny_bert_dir, f"--config.data.train={bad}")
    assert proc.returncode == 1
    assert _error_line(proc).startswith(f"error: {bad}:3: malformed JSON")
    assert _saved_steps(tmp_path / "run") == []


# Decoder tasks: each bad file stops an sft / language_modeling run before any model is loaded.
LM_BAD_FILES = [
    ("sft_malformed.jsonl", "sft", r"sft_malformed.jsonl:2: malformed JSON"),
    ("sft_wrong_type.jsonl", "sft", r"sft_wrong_type.jsonl:2: field 'output' must be a string, got list"),
    ("sft_missing_output.jsonl", "sft", r"sft_missing_output.jsonl:2: missing field 'output'"),
    ("sft_empty_output.jsonl", "sft", r"sft_empty_output.jsonl:2: field 'output' is empty"),
    ("sft_bad_role.jsonl", "sft", r"sft_bad_role.jsonl:1: message 1 must be"),
    ("sft_bad_instances.jsonl", "sft", r"sft_bad_instances.jsonl:1: field 'instances' must be a non-empty list"),
    ("sft_not_utf8.jsonl", "sft", r"sft_not_utf8.jsonl:2: not valid UTF-8"),
    ("lm_not_utf8.txt", "language_modeling", r"lm_not_utf8.txt: not valid UTF-8"),
]


@pytest.mark.parametrize("name, task, expected", LM_BAD_FILES, ids=[n for n, _, _ in LM_BAD_FILES])
def test_bad_lm_file_stops_run_before_training(tiny_llama_dir, tmp_path, monkeypatch, name, task, expected):
    from sft_jax import train
    from sft_jax.config_defaults import defaults
    from sft_jax.tasks import language_model

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(language_model, "build_lm", no_model)
    c = defaults()
    c.model, c.task = str(tiny_llama_dir), task
    c.data.train = c.data.eval = str(BAD / name)
    c.early_stopping.metric, c.early_stopping.mode = "eval/loss", "min"
    with pytest.raises(DataError, match=expected):
        train.train_and_evaluate(c, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_decoder_max_length_beyond_the_model_is_an_error(tiny_llama_dir, tmp_path):
    from sft_jax import train
    from sft_jax.config_defaults import defaults

    c = defaults()
    c.model, c.task = str(tiny_llama_dir), "language_modeling"
    c.data.train = c.data.eval = str(BAD / "train_ok.jsonl")
    c.max_length, c.buckets = 512, (512,)  # the tiny model has 256 positions
    c.early_stopping.metric, c.early_stopping.mode = "eval/loss", "min"
    with pytest.raises(ValueError, match="max_length=512 exceeds the model's 256 positions"):
        train.train_and_evaluate(c, str(tmp_path / "run"))


# Invalid values: each names the key and the value, before any data or model is read.
INVALID_VALUES = [
    ("batch_size", 0, "config.batch_size: must be positive"),
    ("max_steps", -5, "config.max_steps: must be positive"),
    ("learning_rate", -1e-3, "config.learning_rate: must be >= 0"),
    ("warmup_steps", -1, "config.warmup_steps: must be >= 0"),
    ("warmup_ratio", 1.0, "config.warmup_ratio: must be in [0, 1), got 1.0"),
    ("warmup_ratio", -0.1, "config.warmup_ratio: must be in [0, 1), got -0.1"),
    ("dtype", "float8", "config.dtype: 'float8' is not one of"),
    ("schedule", "exponential", "config.schedule: 'exponential' is not one of"),
    ("pooling", "max", "config.pooling: 'max' is not one of"),
    ("nan_policy", "ignore", "config.nan_policy: 'ignore' is not stop or skip"),
    ("grad_accum_steps", 3, "config.grad_accum_steps: 3 must be >= 1 and divide batch_size=8"),
    ("data.too_long", "drop", "config.data.too_long: 'drop' is not one of"),
    ("data.group_window", 0, "config.data.group_window: batches per sorted window, >= 1, got 0"),
    ("early_stopping.mode", "up", "config.early_stopping.mode: 'up' is not auto, max or min"),
    ("task", "regression", "config.task: unknown task 'regression'"),
    ("distributed.coordinator_address", "host0", "config.distributed.coordinator_address: 'host0' is not host:port"),
    ("distributed.process_id", -2, "config.distributed: process_id=-2 must be in [0, num_processes=0)"),
]


@pytest.mark.parametrize("key, value, expected", INVALID_VALUES, ids=[k for k, _, _ in INVALID_VALUES])
def test_invalid_config_values_are_named(tiny_config, tmp_path, key, value, expected):
    tiny_config.update_from_flattened_dict({key: value})
    message = _fails_before_training(tiny_config, tmp_path / "run", exc=ValueError)
    assert message.startswith(expected), message


def test_invalid_mesh_size(tiny_config, tmp_path):
    tiny_config.mesh = {"data": 0, "fsdp": 1, "tensor": 1}
    message = _fails_before_training(tiny_config, tmp_path / "run", exc=ValueError)
    assert message.startswith("config.mesh.data: must be a positive int or -1"), message


def test_encoder_max_length_beyond_the_model_is_an_error(tiny_config, tmp_path):
    tiny_config.max_length, tiny_config.buckets = 256, (256,)  # the tiny BERT has 128 positions
    message = _fails_before_training(tiny_config, tmp_path / "run", exc=ValueError)
    assert message.startswith("config.max_length=256 exceeds the model's 128 positions"), message


def _long_text_file(tmp_path: pathlib.Path) -> pathlib.Path:
    from conftest import sentiment_records, write_jsonl

    records = sentiment_records(8)
    records[5]["text"] = " ".join(["long"] * 60)  # > max_length=32 tokens
    return write_jsonl(tmp_path / "long.jsonl", records)


def test_too_long_text_error_names_file_and_line(tiny_config, tmp_path):
    path = _long_text_file(tmp_path)
    tiny_config.data.train, tiny_config.data.too_long = str(path), "error"
    message = _fails_before_training(tiny_config, tmp_path / "run")
    assert message.startswith(f"{path}:6: 62 tokens, longer than max_length=32"), message


def test_too_long_text_truncated_is_counted(tiny_config, tmp_path):
    from sft_jax.train import train_and_evaluate

    tiny_config.data.train = str(_long_text_file(tmp_path))
    tiny_config.max_steps = 1
    results = train_and_evaluate(tiny_config, str(tmp_path / "run"))
    assert results["data/train_truncated"] == 1 and results["data/eval_truncated"] == 0


def test_too_long_sft_record_error_names_file_and_line(tiny_llama_dir, tmp_path, monkeypatch):
    from conftest import write_jsonl

    from sft_jax import train
    from sft_jax.config_defaults import defaults
    from sft_jax.tasks import language_model

    monkeypatch.setattr(language_model, "build_lm",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))
    path = write_jsonl(tmp_path / "sft.jsonl", [{"input": "short", "output": "fine"},
                                                 {"input": "x " * 200, "output": "too long"}])
    c = defaults()
    c.model, c.task = str(tiny_llama_dir), "sft"
    c.data.train = c.data.eval = str(path)
    c.data.too_long = "error"
    c.max_length, c.buckets = 64, (64,)
    c.early_stopping.metric, c.early_stopping.mode = "eval/loss", "min"
    with pytest.raises(DataError, match=rf"^{path}:2: longer than max_length=64 tokens"):
        train.train_and_evaluate(c, str(tmp_path / "run"))


@pytest.mark.parametrize("task", ["text_classification", "sft"])
def test_missing_model_directory_is_named(tiny_config, tmp_path, task):
    """A path (an earlier run's workdir, a local checkpoint) that does not exist is named as such, rather than
    looked up on the hub as an id."""
    missing = tmp_path / "runs" / "base_run"
    tiny_config.model, tiny_config.task = str(missing), task
    if task == "sft":
        tiny_config.data.input_field, tiny_config.data.output_field = "text", "label"
    message = _fails_before_training(tiny_config, tmp_path / "run", exc=ValueError)
    assert message.startswith(f"{missing}: no such model directory"), message
