"""glibc malloc tuning for CPU training (unified/training/malloc.py)."""

import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_memory_is_kept_for_reuse():
    """After keep_freed_memory(), freeing a 256 MiB tensor leaves it in the process (it came
    from the heap, which is never trimmed); by default glibc serves it with mmap and unmaps it
    on free. Measured in fresh interpreters, by resident memory after the free."""
    code = """
import sys, torch
from unified.training.malloc import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
base = rss_mib()
x = torch.ones(64 * 2**20)  # 256 MiB, touched
del x
print(rss_mib() - base)
"""
    kept = {mode: float(subprocess.run([sys.executable, "-c", code, mode], check=True,
                                       capture_output=True, text=True).stdout)
            for mode in ("keep", "default")}
    assert kept["keep"] > 200, kept  # still resident: the next step reuses it
    assert kept["default"] < 50, kept  # returned to the kernel on free
