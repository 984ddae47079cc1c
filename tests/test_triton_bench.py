"""The GPU benchmark's pieces on the CPU: the baselines compute the same loss, the long-context search
finds the largest fitting N, the results file resumes, the report renders.

The timings themselves need a GPU (benchmarks/run_gpu.sh); here every implementation runs a tiny case
(grpo_fast-triton under Triton's interpreter) and must give the reference's gradients.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from grpo_fast.benchmarking import baselines as bench_baselines
from grpo_fast.benchmarking import harness as bench

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
bench_gpu = pytest.importorskip("bench_gpu")
gpu_longctx = pytest.importorskip("gpu_longctx")

# The interpreter evaluates both sides of tl.where in numpy, so masked lanes warn about inf - inf.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

CASE = bench.BenchCase(N=64, H=24, V=301, B=4, dtype="float32", device="cpu", beta=0.04)


def _grads(impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = bench.make_inputs(CASE)
    bench.IMPLS[impl](inputs, CASE)()
    return inputs["hidden"].grad, inputs["weight"].grad


def _available(impl: str) -> bool:
    modules = bench_baselines.IMPLS_SPEC[impl][1]
    if impl == "grpo_fast-triton" and not torch.cuda.is_available():
        return importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"
    return all(importlib.util.find_spec(m) is not None for m in modules)


@pytest.mark.parametrize("impl", ["trl", "liger", "grpo_fast-triton"])
def test_baselines_compute_the_reference_gradients(impl):
    if not _available(impl):
        pytest.skip(f"{impl} cannot run here")
    want = _grads("reference")
    got = _grads(impl)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_one_table_and_runnable():
    for name in bench_baselines.BASELINES:
        assert name in bench.IMPLS
        assert not bench_baselines.runnable(name, "cpu")  # all need CUDA
    assert bench_baselines.runnable("reference", "cpu")
    assert not bench_baselines.runnable("no-such-impl", "cpu")


def test_library_code_has_no_mocks_or_import_time_registration():
    import inspect

    for module in (bench_baselines, bench):
        assert "unittest" not in inspect.getsource(module)
    assert not hasattr(bench_baselines, "register")


def test_trl_loss_lines_match_the_reference():
    """TRL's loss on given log-probs (reference.loss_from_logps, the TRL baseline's loss) equals
    grpo_fast.reference.grpo_loss for every loss type."""
    import grpo_fast as gf
    from grpo_fast.config import LOSS_TYPES

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(3, 9, 16, generator=g), torch.randn(50, 16, generator=g) * 0.3
    targets = torch.randint(0, 50, (3, 9), generator=g)
    mask = torch.rand(3, 9, generator=g) > 0.3
    adv = torch.randn(3, generator=g)
    old, ref = torch.randn(3, 9, generator=g) * 0.1 - 4, torch.randn(3, 9, generator=g) * 0.1 - 4
    for loss_type in LOSS_TYPES:
        for level in ("token", "sequence"):
            cfg = gf.GRPOConfig(loss_type=loss_type, beta=0.04, importance_sampling_level=level,
                                max_completion_length=9)  # fmt: skip
            want, _ = gf.reference.grpo_loss(hidden, weight, targets, mask, adv, old, ref, config=cfg)
            logp, ent = gf.reference.selective_logprobs(hidden, weight, targets, return_entropy=True)
            got, _ = gf.reference.loss_from_logps(logp, ent, mask, adv, old, ref, cfg)
            torch.testing.assert_close(got, want, msg=f"{loss_type} {level}")


def _affine(a: float, b: float, budget: float):
    return lambda n: (a + b * n) if a + b * n <= budget else None


@pytest.mark.parametrize(
    "a, b, cap",
    [(6e9, 16e3, 2**21), (6e9, 16e3, 2**20), (1e9, 2.4e6, 2**21), (50e9, 1.0, 2**21), (6e9, 40e3, 2**21)],
    ids=["linear", "capped", "reference-like", "nothing-fits", "trl-like"],
)
def test_long_context_search_finds_the_largest_n(a, b, cap):
    budget, step = 40e9, 1024
    probe = _affine(a, b, budget)
    n, probes = gpu_longctx.largest_fitting(probe, budget, step, cap)
    truth = max([k * step for k in range(1, cap // step + 1) if probe(k * step) is not None], default=0)
    assert n == truth
    assert len(probes) <= 6  # affine memory: two probes predict, two confirm


def test_long_context_search_bisects_when_memory_is_not_affine():
    budget, step = 40e9, 1024
    probe = lambda n: (6e9 + 16e3 * n + 1e-3 * n * n) if 6e9 + 16e3 * n + 1e-3 * n * n <= budget else None  # noqa: E731
    n, _ = gpu_longctx.largest_fitting(probe, budget, step, 2**21)
    assert probe(n) is not None and probe(n + step) is None


def test_results_resume_and_report(tmp_path):
    out = tmp_path / "dev-20260101.json"
    args = ["--device", "cpu", "--dtype", "float32", "--shape", "128,16,97", "--beta", "0.04", "--iters", "1"]
    assert bench_gpu.main([*args, "--impl", "reference", "--out", str(out), "--phase", "table"]) == 0
    again = [*args, "--impl", "reference", "--impl", "grpo_fast-torch", "--out", str(out)]
    assert bench_gpu.main([*again, "--phase", "table", "--phase", "report"]) == 0
    data = json.loads(out.read_text())
    assert [r["impl"] for r in data["rows"]] == ["reference", "grpo_fast-torch"]  # the first row not redone
    row = data["rows"][0]
    assert set(row) >= {"impl", "N", "H", "V", "dtype", "beta", "ms", "tflops", "gemm_ratio", "peak_mb"}
    assert {"device", "torch", "triton", "commit"} <= set(data)
    table = out.with_suffix(".md").read_text()
    assert "| 128 | 16 | 97 | 0.04 | grpo_fast-torch |" in table
    assert out.with_suffix(".png").stat().st_size > 1000
