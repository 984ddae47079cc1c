"""Time and peak memory of a training step, for the benchmark scripts that run one case per process."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable


def rss_mb() -> float:
    """This process's resident set now (MB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure(
    step: Callable[[], None], device: str, iters: int, warmup_in_peak: bool
) -> tuple[list[float], float]:
    """Seconds of each of ``iters`` timed calls of ``step`` after one warm-up call, and the peak memory (MB)
    above what the process held before: torch's peak allocation on CUDA, the resident set's high-water
    mark on the CPU. ``warmup_in_peak``: the start is taken before the warm-up, so its memory counts."""
    import torch

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    if not warmup_in_peak:
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_mb()
    if warmup_in_peak:
        step()
        sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return times, peak
