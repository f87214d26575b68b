"""Host memory for XLA:CPU steps: glibc malloc told to keep and reuse what is freed.

XLA:CPU allocates a step's temporaries (activations, gradients, the optimizer's intermediates: about 1.4 GB for
MiniLM at 32 x 128 tokens, 2.2 GB for SmolLM2-135M at 4 x 256) with malloc at the start of each execution and
frees them at its end. glibc serves blocks that large with a fresh mmap, or from a per-thread arena heap that
it shrinks again, and gives the pages back to the kernel on free; so every step page-faulted all of its
temporaries in again, 4 KiB at a time, with the kernel zeroing each page: hundreds of thousands of minor faults
per step, and system time of the order of the step's own arithmetic (experiments/benchmarks/notes.md).

`keep_freed_memory` sets three mallopt parameters for the whole process:
- M_ARENA_MAX = 1: every thread allocates from the main arena, a single brk heap that can hold blocks of any
  size (a thread arena's heap is at most 64 MiB, and larger blocks always get their own mmap);
- M_MMAP_MAX = 0: no block gets its own mmap, so a freed block stays in the heap for the next step;
- M_TRIM_THRESHOLD = -1 (the largest size_t): the heap's free top is never returned to the kernel.

After the first step the heap holds every step's temporaries and a train step takes no page fault at all.
The cost: the process keeps its peak heap (freed memory is reused, not returned), and one arena is shared by all
threads (XLA allocates a few large blocks per step; contention was not measurable). It must run before JAX
starts its CPU backend: threads that have already allocated keep their arenas. glibc only; elsewhere (macOS,
musl) nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set SETTINGS with glibc's mallopt; True when all were accepted, False where this is not glibc."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = all(mallopt(param, value) == 1 for param, value in SETTINGS)
    return _applied


def applied() -> bool:
    """Whether `keep_freed_memory` has run and glibc accepted its settings."""
    return bool(_applied)
