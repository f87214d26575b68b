"""Where a train step's time goes: a `jax.profiler` trace of one step, summed by XLA thunk kind and, for the
matmuls, by dot shape with each shape's GFLOP/s (stop 18's MiniLM table in ../notes.md).

    python -m experiments.benchmarks.micro.profile_dots MODEL STRATEGY DTYPE [--out=/tmp/sft_jax_trace]

Thunk times are summed over XLA's worker threads, so with two thunks running at once their sum exceeds the
step's wall time; a dot fusion's FLOPs are read off the compiled HLO (2 x output elements x contracted size).
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import shutil
import time

from experiments.benchmarks.ours import OursStep
from sft_jax import platform

_SHAPE = r"(\w+\[[\d,]*\])"
_INSTR = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = " + _SHAPE)
_DOT = re.compile(r"\s*(?:ROOT )?%?[\w.\-]+ = " + _SHAPE + r"\S* dot\(%?([\w.\-]+), %?([\w.\-]+)\)")


def _dims(shape: str) -> list[int]:
    inner = shape[shape.index("[") + 1:-1]
    return [int(d) for d in inner.split(",") if d]


def _computations(hlo: str) -> dict[str, list[str]]:
    comps, cur = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line) if line and not line.startswith(" ") else None
        if m:
            cur = comps.setdefault(m.group(1), [])
        elif cur is not None:
            cur.append(line)
    return comps


def _dots(lines: list[str]) -> list[tuple[str, float]]:
    """(signature, FLOPs) of each dot in a fused computation."""
    shapes = {m.group(1): m.group(2) for m in map(_INSTR.match, lines) if m}
    out = []
    for line in lines:
        m = _DOT.match(line)
        if not m:
            continue
        lhs, rhs = shapes.get(m.group(2), "?[]"), shapes.get(m.group(3), "?[]")
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
        k = 1
        for d in (contracting.group(1).split(",") if contracting and contracting.group(1) else []):
            k *= _dims(lhs)[int(d)]
        n = 1
        for d in _dims(m.group(1)):
            n *= d
        dims = re.search(r"(lhs_batch_dims=\{[\d,]*\}, )?lhs_contracting_dims=\{[\d,]*\}"
                         r".*?rhs_contracting_dims=\{[\d,]*\}", line)
        out.append((f"{lhs} x {rhs} -> {m.group(1)} {dims.group(0) if dims else ''}", 2.0 * n * k))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=("minilm", "smollm2"))
    p.add_argument("strategy", choices=("full", "partial", "head", "lora"))
    p.add_argument("dtype", choices=("float32", "bfloat16"))
    p.add_argument("--out", default="/tmp/sft_jax_trace")
    args = p.parse_args()
    platform.configure_cpu()  # malloc and XNNPACK settings, before JAX starts
    import jax
    from jax.profiler import ProfileData

    step = OursStep(args.model, args.strategy, args.dtype, *((32, 128) if args.model == "minilm" else (4, 256)))
    for _ in range(3):
        step.step()
    t = time.perf_counter()
    step.step()
    print(f"untraced step {time.perf_counter() - t:.3f} s")
    shutil.rmtree(args.out, ignore_errors=True)
    with jax.profiler.trace(args.out):
        t = time.perf_counter()
        step.step()
        print(f"traced step {time.perf_counter() - t:.3f} s")
    trace = ProfileData.from_file(glob.glob(f"{args.out}/**/*.xplane.pb", recursive=True)[0])
    thunks = collections.Counter()  # thunk name -> ms, over XLA's worker threads
    for plane in trace.planes:
        for line in plane.lines:
            if line.name.startswith("tf_XLAEigen"):
                for ev in line.events:
                    if not ev.name.startswith(("ThunkExecutor", "end:")):
                        thunks[ev.name] += ev.duration_ns / 1e6
    total = sum(thunks.values())
    kinds = collections.Counter()
    for name, ms in thunks.items():
        kinds[re.sub(r"\.\d+$", "", name)] += ms
    print(f"\nthunk time {total:.1f} ms, by kind:")
    for kind, ms in kinds.most_common(15):
        print(f"  {ms:8.1f} ms {100 * ms / total:5.1f}%  {kind}")
    hlo = step.fn.lower(step.state, step.batch).compile().as_text()
    comps = _computations(hlo)
    calls = {m.group(1): m.group(2) for m in re.finditer(r"%?([\w.\-]+) = .* calls=%?([\w.\-]+)", hlo)}
    by_sig = collections.defaultdict(lambda: [0.0, 0, 0.0])
    for name, ms in thunks.items():
        dots = _dots(comps.get(calls.get(name, ""), []))
        if dots:
            sig = re.sub(r"\.\d+$", "", name) + " " + " | ".join(d[0] for d in dots)
            by_sig[sig][0] += ms
            by_sig[sig][1] += 1
            by_sig[sig][2] += sum(d[1] for d in dots)
    dot_ms, dot_flops = sum(v[0] for v in by_sig.values()), sum(v[2] for v in by_sig.values())
    print(f"\nmatmul thunks {dot_ms:.1f} ms ({100 * dot_ms / total:.0f}%), {dot_flops / 1e9:.1f} GFLOP, "
          f"{dot_flops / dot_ms / 1e6:.0f} GFLOP/s; by dot:")
    for sig, (ms, n, flops) in sorted(by_sig.items(), key=lambda kv: -kv[1][0]):
        print(f"  {ms:8.1f} ms {n:3d}x {flops / ms / 1e6:6.1f} GFLOP/s  {sig}")


if __name__ == "__main__":
    main()
