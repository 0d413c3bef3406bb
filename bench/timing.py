"""Wall-clock timing shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], warm: Callable[[], object] | None = None,
                min_runs: int = 1, max_runs: int = 3, budget_s: float = 4.0) -> float:
    """Median wall time of fn() after one warm-up call (`warm`, default fn itself): min_runs,
    then more while the budget lasts (at most max_runs)."""
    (warm or fn)()
    times: list[float] = []
    while len(times) < min_runs or (len(times) < max_runs and sum(times) < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
