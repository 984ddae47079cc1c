"""What the GPU run's phases share: the benchmark batch drawn on the device, deadlines and time boxes."""

from __future__ import annotations

import contextlib
import gc
import math
import signal
import time
from collections.abc import Iterator

import torch

from grpo_fast.benchmarking import harness as bench


def device_inputs(case: bench.BenchCase, seed: int) -> dict:
    """bench.make_inputs's batch, drawn on the device (fast at these sizes), every token unmasked."""
    dtype, device = bench.DTYPES[case.dtype], torch.device(case.device)
    gen = torch.Generator(device=device).manual_seed(seed)
    B, T = case.B, case.T

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    inputs = dict(
        hidden=randn(B, T, case.H, scale=0.5).requires_grad_(True),
        weight=randn(case.V, case.H, scale=case.H**-0.5).requires_grad_(True),
        targets=torch.randint(0, case.V, (B, T), generator=gen, device=device),
        mask=torch.ones(B, T, dtype=torch.bool, device=device),
        advantages=torch.randn(B, generator=gen, device=device),
    )
    base = -math.log(case.V)  # a random model's log-probs; old/ref a little off so ratios vary
    if case.with_old:
        inputs["old_logp"] = base + 0.1 * torch.randn(B, T, generator=gen, device=device)
    if case.beta:
        inputs["ref_logp"] = base + 0.1 * torch.randn(B, T, generator=gen, device=device)
    return inputs


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


class Deadline:
    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() > self.end


class OverTime(Exception):
    """A measurement ran past its time box."""


@contextlib.contextmanager
def time_box(seconds: float | None) -> Iterator[None]:
    """Raise :class:`OverTime` in the block once ``seconds`` have passed (SIGALRM, main thread only).

    The signal is handled between Python bytecodes: a step stuck inside one CUDA call is not cut until it
    returns (the phase's own timeout, in run_gpu.sh, is the backstop); a slow step is cut between
    iterations."""
    if not seconds or seconds <= 0:
        yield
        return

    def alarm(signum, frame) -> None:
        raise OverTime(f"over its {seconds:g} s time box")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
