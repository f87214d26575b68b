"""Weighted mixtures of training sources (config.data.mixture): rows follow the weights within a binomial bound,
each source is seen whole before it repeats, a batch is a pure function of (seed, step) in any process, a mixed
run resumes bit-identically and scores each source's own evaluation data as eval/<source>/..., plain text
replays into sft, and a bad mixture stops in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import resumed_after_crash, sentiment_records, write_jsonl

from sft_jax.data.batching import EncodedDataset
from sft_jax.data.errors import DataError
from sft_jax.data.mixture import MixtureBatches

SIZES, WEIGHTS = (10, 7, 3), (5.0, 3.0, 2.0)  # weights need not sum to 1


def _mixture(seed=0, batch_size=16) -> MixtureBatches:
    """Three sources of SIZES rows; row i of source s holds the tokens [s, i]."""
    parts = [EncodedDataset([np.array([s, i], np.int32) for i in range(n)], np.zeros(n, np.int32),
                            [f"s{s}:{i}" for i in range(n)]) for s, n in enumerate(SIZES)]
    return MixtureBatches(parts, WEIGHTS, batch_size, (2,), seed, pad_id=-1)


def test_rows_follow_the_weights_within_a_binomial_bound():
    steps, rows = 3000, 16
    picked = _mixture().sources_of(np.arange(steps))
    n = steps * rows
    for s, p in enumerate(np.array(WEIGHTS) / sum(WEIGHTS)):
        count = int((picked == s).sum())
        assert abs(count - n * p) <= 4.5 * np.sqrt(n * p * (1 - p)), (s, count, n * p)
    shares = (picked == 2).mean(axis=1)  # rows are drawn one at a time: a batch's share varies around 0.2
    assert shares.min() == 0 and shares.max() > 0.4


def test_each_source_is_seen_whole_before_any_example_repeats():
    mix = _mixture()
    seen = {s: [] for s in range(len(SIZES))}
    for step in range(40):
        for s, i in mix.batch(step)["input_ids"]:
            seen[int(s)].append(int(i))
    for s, n in enumerate(SIZES):
        epochs = [seen[s][k: k + n] for k in range(0, len(seen[s]) - n + 1, n)]
        assert len(epochs) >= 3
        assert all(sorted(e) == list(range(n)) for e in epochs), s
        assert epochs[0] != epochs[1]  # each epoch has its own order


_DRAWS = """
import json, numpy as np
from sft_jax.data.batching import EncodedDataset
from sft_jax.data.mixture import MixtureBatches
parts = [EncodedDataset([np.array([s, i], np.int32) for i in range(n)], np.zeros(n, np.int32), [""] * n)
         for s, n in enumerate({sizes})]
print(json.dumps([a.tolist() for a in MixtureBatches(parts, {weights}, 16, (2,), 0, -1).draws({step})]))
"""


def test_a_batch_is_a_pure_function_of_seed_and_step_in_any_process():
    walked = _mixture()
    for step in range(37):
        walked.draws(step)
    expected = [a.tolist() for a in walked.draws(37)]
    assert [a.tolist() for a in _mixture().draws(37)] == expected  # a restart at step 37 (a resume)
    code = _DRAWS.format(sizes=SIZES, weights=WEIGHTS, step=37)
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "123"})
    assert json.loads(other.stdout) == expected  # another process (another hash seed)
    assert [a.tolist() for a in _mixture(seed=1).draws(37)] != expected
    jumped = _mixture()
    jumped.draws(80)
    assert [a.tolist() for a in jumped.draws(37)] == expected  # back to an earlier step: recounted


# --- config ------------------------------------------------------------------------------------------------------
def _source(path, **kw):
    return {"train": str(path), "weight": 1.0, **kw}


@pytest.mark.parametrize("mixture, change, message", [
    ([{"weight": 1.0}], {}, r"mixture\[0\].train: the source's training data .* is missing"),
    (["x.jsonl"], {}, r"mixture\[0\]: a dict with keys"),
    ([{"train": "x.jsonl", "weight": 0}], {}, r"mixture\[0\].weight: must be a positive number, got 0"),
    ([{"train": "x.jsonl", "weight": -0.5}], {}, r"mixture\[0\].weight: must be a positive number, got -0.5"),
    ([{"train": "x.jsonl", "weight": float("inf")}], {}, r"mixture\[0\].weight: .* got inf"),
    ([{"train": "x.jsonl", "weight": "0.5"}], {}, r"mixture\[0\].weight: .* got '0.5'"),
    ([{"train": "x.jsonl"}], {}, r"mixture\[0\].weight: .* got None"),
    ([{"train": "a/x.jsonl", "weight": 1}, {"train": "b/x.jsonl", "weight": 1}], {},
     r"mixture\[1\].name: 'x' names another source too"),
    ([{"train": "x.jsonl", "weight": 1, "weights": 2}], {}, r"mixture\[0\]: unknown key\(s\) \['weights'\]"),
    ([{"train": "x.jsonl", "weight": 1, "name": "a/b"}], {}, r"mixture\[0\].name: 'a/b' must be"),
    ([{"train": "x.jsonl", "weight": 1, "format": "text"}], {}, r"mixture\[0\].format: 'text' is not one task"),
    ([{"train": "x.jsonl", "weight": 1}], {"data.train": "y.jsonl"}, r"config.data.train: not with data.mixture"),
    ([{"train": "x.jsonl", "weight": 1}], {"data.streaming": True}, r"config.data.streaming: not with data.mixture"),
    ([{"train": "x.jsonl", "weight": 1}], {"early_stopping.metric": "eval/x/accuracy"},
     r"early_stopping.metric: 'eval/x/accuracy' is not one of"),  # x has no eval data
])
def test_a_bad_mixture_is_refused_in_one_line(tiny_config, mixture, change, message):
    from sft_jax.config_defaults import validate

    tiny_config.data.train = ""
    tiny_config.data.mixture = tuple(mixture)
    for key, value in change.items():
        section, name = key.split(".")
        tiny_config[section][name] = value
    with pytest.raises(ValueError, match=message) as e:
        validate(tiny_config)
    assert "\n" not in str(e.value)


def test_a_source_with_no_examples_names_its_file(tiny_config, tmp_path):
    from sft_jax.train import train_and_evaluate

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    tiny_config.data.mixture = (_source(tiny_config.data.train), _source(empty))
    tiny_config.data.train = ""
    with pytest.raises(DataError, match=f"^{empty}: no examples$"):
        train_and_evaluate(tiny_config, str(tmp_path / "run"))


# --- runs --------------------------------------------------------------------------------------------------------
def test_a_mixed_run_resumes_bit_identically_and_scores_each_source(tiny_config, tmp_path, monkeypatch):
    from sft_jax.train import train_and_evaluate

    replay = write_jsonl(tmp_path / "old_task.jsonl", sentiment_records(24, offset=500))
    replay_eval = write_jsonl(tmp_path / "old_task_eval.jsonl", sentiment_records(8, offset=600))
    tiny_config.data.mixture = ({"train": tiny_config.data.train, "weight": 0.75},
                                {"train": str(replay), "weight": 0.25, "eval": str(replay_eval), "name": "replay"})
    tiny_config.data.train = ""
    tiny_config.early_stopping.metric = "eval/replay/loss"  # a source's metric can select the checkpoint
    uninterrupted = train_and_evaluate(tiny_config, str(tmp_path / "one"))
    assert uninterrupted["data/train/train_examples"] == 64 and uninterrupted["data/replay/train_examples"] == 24
    assert uninterrupted["train_examples"] == 88
    for key in ("eval/replay/loss", "eval/replay/accuracy", "eval/replay/f1", "eval/loss", "eval/accuracy"):
        assert np.isfinite(uninterrupted[key]), key
    assert uninterrupted["eval/replay/loss"] != uninterrupted["eval/loss"]
    metrics = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "eval/replay/loss" in m] == [2, 4]
    saved = json.loads((tmp_path / "one" / "results.json").read_text())
    assert saved["eval/replay/accuracy"] == uninterrupted["eval/replay/accuracy"]

    resumed = resumed_after_crash(tiny_config, tmp_path / "two", monkeypatch, step=2)
    assert resumed["params_fingerprint"] == uninterrupted["params_fingerprint"]
    assert resumed["eval/replay/loss"] == uninterrupted["eval/replay/loss"]


def test_plain_text_replays_into_sft(tiny_llama_dir, tmp_path):
    from conftest import LM_TEXT, lm_config

    from sft_jax.train import train_and_evaluate

    rows = [{"input": f"{i} plus 1?", "output": f"It is {i + 1}."} for i in range(16)]
    c = lm_config(tiny_llama_dir, tmp_path, "full")
    c.task = "sft"
    (tmp_path / "wiki.txt").write_text(LM_TEXT * 4)
    c.data.mixture = (_source(write_jsonl(tmp_path / "sums.jsonl", rows), weight=3),
                      _source(tmp_path / "wiki.txt[:75%]", weight=1, format="text",
                              eval=str(tmp_path / "wiki.txt[75%:]")))
    c.data.train, c.data.eval = "", str(write_jsonl(tmp_path / "eval.jsonl", rows[:4]))
    c.max_length, c.buckets, c.max_steps = 32, (16, 32), 2
    c.eval_generation.metrics, c.eval_generation.num_examples, c.eval_generation.max_new_tokens = \
        ("exact_match",), 2, 4
    results = train_and_evaluate(c, str(tmp_path / "run"))
    assert results["data/sums/train_examples"] == 16 and results["data/wiki/train_examples"] > 1
    assert np.isfinite(results["eval/wiki/loss"]) and np.isfinite(results["eval/loss"])
    assert "eval/exact_match" in results and "eval/wiki/exact_match" not in results  # text has no prompts
