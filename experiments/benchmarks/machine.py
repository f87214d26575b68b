"""The machine a benchmark ran on, as recorded beside its figures: the device, and on CPU the model, family /
model / stepping and the instruction-set flags that decide which matmul kernels run."""

from __future__ import annotations

import os
import platform

# The /proc/cpuinfo flags that select GEMM kernels (XLA, oneDNN and PyTorch's all dispatch on these);
# `hypervisor`: a virtual machine, whose speed drifts with its neighbours.
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
                  "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16", "hypervisor")


def describe_cpu(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """{"model_name", "family", "model", "stepping", "flags" (the RELEVANT_FLAGS present), "threads"} of the
    first processor listed; fields /proc/cpuinfo lacks (not Linux, not x86) are None."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    present = set(fields.get("flags", "").split())
    return {"model_name": fields.get("model name") or platform.processor() or None,
            "family": fields.get("cpu family"), "model": fields.get("model"), "stepping": fields.get("stepping"),
            "flags": [f for f in RELEVANT_FLAGS if f in present], "threads": len(os.sched_getaffinity(0))}


def cpu_line(cpu: dict) -> str:
    """One line naming the CPU: "Intel(R) Xeon(R) Processor (family 6, model 143, stepping 8; avx512f ...;
    2 threads)"."""
    ids = ", ".join(f"{k} {cpu[k]}" for k in ("family", "model", "stepping") if cpu.get(k) is not None)
    flags = " ".join(cpu.get("flags") or []) or "none of " + " ".join(RELEVANT_FLAGS)
    return f"{cpu.get('model_name') or 'unknown CPU'} ({ids}; flags: {flags}; {cpu['threads']} threads)"


def device_name() -> str:
    """"cpu: MODEL NAME (N threads)" or "gpu: DEVICE KIND", from JAX's first device."""
    import jax

    d = jax.devices()[0]
    if d.platform == "cpu":
        cpu = describe_cpu()
        return f"cpu: {cpu['model_name']} ({cpu['threads']} threads)"
    return f"{d.platform}: {d.device_kind}"
