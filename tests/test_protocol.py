"""experiments/protocol.py: the statistics tables are made of (sample SD, t-interval, paired differences), the
budget and seed checks, and the kept files of each run (config, results, metrics, code version)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess

import pytest

from experiments import protocol


def test_summary_is_the_mean_sample_sd_and_t_interval():
    s = protocol.summarize([1.0, 2.0, 3.0])
    assert (s.n, s.mean, s.sd) == (3, 2.0, 1.0)
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2 degrees of freedom) * sd / sqrt(n)
    assert s.low == pytest.approx(2.0 - half) and s.high == pytest.approx(2.0 + half)
    assert s.format(scale=100, digits=1) == "200.0 ± 248.4 [-48.4, 448.4] (n=3)"
    one = protocol.summarize([0.5])
    assert one.n == 1 and math.isnan(one.sd) and one.format() == "0.50 (n=1, no interval)"
    with pytest.raises(ValueError, match="no values"):
        protocol.summarize([])


def test_paired_differences_use_the_shared_seeds_only():
    a = {0: 0.90, 1: 0.88, 2: 0.91, 7: 0.5}
    b = {0: 0.85, 1: 0.86, 2: 0.86}
    d = protocol.paired(a, b)
    assert d.n == 3 and d.mean == pytest.approx((0.05 + 0.02 + 0.05) / 3)
    with pytest.raises(ValueError, match="share no seed"):
        protocol.paired({0: 1.0}, {1: 1.0})


def test_budget_and_seed_checks_name_the_arm():
    protocol.check_equal_budget({"full": {"max_steps": 300}, "head": {"max_steps": 300}})
    with pytest.raises(ValueError, match=r"unequal budgets \(max_steps\): \{'full': 3000, 'head': 1500\}"):
        protocol.check_equal_budget({"full": {"max_steps": 3000}, "head": {"max_steps": 1500}})
    with pytest.raises(ValueError, match=r"arm 'head': 2 seeds, the protocol asks for at least 3"):
        protocol.check_seeds({"full": [0, 1, 2], "head": [0, 1, 1]})


def _git(root, *args):
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=root, check=True,
                   capture_output=True)


def test_kept_runs_hold_their_files_and_code_version(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    _git(repo, "add", "code.py")
    _git(repo, "commit", "-q", "-m", "c")
    assert protocol.code_version(str(repo))["dirty"] is False
    (repo / "code.py").write_text("x = 2\n")
    version = protocol.code_version(str(repo))
    assert version["dirty"] is True and len(version["commit"]) == 40
    assert protocol.code_version(str(tmp_path / "nowhere")) == {"commit": None, "dirty": None}

    experiment = tmp_path / "exp"
    for arm, seed, acc in (("full", 0, 0.9), ("full", 1, 0.8), ("head", 0, 0.7)):
        workdir = tmp_path / f"w_{arm}_{seed}"
        workdir.mkdir()
        (workdir / "config.json").write_text(json.dumps({"seed": seed, "max_steps": 10}))
        (workdir / "results.json").write_text(json.dumps({"eval/accuracy": acc}))
        (workdir / "metrics.jsonl").write_text(json.dumps({"step": 10, "eval/accuracy": acc}) + "\n")
        protocol.keep_run(str(workdir), str(experiment), arm, seed, command=f"train {arm}", budget="10 steps")
    runs = protocol.load_runs(str(experiment))
    assert [(r["arm"], r["seed"]) for r in runs] == [("full", 0), ("full", 1), ("head", 0)]
    assert runs[1]["metrics"] == [{"step": 10, "eval/accuracy": 0.8}] and runs[1]["config"]["seed"] == 1
    assert runs[0]["provenance"]["command"] == "train full" and runs[0]["provenance"]["budget"] == "10 steps"
    assert protocol.by_arm(runs, "eval/accuracy") == {"full": {0: 0.9, 1: 0.8}, "head": {0: 0.7}}
    assert protocol.provenance_line(runs).startswith("3 runs, code version ")
    plotted = []
    protocol.write_results(str(experiment), lambda rs: f"{len(rs)} runs\n",
                           lambda rs, path: plotted.append((len(rs), path)), "plot.png")
    assert (experiment / "RESULTS.md").read_text() == "3 runs\n"
    assert plotted == [(3, str(experiment / "plot.png"))]
    with pytest.raises(SystemExit, match="no kept runs"):  # nothing kept: nothing written
        protocol.write_results(str(tmp_path / "empty"), lambda rs: "x")
    assert not (tmp_path / "empty" / "RESULTS.md").exists()
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        (tmp_path / "unfinished").mkdir()
        (tmp_path / "unfinished" / "config.json").write_text("{}")
        (tmp_path / "unfinished" / "results.json").write_text("{}")
        protocol.keep_run(str(tmp_path / "unfinished"), str(experiment), "full", 2)


def test_a_kept_run_is_reused_only_for_its_own_command(tmp_path):
    """An experiment longer than a session goes on from its kept runs (on a fresh clone, without workdirs);
    a run kept from another recipe is refused, never silently reused."""
    workdir, experiment = tmp_path / "w", tmp_path / "exp"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"seed": 0}))
    (workdir / "results.json").write_text(json.dumps({"eval/accuracy": 0.9}))
    (workdir / "metrics.jsonl").write_text("")
    assert protocol.kept_results(str(experiment), "full", 0, "train --lr=1") is None
    protocol.keep_run(str(workdir), str(experiment), "full", 0, command="train --lr=1")
    assert protocol.kept_results(str(experiment), "full", 0, "train --lr=1") == {"eval/accuracy": 0.9,
                                                                              "command": "train --lr=1"}
    assert protocol.kept_results(str(experiment), "full", 1, "train --lr=1") is None
    with pytest.raises(ValueError, match=r"seed_0: kept from another command"):
        protocol.kept_results(str(experiment), "full", 0, "train --lr=2")


def test_run_kept_trains_once_then_reads_the_kept_run(tmp_path, monkeypatch):
    from experiments import common

    trained = []

    def fake_run_cli(config, workdir, overrides):  # what sft_jax.main leaves in a workdir
        trained.append(workdir)
        os.makedirs(workdir, exist_ok=True)
        for name, text in (("config.json", "{}"), ("results.json", json.dumps({"eval/loss": 1.5})),
                           ("metrics.jsonl", "")):
            with open(os.path.join(workdir, name), "w") as f:
                f.write(text)
        return {"eval/loss": 1.5, "command": common.cli_command(config, workdir, overrides)}

    monkeypatch.setattr(common, "run_cli", fake_run_cli)
    args = ("configs/x.py:full", str(tmp_path / "w"), {"seed": 0}, str(tmp_path / "exp"), "full", 0)
    assert common.run_kept(*args, method="full")["eval/loss"] == 1.5
    shutil.rmtree(tmp_path / "w")  # a fresh clone: no workdir, only the committed runs/
    assert common.run_kept(*args, method="full")["eval/loss"] == 1.5
    assert len(trained) == 1
    assert protocol.load_runs(str(tmp_path / "exp"))[0]["provenance"]["method"] == "full"


def test_decoder_line_names_the_gguf_origin_and_the_one_shared_probe():
    from configs.common import WIKITEXT2_PROBE, smollm2_sft

    config = json.loads(smollm2_sft("lora").to_json())
    assert {k: config["forgetting"][k] for k in WIKITEXT2_PROBE} == WIKITEXT2_PROBE
    runs = [{"config": config}, {"config": config}]
    line = protocol.decoder_line(runs)
    assert "smollm2-135m-instruct (weights dequantised from the packaged GGUF `SmolLM2-135M-Instruct.Q4_1.gguf`)" \
        in line
    assert "first 16,384 tokens" in line and "windows of 512 tokens with stride 511" in line
    other = json.loads(json.dumps(config))
    other["forgetting"]["wikitext2_max_tokens"] = 8192  # a second probe definition: not one scale
    with pytest.raises(ValueError, match="2 different WikiText-2 probes"):
        protocol.decoder_line([{"config": config}, {"config": other}])


@pytest.mark.parametrize("name", ["shakespeare_lm", "xsum_smollm2", "gsm8k_smollm2", "continual_decoder",
                                  "gemma3_sft"])
def test_every_decoder_config_uses_the_shared_wikitext_probe(name):
    import importlib

    from configs.common import WIKITEXT2_PROBE
    from sft_jax.config_defaults import validate

    config = importlib.import_module(f"configs.{name}").get_config()
    if not config.data.train and not config.data.mixture:
        config.data.train = config.data.eval = "records.jsonl"  # gemma3_sft leaves its data to the caller
    validate(config)
    assert {k: config.forgetting[k] for k in WIKITEXT2_PROBE} == WIKITEXT2_PROBE
    assert config.forgetting.wikitext2.endswith("wikitext2_raw")


def test_decoder_strategies_report_is_made_from_kept_runs(tmp_path):
    from configs.common import smollm2_sft
    from experiments import decoder_strategies

    task = decoder_strategies.Task(title="T", here=str(tmp_path), config="configs/xsum_smollm2.py", metric="rougeL",
                                   metric_name="ROUGE-L", overrides={}, description="D.")
    config = json.loads(smollm2_sft("lora").to_json())
    config["data"]["validation_fraction"] = 0.1
    for arm, seed, rouge, rise in (("base", 0, 10.0, 0.0), ("lora", 0, 20.0, 0.5), ("lora", 1, 22.0, 0.7),
                                   ("full", 0, 25.0, 2.0), ("full", 1, 29.0, 2.4)):
        workdir = tmp_path / f"w_{arm}_{seed}"
        workdir.mkdir()
        (workdir / "config.json").write_text(json.dumps({**config, "max_steps": 1 if arm == "base" else 330}))
        (workdir / "results.json").write_text(json.dumps({
            "test/rougeL": rouge, "test/loss": 3.0, "forgetting/wikitext2_ppl/before": 28.0,
            "forgetting/wikitext2_ppl/after": 28.0 + rise, "forgetting/wikitext2_ppl/rise": rise,
            "trainable_params": 7}))
        (workdir / "metrics.jsonl").write_text("{}\n")
        protocol.keep_run(str(workdir), str(tmp_path), arm, seed)
    text = decoder_strategies.report(task, protocol.load_runs(str(tmp_path)))
    assert "| base | 0 | 10.00 (n=1, no interval)" in text  # the base model is one greedy run, not a seed sample
    assert "| lora | 7 | 21.00 ± 12.71 [8.29, 33.71] (n=2)" in text  # t(0.975, 1) = 12.706
    assert "| full - lora | 6.00 ± 12.71 [-6.71, 18.71] (n=2)" in text  # paired by seed: differences 5 and 7
    assert "WikiText-2 perplexity before fine-tuning: 28.00." in text and "Model: smollm2-135m-instruct" in text
