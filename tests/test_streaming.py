"""Training data streamed from disk (config.data.streaming): records read by index equal the in-memory readers'
(same `where`, same errors); the order is a pure function of (seed, step) with every record once per epoch; each
process reads only its rows; a streamed run resumes bit-identically; what cannot stream is refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import resumed_after_crash, sentiment_records, write_jsonl

from sft_jax.data import columnar, lm
from sft_jax.data.errors import DataError
from sft_jax.data.random_access import JsonlRecords, ParquetRecords, open_records
from sft_jax.data.sources import iter_jsonl
from sft_jax.data.streaming import StreamingBatches


def test_jsonl_records_by_index_equal_the_sequential_reader(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a", "label": 1}\n\n  \n{"text": "b\\u00e9", "label": 2}\n'
                     b'{"text": "c", "label": 3}')  # a BOM, blank lines, no final newline
    records = JsonlRecords(str(path))
    assert [records[i] for i in range(len(records))] == list(iter_jsonl(str(path)))
    assert records[1] == (f"{path}:4", {"text": "bé", "label": 2})

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "a"}\n{"text": \n[1]\n\xff\n')
    records = JsonlRecords(str(bad))
    assert records[0][1] == {"text": "a"}
    for i, message in ((1, f"{bad}:2: malformed JSON"), (2, f"{bad}:3: expected a JSON object, got list"),
                       (3, f"{bad}:4: not valid UTF-8")):
        with pytest.raises(DataError, match=message):
            records[i]


def test_parquet_records_by_index_equal_the_sequential_reader(tmp_path):
    path = tmp_path / "d.parquet"
    rows = [{"text": f"t{i}", "label": i % 3, "extra": None if i % 2 else "x"} for i in range(23)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=5)  # 5 row groups, the last short
    records = ParquetRecords(str(path))
    expected = list(columnar.iter_records(str(path)))
    assert len(records) == 23
    for i in (22, 0, 7, 6, 13):  # out of order: across row groups and back
        assert records[i] == expected[i]


def test_streaming_refuses_other_formats_and_empty_files(tmp_path):
    (tmp_path / "d.tsv").write_text("text\tlabel\na\t1\n")
    with pytest.raises(DataError, match="reads .jsonl and .parquet files"):
        open_records(str(tmp_path / "d.tsv"))
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        open_records(str(tmp_path / "e.jsonl"))


class CountingSource:
    """Records 0..n-1 as ("src:i", {"i": i}), counting reads."""

    def __init__(self, n):
        self.n, self.reads = n, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads.append(int(i))
        return f"src:{i}", {"i": int(i)}


def _encode(items):
    """Each record i becomes a sequence of i % 5 + 2 tokens, all targets."""
    tokens = [np.arange(r["i"] % 5 + 3, dtype=np.int32) + r["i"] for _, r in items]
    return lm.LmDataset(tokens, [np.ones(len(t), np.int32) for t in tokens], [w for w, _ in items])


def _batches(n=50, rows=None, seed=0):
    return StreamingBatches(CountingSource(n), _encode, lm.make_lm_batch, 8, (4, 8), seed, 0, rows)


def _first_tokens(batch) -> list[int]:
    return [int(x) for x, seg in zip(batch["input_ids"][:, 0], batch["segment_ids"][:, 0]) if seg]


def test_order_is_a_function_of_seed_and_step_with_each_record_once_per_epoch():
    stream = _batches()
    assert stream.steps_per_epoch == 6  # 50 // 8, the remainder dropped as in memory
    epochs = [[i for s in range(e * 6, (e + 1) * 6) for i in _first_tokens(stream.batch(s))] for e in range(2)]
    for seen in epochs:
        assert len(seen) == 48 == len(set(seen)) and set(seen) <= set(range(50))
    assert epochs[0] != epochs[1]
    for step in (9, 2, 9):  # a fresh stream (a resumed run) reads the same records at any step, in any order
        assert np.array_equal(_batches().batch(step)["input_ids"], stream.batch(step)["input_ids"])
    assert _first_tokens(_batches(seed=1).batch(0)) != _first_tokens(stream.batch(0))


def test_each_process_reads_only_its_rows_and_together_they_make_the_batch():
    whole = _batches()
    halves = [_batches(rows=slice(0, 4)), _batches(rows=slice(4, 8))]
    expected = whole.batch(3)
    for half, rows in zip(halves, (slice(0, 4), slice(4, 8))):
        got = half.batch(3)
        assert len(half.records.reads) == 4
        assert got["input_ids"].shape == (8, 8)  # the largest bucket: every process's shapes agree
        assert got["target_index"].shape == (8, 8)
        assert not got["loss_mask"][[i for i in range(8) if not rows.start <= i < rows.stop]].any()
        n = expected["input_ids"].shape[1]
        for key in ("input_ids", "targets", "loss_mask", "segment_ids", "positions"):
            assert np.array_equal(got[key][rows, :n], expected[key][rows]), key
            assert not got[key][rows, n:].any()
    assert sorted(halves[0].records.reads + halves[1].records.reads) == sorted(whole.records.reads)


# --- runs -------------------------------------------------------------------------------------------------------
def test_streamed_text_classification_resumes_bit_identically(tiny_config, tmp_path, monkeypatch):
    from sft_jax.train import train_and_evaluate

    tiny_config.data.streaming = True
    tiny_config.max_steps = 10  # past the 8 steps of an epoch of 64
    uninterrupted = train_and_evaluate(tiny_config, str(tmp_path / "one"))
    assert uninterrupted["train_examples"] == 64 and np.isfinite(uninterrupted["eval/loss"])
    resumed = resumed_after_crash(tiny_config, tmp_path / "two", monkeypatch, step=6)
    assert resumed["params_fingerprint"] == uninterrupted["params_fingerprint"]


def test_streamed_text_classification_checks_every_record_before_training(tiny_config, tmp_path):
    from sft_jax.train import train_and_evaluate

    records = sentiment_records(20)
    records[13] = {"text": "no label here"}
    tiny_config.data.train = str(write_jsonl(tmp_path / "bad.jsonl", records))
    tiny_config.data.streaming = True
    with pytest.raises(DataError, match=r"bad.jsonl:14: missing field 'label'"):
        train_and_evaluate(tiny_config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_streamed_sft_from_parquet_trains_like_the_records_say(tiny_llama_dir, tmp_path):
    from conftest import lm_config

    from sft_jax.train import train_and_evaluate

    rows = [{"input": f"{i} plus 1?", "output": f"It is {i + 1}."} for i in range(16)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet", row_group_size=4)
    write_jsonl(tmp_path / "eval.jsonl", rows[:4])
    c = lm_config(tiny_llama_dir, tmp_path, "full")
    c.task, c.data.streaming = "sft", True
    c.data.train, c.data.eval = str(tmp_path / "train.parquet"), str(tmp_path / "eval.jsonl")
    c.max_length, c.buckets, c.max_steps = 32, (16, 32), 3
    results = train_and_evaluate(c, str(tmp_path / "run"))
    assert results["train_examples"] == 16 and np.isfinite(results["eval/loss"])
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "train/loss" in m] == [1, 2, 3]


@pytest.mark.parametrize("task, change, message", [
    ("language_modeling", {}, "documents \\(language_modeling\\) and packing need"),
    ("sft", {"packing": True}, "documents \\(language_modeling\\) and packing need"),
])
def test_what_cannot_stream_is_refused_in_one_line(tiny_llama_dir, tmp_path, task, change, message):
    from conftest import lm_config

    from sft_jax.tasks.registry import check_config

    c = lm_config(tiny_llama_dir, tmp_path, "full")
    c.task, c.data.streaming = task, True
    c.update(change)
    with pytest.raises(ValueError, match=f"config.data.streaming: .*{message}"):
        check_config(c)


def test_image_classification_refuses_streaming(image_config, tmp_path):
    from sft_jax.tasks.registry import check_config

    c = image_config("train.jsonl", "eval.jsonl")
    c.data.streaming = True
    with pytest.raises(ValueError, match="config.data.streaming: task 'image_classification' reads"):
        check_config(c)
