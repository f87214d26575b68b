"""Does a oneDNN-compiled step earlier in the process slow XLA's later ones? SmolLM2 `head` bfloat16 (XLA
matmuls) against PyTorch, 4 rounds before and after MiniLM `full` float32 (oneDNN matmuls) has run."""
import os
import statistics
import time

import torch

from experiments.benchmarks.baseline import TorchStep
from experiments.benchmarks.ours import OursStep, synthetic_batch
from sft_jax import platform

HERE = os.path.dirname(os.path.abspath(__file__))
platform.configure_cpu()  # malloc and XNNPACK settings, before JAX starts
torch.set_num_threads(len(os.sched_getaffinity(0)))
ours = OursStep("smollm2", "head", "bfloat16", 4, 256)
ours.step(), ours.step()
base = TorchStep("smollm2", "head", synthetic_batch("smollm2", 4, 256), "cpu",
                 os.path.join(os.path.dirname(HERE), "workdirs"))
base.step()


def rounds(n: int, tag: str) -> None:
    wall = {"ours": [], "torch": []}
    for r in range(n):
        for name, s in (("ours", ours), ("torch", base))[:: 1 if r % 2 == 0 else -1]:
            t = time.perf_counter()
            s.step()
            wall[name].append(time.perf_counter() - t)
    o, t = statistics.median(wall["ours"]), statistics.median(wall["torch"])
    print(f"{tag}: ours {o:.3f} s, torch {t:.3f} s, ratio {t / o:.2f}", flush=True)


rounds(4, "before oneDNN")
minilm = OursStep("minilm", "full", "float32", 32, 128)
for _ in range(3):
    minilm.step()
rounds(4, "after oneDNN MiniLM")
del minilm
rounds(4, "after, MiniLM freed")
