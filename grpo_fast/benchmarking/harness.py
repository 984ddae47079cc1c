"""Benchmarks of the GRPO loss: forward+backward median time and peak memory above the inputs.

Each implementation is a factory turning a set of inputs into a ``step()`` that runs forward and
backward once. Times are medians over rotated input sets (so no cache stays warm across calls);
on CUDA they come from CUDA events, on the CPU from ``perf_counter``. CPU peak memory is measured
in a fresh process per implementation (peak RSS minus RSS with the inputs alive), CUDA peak memory
with ``torch.cuda.max_memory_allocated`` minus the memory allocated by the inputs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch

from .baselines import IMPLS, runnable
from .cases import DTYPES, BenchCase, make_inputs

__all__ = ["DTYPES", "IMPLS", "BenchCase", "make_inputs", "runnable", "run", "time_impl", "peak_mb"]


def available_impls(device: str) -> list[str]:
    """The implementations that can run on ``device`` here."""
    return [name for name in IMPLS if runnable(name, device)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_ms(steps: list[Callable[[], object]], device: str, iters: int, warmup: int = 1) -> float:
    """Median ms of one call, cycling through `steps` (one per rotated input set)."""
    for i in range(warmup):
        steps[i % len(steps)]()
    _sync(device)
    times = []
    for i in range(iters):
        step = steps[i % len(steps)]
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_impl(impl: str, case: BenchCase, iters: int = 5, rotations: int = 2) -> float:
    """Median milliseconds of one forward+backward of `impl`."""
    steps = [IMPLS[impl](make_inputs(case, seed), case) for seed in range(rotations)]
    return _median_ms(steps, case.device, iters)


def gemm_ms(case: BenchCase, iters: int = 5) -> float:
    """Median ms of the plain [N, H] x [H, V] GEMM in the case's dtype: the rate to compare with."""
    dtype, device = DTYPES[case.dtype], torch.device(case.device)
    a = torch.randn(case.N, case.H, device=device, dtype=dtype)
    b = torch.randn(case.V, case.H, device=device, dtype=dtype)
    return _median_ms([lambda: torch.mm(a, b.t())], case.device, iters)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    # Linux >= 4.0: writing 5 resets VmHWM to the current RSS, so import-time peaks do not count.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cuda_peak_above_mb(step: Callable[[], None]) -> float:
    """Peak CUDA memory one call of ``step`` allocates above what is allocated before it, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def peak_mb_here(impl: str, case: BenchCase) -> float:
    """Peak memory of one step above the inputs, measured in this process."""
    inputs = make_inputs(case)
    step = IMPLS[impl](inputs, case)
    gc.collect()
    if case.device.startswith("cuda"):
        return cuda_peak_above_mb(step)
    _reset_peak_rss()
    base = _rss_bytes()
    step()
    return max(_peak_rss_bytes() - base, 0) / 2**20


def peak_mb(impl: str, case: BenchCase) -> float:
    """CPU: a fresh process per measurement, so earlier allocations cannot hide the peak."""
    if case.device.startswith("cuda"):
        return peak_mb_here(impl, case)
    cmd = [sys.executable, "-m", "grpo_fast.benchmarking.harness", "--worker", impl, json.dumps(asdict(case))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class Row:
    impl: str
    N: int
    H: int
    V: int
    dtype: str
    beta: float
    ms: float
    tflops: float
    gemm_ratio: float
    peak_mb: float


def run(
    cases: list[BenchCase], impls: list[str], iters: int = 5, progress: Callable[[str], None] | None = None
) -> list[Row]:
    rows = []
    for case in cases:
        flops = 6.0 * case.N * case.H * case.V
        gemm_rate = 2.0 * case.N * case.H * case.V / gemm_ms(case, iters)
        for impl in impls:
            if progress:
                progress(f"{impl} N={case.N} H={case.H} V={case.V} {case.dtype}")
            ms = time_impl(impl, case, iters=iters)
            mem = peak_mb(impl, case)
            rows.append(
                Row(
                    impl,
                    case.N,
                    case.H,
                    case.V,
                    case.dtype,
                    case.beta,
                    ms,
                    flops / ms / 1e9,
                    (flops / ms) / gemm_rate,
                    mem,
                )
            )
    return rows


def format_table(rows: list[Row], baseline: str = "reference") -> str:
    base = {(r.N, r.H, r.V, r.dtype, r.beta): r for r in rows if r.impl == baseline}
    header = (
        f"{'impl':<18} {'N':>6} {'H':>5} {'V':>7} {'dtype':>8} {'beta':>5} {'ms':>10} {'TFLOP/s':>8} "
        f"{'GEMM%':>6} {'peak MB':>9} {'x faster':>8} {'x less mem':>10}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        ref = base.get((r.N, r.H, r.V, r.dtype, r.beta))
        speed = f"{ref.ms / r.ms:8.2f}" if ref else f"{'':>8}"
        mem = f"{ref.peak_mb / max(r.peak_mb, 1e-9):10.1f}" if ref else f"{'':>10}"
        lines.append(
            f"{r.impl:<18} {r.N:>6} {r.H:>5} {r.V:>7} {r.dtype:>8} {r.beta:>5} {r.ms:>10.1f} "
            f"{r.tflops:>8.3f} {100 * r.gemm_ratio:>5.0f}% {r.peak_mb:>9.0f} {speed} {mem}"
        )
    return "\n".join(lines)


def environment() -> dict:
    """Device, library versions and commit, for results on record."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(__file__),
        ).stdout.strip()
    except OSError:
        commit = ""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d"),
    }


def _worker(argv: list[str]) -> None:
    impl, case = argv[0], BenchCase(**json.loads(argv[1]))
    torch.manual_seed(0)
    print(peak_mb_here(impl, case))


def default_cases(device: str, dtype: str | None = None) -> list[BenchCase]:
    if device.startswith("cuda"):
        return [BenchCase(N=8192, H=4096, V=151936, B=16, dtype=dtype or "bfloat16", device=device)]
    return [BenchCase(N=2048, H=512, V=32768, B=4, dtype=dtype or "float32", device=device)]


def with_options(case: BenchCase, **changes) -> BenchCase:
    return replace(case, **{k: v for k, v in changes.items() if v is not None})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="internal: peak-memory worker of grpo-fast bench")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "CASE_JSON"), required=True)
    _worker(parser.parse_args().worker)
