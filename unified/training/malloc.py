"""Keep freed memory in the process during CPU training (glibc malloc tuning).

PyTorch on CPU allocates every activation and gradient with the C library's malloc. glibc
serves large blocks (over its mmap threshold, at most 32 MiB) with fresh mmap()s and gives them
back to the kernel on free(), and it trims the heap top as soon as 128 KiB are free. A training
step frees and reallocates the same gigabytes every step, so each step page-faults and zeroes
them again. Asking glibc to keep that memory (what Intel's and PyTorch's CPU tuning guides get
by preloading jemalloc or tcmalloc, which this machine does not have) cut the step of a
342M-parameter stage 2 on the 2-vCPU machine from 19.6-22.8 s to 15.2 s and halved the kernel
time (bench/training.py, docs/performance.md §2).

The cost: the process keeps its peak memory until it exits. That suits a training run, not a
long-lived server, so only the trainer calls this, and only when it trains on the CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

# mallopt() parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
NEVER = -1  # M_TRIM_THRESHOLD -1: trimming off (mallopt(3))
TOP_PAD = 1 << 30  # grow the heap 1 GiB at a time


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap, never trim it, grow it in 1 GiB steps. Returns
    whether glibc accepted all three settings (False elsewhere, e.g. on macOS or musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in
             ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER), (M_TOP_PAD, TOP_PAD)))
    log.info("glibc malloc keeps freed memory for reuse (no mmap, no trim): %s",
             "on" if ok else "refused")
    return ok
