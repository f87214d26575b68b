"""The throughput benchmark (experiments/benchmarks) end to end on a tiny random BERT, one or two steps per
variant: each sft_jax row is compared with the fastest PyTorch variant of its own dtype, the peak-normalised
ratio follows from the recorded peaks, memory comes from one process per framework, and the CPU is named."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from experiments.benchmarks.comparison import score
from experiments.benchmarks.timing import measure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke_run(tiny_bert_dir, tmp_path_factory):
    """results.json, meta.json and RESULTS.md of `--cases=minilm-full` at 2 x 16 on the tiny BERT, with
    PyTorch eager and torch.compile (default) in float32 and bfloat16 autocast."""
    out = tmp_path_factory.mktemp("benchmark")
    env = dict(os.environ)  # one JAX device, as on the command line (conftest forces 8 for sharding tests)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    cmd = [sys.executable, "-m", "experiments.benchmarks.run", "--cases=minilm-full", "--batch=2", "--seq_len=16",
           "--steps=1", "--rounds=2", "--warmup=1", "--torch_variants=eager,compile", "--matmul_n=256",
           "--memory_steps=1", f"--model_dir=minilm={tiny_bert_dir}", f"--out={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "results.json") as f, open(out / "meta.json") as g:
        return json.load(f), json.load(g), (out / "RESULTS.md").read_text()


def test_each_row_against_the_fastest_variant_of_its_dtype(smoke_run):
    records, meta, _ = smoke_run
    assert meta["complete"] and "errors" not in meta["peaks_flops"]
    assert sorted(r["dtype"] for r in records) == ["bfloat16", "float32"]
    for r in records:
        variants = r["torch_variants"]
        assert sorted(variants) == ["torch-compile-bf16-autocast", "torch-compile-float32",
                                    "torch-eager-bf16-autocast", "torch-eager-float32"]
        for v in variants.values():  # each timed, or failed with its one-line error
            assert ("step_s" in v) != ("error" in v) and "\n" not in v.get("error", "")
        assert "step_s" in variants["torch-eager-" + ("float32" if r["dtype"] == "float32" else "bf16-autocast")]
        same = {n: v["step_s"] for n, v in variants.items() if v["dtype"] == r["dtype"] and "step_s" in v}
        fastest = min(same, key=same.get)
        assert r["baseline"] == fastest
        assert r["ratio"] == pytest.approx(same[fastest] / r["ours_step_s"])
        assert r["baseline_tokens_per_s"] == pytest.approx(r["batch"] * r["seq_len"] / same[fastest])


def test_peak_normalised_ratio_uses_each_frameworks_own_peak(smoke_run):
    records, meta, _ = smoke_run
    peaks = meta["peaks_flops"]
    for r in records:
        jax_peak, torch_peak = peaks[f"jax-{r['dtype']}"], peaks[f"torch-{r['dtype']}"]
        assert (r["jax_peak_flops"], r["torch_peak_flops"]) == (jax_peak, torch_peak)
        expected = (r["ours_tokens_per_s"] / jax_peak) / (r["baseline_tokens_per_s"] / torch_peak)
        assert r["ratio_peak_normalised"] == pytest.approx(expected)
        assert r["ratio_peak_normalised"] == pytest.approx(r["mfu"] / r["baseline_mfu"])


def test_peak_memory_comes_from_one_process_per_framework(smoke_run):
    records, _, _ = smoke_run
    for r in records:
        assert "ours_memory_error" not in r and "torch_memory_error" not in r
        assert "jax" in r["ours_memory_process_loaded"] and r["torch_memory_process_loaded"] == ["torch"]
        assert r["ours_peak_rss_mb"] > 0 and r["torch_peak_rss_mb"] > 0
        assert r["ours_peak_rss_mb"] != r["torch_peak_rss_mb"]  # one shared process would give one figure
        assert r["torch_peak_rss_variant"] == r["torch_variants"][r["baseline"]]["compiler"]


def test_the_cpu_and_both_peaks_are_named_beside_the_figures(smoke_run):
    _, meta, report = smoke_run
    cpu = meta["cpu"]
    assert cpu["model_name"] and cpu["threads"] == meta["threads"]["jax"] == meta["threads"]["torch"]
    assert cpu["model_name"] in report and f"family {cpu['family']}" in report
    assert all(flag in report for flag in cpu["flags"])
    peaks = meta["peaks_flops"]
    for key in ("jax-float32", "jax-bfloat16", "torch-float32", "torch-bfloat16"):
        assert f"{peaks[key] / 1e9:.1f}" in report


class _Step:
    def __init__(self, fail_at: int | None = None):
        self.calls, self.fail_at = 0, fail_at

    def step(self) -> float:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("no C++ compiler\nlong traceback")
        return 0.0


def test_a_variant_that_fails_is_recorded_not_raised():
    out = measure({"ours": _Step(), "compiled": _Step(fail_at=1), "late": _Step(fail_at=3)}, rounds=3,
                  per_round=1, warmup=1, may_fail={"compiled", "late"})
    assert out["compiled"] == {"error": "RuntimeError: no C++ compiler"}
    assert out["late"] == {"error": "RuntimeError: no C++ compiler"}
    assert len(out["ours"]["times"]) == 3
    with pytest.raises(RuntimeError):  # a step not allowed to fail stops the group
        measure({"ours": _Step(fail_at=1)}, rounds=1, per_round=1, warmup=1)


def test_a_dtype_whose_variants_all_failed_has_no_ratio():
    rec = {"dtype": "bfloat16", "batch": 2, "seq_len": 4, "ours_step_s": 0.5, "flops_per_step": 1e9,
           "torch_variants": {"torch-eager-float32": {"dtype": "float32", "step_s": 0.1, "tokens_per_s": 80.0,
                                                      "cpu_s_per_step": 0.2, "step_times_s": [0.1],
                                                      "first_step_s": 0.1},
                              "torch-compile-bf16-autocast": {"dtype": "bfloat16", "error": "E: x"}}}
    score(rec, {"jax-bfloat16": 1e10, "torch-bfloat16": 2e10})
    assert rec["baseline"] is None and rec["ratio"] is None and rec["ratio_peak_normalised"] is None
    assert rec["mfu"] == pytest.approx(1e9 / 0.5 / 1e10)
