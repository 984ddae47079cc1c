"""pytest-benchmark of the GRPO loss step (forward + backward) of every implementation that can run here.

Not part of ``pytest tests`` (it lives in benchmarks/). Small CPU shapes without a GPU; the issue's shapes
in bf16 on CUDA (the full table with GEMM ratios and memory: benchmarks/bench_gpu.py):

    pytest benchmarks/test_bench_loss.py --benchmark-columns=median,min,max
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from bench_gpu import SEQ_LEN, SHAPES, device_inputs  # noqa: E402  (benchmarks/ is on sys.path)

from grpo_fast.benchmarking import baselines as bench_baselines
from grpo_fast.benchmarking import harness as bench  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cuda":
    CASES = [
        bench.BenchCase(N=n, H=h, V=v, B=n // SEQ_LEN, dtype="bfloat16", device="cuda", beta=beta)
        for n, h, v in SHAPES
        for beta in (0.0, 0.04)
    ]
else:
    CASES = [bench.BenchCase(N=1024, H=128, V=4096, B=4, dtype="float32", device="cpu", beta=0.04)]
IMPLS = [name for name in bench.IMPLS if bench_baselines.runnable(name, DEVICE)]


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("case", CASES, ids=[f"N{c.N}-H{c.H}-V{c.V}-beta{c.beta}" for c in CASES])
@pytest.mark.parametrize("impl", IMPLS)
def test_loss_step(benchmark, impl: str, case: bench.BenchCase) -> None:
    try:
        step = bench.IMPLS[impl](device_inputs(case, 0), case)
        step()  # compiles (torch.compile, Triton) outside the timing
        _sync()
    except torch.cuda.OutOfMemoryError:
        pytest.skip(f"{impl} runs out of memory at N={case.N}, V={case.V}")

    def run() -> None:
        step()
        _sync()

    benchmark.pedantic(run, rounds=5 if DEVICE == "cuda" else 3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["tflops"] = 6.0 * case.N * case.H * case.V / benchmark.stats.stats.median / 1e12
