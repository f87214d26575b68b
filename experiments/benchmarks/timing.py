"""Timing a group of train steps in rotating rounds, so that a load change on a shared machine hits all of them
alike."""

from __future__ import annotations

import gc
import statistics
import time


def one_line_error(e: BaseException) -> str:
    """"TypeName: first line of the message" (torch.compile's errors run to pages)."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first}"[:300]


def measure(steps: dict, rounds: int, per_round: int, warmup: int, may_fail: frozenset | set = frozenset()
            ) -> dict[str, dict]:
    """Median seconds per step of each step object (an object with `step() -> loss`), timed in rotating
    rounds, and its first-call time. A step named in `may_fail` that raises (a compiler this CPU lacks) is
    recorded as {"error": one line} and leaves the rotation; any other step's error propagates."""
    out: dict[str, dict] = {}
    live = []
    for name, s in steps.items():
        try:
            t = time.perf_counter()
            s.step()
            out[name] = {"first_step_s": time.perf_counter() - t, "times": [], "cpu": []}
            for _ in range(warmup - 1):
                s.step()
            live.append(name)
        except Exception as e:  # noqa: BLE001 - only for steps allowed to fail, re-raised otherwise
            if name not in may_fail:
                raise
            out[name] = {"error": one_line_error(e)}
            print(f"{name}: failed: {out[name]['error']}", flush=True)
    for r in range(rounds):
        k = r % len(live) if live else 0
        for name in live[k:] + live[:k]:
            if "error" in out[name]:
                continue
            gc.collect()
            t, c = time.perf_counter(), time.process_time()
            try:
                for _ in range(per_round):
                    loss = steps[name].step()
            except Exception as e:  # noqa: BLE001 - as above
                if name not in may_fail:
                    raise
                out[name] = {"error": one_line_error(e)}
                continue
            out[name]["times"].append((time.perf_counter() - t) / per_round)
            out[name]["cpu"].append((time.process_time() - c) / per_round)
            if loss != loss:
                raise FloatingPointError(f"{name}: loss is NaN")
    for v in out.values():
        if "error" not in v:
            v["step_s"] = statistics.median(v["times"])
            v["cpu_s"] = statistics.median(v["cpu"])
    return out
