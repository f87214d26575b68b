"""Each sft_jax row against its strongest peer: the fastest PyTorch variant of the same dtype, by wall time and
by each framework's share of its own matmul peak."""

from __future__ import annotations


def fastest_peer(variants: dict[str, dict], dtype: str) -> str | None:
    """The name of the fastest variant of `dtype` that ran (None if every one failed or none was run)."""
    ran = {name: v for name, v in variants.items() if v["dtype"] == dtype and "step_s" in v}
    return min(ran, key=lambda name: ran[name]["step_s"]) if ran else None


def score(rec: dict, peaks: dict) -> None:
    """Sets `rec`'s baseline (the fastest same-dtype variant in rec["torch_variants"]), ratio, MFU and the
    peak-normalised ratio from its times and `peaks` (FLOP/s by "jax-DTYPE" / "torch-DTYPE"). Called when the
    row is measured and again at the end of the run, with the best peaks seen."""
    dtype = rec["dtype"]
    jax_peak, torch_peak = peaks[f"jax-{dtype}"], peaks[f"torch-{dtype}"]
    rec["jax_peak_flops"], rec["torch_peak_flops"] = jax_peak, torch_peak
    rec["mfu"] = rec["flops_per_step"] / rec["ours_step_s"] / jax_peak
    name = fastest_peer(rec["torch_variants"], dtype)
    rec["baseline"] = name
    if name is None:
        rec.update(ratio=None, ratio_peak_normalised=None, baseline_mfu=None, baseline_step_s=None,
                   baseline_tokens_per_s=None, baseline_cpu_s_per_step=None)
        return
    peer = rec["torch_variants"][name]
    ours_tok_s = rec["batch"] * rec["seq_len"] / rec["ours_step_s"]
    rec.update(baseline_step_s=peer["step_s"], baseline_tokens_per_s=peer["tokens_per_s"],
               baseline_cpu_s_per_step=peer["cpu_s_per_step"], baseline_step_times_s=peer["step_times_s"],
               baseline_first_step_s=peer["first_step_s"], ratio=peer["step_s"] / rec["ours_step_s"],
               # the torch step's model FLOPs over its time, against PyTorch's own matmul peak of this dtype
               baseline_mfu=rec["flops_per_step"] / peer["step_s"] / torch_peak,
               ratio_peak_normalised=(ours_tok_s / jax_peak) / (peer["tokens_per_s"] / torch_peak))
