"""The time-to-accuracy experiment (experiments/time_to_accuracy): both arms' --smoke run end to end on a tiny
random BERT and 64 jsonl examples, and the HF arm's XSum examples against sft_jax's own encoding."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke_out(tiny_bert_dir, tmp_path_factory):
    from conftest import sentiment_records, write_jsonl

    tmp = tmp_path_factory.mktemp("tta")
    train = write_jsonl(tmp / "train.jsonl", sentiment_records(64))
    dev = write_jsonl(tmp / "dev.jsonl", sentiment_records(16, offset=64))
    out = tmp / "out"
    cmd = [sys.executable, "-m", "experiments.time_to_accuracy.run", "--smoke", "--seeds=0", f"--out={out}",
           f"--model=minilm={tiny_bert_dir}", f"--data=minilm={train},{dev}"]
    # Without the 8 simulated devices of conftest's XLA_FLAGS: the arms run as a user's command would.
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_smoke_results_hold_both_arms_with_timed_evaluations(smoke_out):
    results = json.loads((smoke_out / "results.json").read_text())
    assert results["smoke"] and results["machine"]["cores"] >= 1 and results["code_version"]
    assert results["cases"]["minilm"]["target"] == 0.88
    runs = results["runs"]
    assert [(r["arm"], r["seed"]) for r in runs] == [("sft_jax", 0), ("hf_trainer", 0)]
    for r in runs:
        # max_steps 4, an evaluation every 2: steps 2 and 4 unless the target stopped the run at step 2
        steps = [e["step"] for e in r["evals"]]
        assert steps in ([2, 4], [2]), (r["arm"], steps)
        assert all(0.0 <= e["value"] <= 1.0 for e in r["evals"])
        times = [e["wall_s"] for e in r["evals"]]
        assert times == sorted(times) and 0 < times[0] <= r["process_wall_s"] + 1
        reached = [e for e in r["evals"] if e["value"] >= 0.88]
        if reached:
            assert r["time_to_target_s"] == reached[0]["wall_s"] and r["step_at_target"] == reached[0]["step"]
        else:
            assert r["time_to_target_s"] is None and r["step_at_target"] is None
    assert "sft_jax.main" in runs[0]["command"] and "hf_trainer.py" in runs[1]["command"]


def test_smoke_report_renders(smoke_out):
    text = (smoke_out / "RESULTS.md").read_text()
    assert "## minilm: time to eval/accuracy >= 0.88" in text
    assert "HF Trainer (hf_trainer.py)" in text and "sft_jax (python -m sft_jax.main)" in text
    assert "Ratio HF Trainer / sft_jax" in text and "--smoke" in text


def test_report_ratio_and_interval():
    from experiments.time_to_accuracy.report import ratio, summarise

    fast = summarise([{"time_to_target_s": t} for t in (10.0, 12.0, 14.0)])
    slow = summarise([{"time_to_target_s": t} for t in (24.0, 18.0, 30.0)])
    assert (fast["mean"], fast["min"], fast["max"]) == (12.0, 10.0, 14.0)
    assert ratio({"sft_jax": fast, "hf_trainer": slow}) == pytest.approx(2.0)
    missed = summarise([{"time_to_target_s": None}, {"time_to_target_s": 5.0}])
    assert missed["reached"] == 1 and ratio({"sft_jax": missed, "hf_trainer": slow}) is None


def test_hf_xsum_examples_match_sft_jax_encoding():
    """The HF arm trains on the tokens and targets sft_jax's sft task builds from the same record."""
    pytest.importorskip("transformers")
    from experiments.time_to_accuracy.hf_trainer import SUMMARY_PROMPT, xsum_example
    from sft_jax.data.sft import PAIR, PromptFormat, Record, encode_record
    from sft_jax.models.loading.lm import load_lm_tokenizer

    try:
        tokenizer = load_lm_tokenizer("smollm2-135m-instruct")
    except ValueError as e:
        pytest.skip(str(e))
    record = {"document": "The council voted on Tuesday to close the old bridge for repairs.",
              "summary": "A bridge is to close for repairs."}
    fmt = PromptFormat(template=SUMMARY_PROMPT + "{input}", chat=True)
    ids, mask, _ = encode_record(Record(PAIR, "test", input=record["document"], output=record["summary"]),
                                 tokenizer, fmt, 256)
    ours = xsum_example(record, tokenizer, 256)
    n = len(ours["input_ids"])
    assert ours["input_ids"] == ids[:n]  # sft_jax also keeps the newline after the last <|im_end|> (no target)
    assert [int(label != -100) for label in ours["labels"]] == mask[:n] and sum(mask[n:]) == 0
    short = xsum_example({**record, "document": record["document"] * 40}, tokenizer, 64)
    assert len(short["input_ids"]) <= 64
    summary_ids = tokenizer(record["summary"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert [x for x in short["labels"] if x != -100] == summary_ids  # the article is cut, never the summary


def test_report_splits_the_ratio_into_time_per_step_and_steps():
    from experiments.time_to_accuracy.report import summarise

    runs = [{"time_to_target_s": t, "step_at_target": n, "evals": [{"step": 250, "wall_s": f}]}
            for t, n, f in ((100.0, 1000, 40.0), (125.0, 1250, 50.0), (100.0, 1000, 45.0))]
    s = summarise(runs)
    assert s["first_eval_s"] == pytest.approx(45.0)
    assert s["steps"] == pytest.approx(1083.333, rel=1e-4)
    assert s["s_per_step"] == pytest.approx(0.1)
    assert s["interval"].n == 3 and s["interval"].low < s["mean"] < s["interval"].high


def test_rerunning_one_case_keeps_the_others_with_their_own_provenance(smoke_out, tmp_path):
    from experiments.time_to_accuracy.report import render
    from experiments.time_to_accuracy.run import carry_other_cases

    earlier = json.loads((smoke_out / "results.json").read_text())
    earlier["smoke"] = False  # a smoke file is never carried: it is not a measurement
    path = tmp_path / "results.json"
    path.write_text(json.dumps(earlier))
    now = {"command": "python -m experiments.time_to_accuracy.run --cases=other", "code_version": "new",
           "machine": earlier["machine"], "smoke": False, "poll_s": earlier["poll_s"], "cases": {}, "runs": []}
    carry_other_cases(str(path), now, ["other"])
    assert now["runs"] == earlier["runs"]
    assert now["cases"]["minilm"]["made_by"]["code_version"] == earlier["code_version"]
    rerun = dict(now, cases={}, runs=[])
    carry_other_cases(str(path), rerun, ["minilm"])  # the case being rerun is not carried
    assert rerun["cases"] == {} and rerun["runs"] == []
    # The rerun case (here a copy of minilm under another name) beside the carried one: each says who made it.
    now["cases"]["other"] = {**now["cases"]["minilm"], "made_by": {k: now[k] for k in ("command", "code_version",
                                                                                          "machine")}}
    now["runs"] += [{**r, "case": "other"} for r in earlier["runs"]]
    text = render(now)
    assert text.count("Produced by `") == 2
    assert f"at code version {earlier['code_version']}" in text and "at code version new" in text
