"""The GPU run's ``longctx`` phase: for each implementation, the largest N whose step fits a memory budget.

At H=4096, V=151936 (the run's ``longctx_shape``), each search bounded by the run's deadline; rows
``{impl, H, V, dtype, budget_gb, max_N, capped, probes}`` (``error`` when the search failed or ran out of
time).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from gpu_common import Deadline, device_inputs, free, is_oom

from grpo_fast.benchmarking import harness as bench

LONGCTX_IMPLS = ("grpo_fast-triton", "trl")


class OutOfTime(Exception):
    """The run's deadline passed in the middle of a long-context search."""


def probe_peak_bytes(impl: str, n: int, args, budget: int, deadline: Deadline) -> int | None:
    """Total peak bytes (inputs included) of one step at N=n, or None when it runs out of the budget.

    On the CPU (``--dry-run``) the step runs (the code path is what is rehearsed) and the bytes are the
    inputs' own: the CUDA allocator is what measures peaks."""
    if deadline.passed():
        raise OutOfTime
    h, v = args.longctx_shape
    case = bench.BenchCase(N=n, H=h, V=v, B=max(1, n // args.seq_len), dtype=args.dtype, device=args.device)
    free()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        inputs = device_inputs(case, 0)
        step = bench.IMPLS[impl](inputs, case)
        step()
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = sum(t.numel() * t.element_size() for t in inputs.values() if torch.is_tensor(t))
    except Exception as err:
        if not is_oom(err):
            raise
        peak = None
    finally:
        inputs = step = None  # noqa: F841 - drop the inputs before the next probe
        free()
    return peak if peak is not None and peak <= budget else None


def largest_fitting(probe: Callable[[int], int | None], budget: int, step: int, cap: int) -> tuple[int, list]:
    """Largest multiple of `step`, at most `cap`, whose probe fits (0 if none); also the probes made,
    as [N, peak bytes or None].

    Peak memory is affine in N once the chunking is fixed, so two probes predict the answer, and two more
    confirm it (it fits, one step more does not). Where the model is off, the bracket found is bisected.
    """
    log: list = []

    def fits(n: int) -> bool:
        peak = probe(n)
        log.append([n, peak])
        return peak is not None

    down = lambda x: int(x) // step * step  # noqa: E731
    lo, hi = 0, None  # lo fits (0: nothing yet); hi does not (None: unknown)
    for n in (8 * step, 16 * step):
        if n > cap:
            break
        if not fits(n):
            hi = n
            break
        lo = n
    if hi is None and len(log) == 2:
        (n1, p1), (n2, p2) = log
        slope = max((p2 - p1) / (n2 - n1), 1.0)
        guess = min(cap, down(n2 + (budget - p2) / slope))
        if guess > lo:
            if fits(guess):
                lo = guess
            else:
                hi = guess
        while hi is None and lo < cap and len(log) < 12:  # confirm one step more fails; grow if it fits
            n = min(cap, lo + step if len(log) <= 3 else max(lo + step, down(lo * 1.25)))
            if fits(n):
                lo = n
            else:
                hi = n
    if hi is None:  # everything tried fits: the cap (or the first probes) bound the answer
        return lo, log
    while hi - lo > step and len(log) < 24:
        mid = down((lo + hi) // 2)
        if mid <= lo:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, log


def run_longctx(args, results: Any, impls: list[str], deadline: Deadline) -> bool:
    """Search each implementation not on record yet; True when all are (False: cut by the deadline)."""
    budget = int(args.budget_gb * 1e9)
    cuda = args.device.startswith("cuda")
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        # The allocator refuses past the budget: a run that cannot fit fails fast instead of filling the card.
        torch.cuda.set_per_process_memory_fraction(min(1.0, (budget + 2**30) / total))
    h, v = args.longctx_shape
    try:
        for impl in [i for i in LONGCTX_IMPLS if i in impls]:
            if results.has_long(impl):
                continue
            if deadline.passed():
                print("time limit reached: stopping (re-run with the same --out to resume)", flush=True)
                return False
            t0 = time.monotonic()
            row = dict(impl=impl, H=h, V=v, dtype=args.dtype, budget_gb=args.budget_gb, dry_run=not cuda)
            try:
                n, probes = largest_fitting(
                    lambda n, impl=impl: probe_peak_bytes(impl, n, args, budget, deadline),
                    budget,
                    args.seq_len,
                    args.max_n,
                )
                row.update(max_N=n, capped=n >= args.max_n, probes=probes)
            except OutOfTime:
                row.update(max_N=None, cut=True, error="cut: the run's time limit passed during the search")
            except Exception as err:
                traceback.print_exc()
                row.update(max_N=None, error=f"{type(err).__name__}: {err}"[:500])
            results.add("long_context", row)
            print(f"  {impl:<18} largest N in {args.budget_gb:g} GB: {row['max_N']} "
                  f"({time.monotonic() - t0:.0f} s)", flush=True)  # fmt: skip
    finally:
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0)
    return not any(r.get("cut") for r in results.data["long_context"])
