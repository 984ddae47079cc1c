"""Every compiled backend's chunk ops and public entry points against the fp64 truth, one parametrized set.

The same tests run on "native" (grpo_fast._C, CPU) and "triton" (its kernels; without CUDA under Triton's
interpreter, which tests/conftest.py turns on). Kernels one by one (stats, vocab-shard partials, grad with
and without the entropy-gradient term), then selective_logprobs and grpo_loss on each backend. Sizes are
odd, not multiples of any block. Tolerance (tests/helpers.py): the error against the fp64 truth may exceed
PyTorch's error in the same dtype by at most a small per-dtype margin. What only one backend has (the
native build and op registration, the Triton fused GEMM and its launch configurations) stays in
tests/test_native_ops.py and tests/test_triton_ops.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

import grpo_fast as gf
from grpo_fast import backends
from grpo_fast.backends import _native
from grpo_fast.backends.base import ChunkOps
from grpo_fast.backends.torch_ops import TorchChunkOps
from grpo_fast.config import LOSS_TYPES

from .chunk_cases import C, V, run_logprobs, truth_dlogits, truth_entropy_grad, truth_stats
from .chunk_cases import tile as cpu_tile
from .helpers import assert_within, cast, make_batch
from .test_loss import LOSS_BACKENDS, check_against_truth

# The interpreter evaluates both sides of tl.where in numpy, so masked lanes warn about inf - inf.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

FP32, BF16, FP16, FP64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
DTYPE_IDS = {FP32: "fp32", BF16: "bf16", FP16: "fp16", FP64: "fp64"}


@dataclass(frozen=True)
class Case:
    """One backend as these tests run it: where, in which dtypes, at what sizes."""

    name: str
    device: str
    dtypes: tuple[torch.dtype, ...]  # tile dtypes its kernels are tested in here
    small: bool  # the interpreter runs one program at a time: smaller batches for the public API tests

    @property
    def ops(self) -> ChunkOps:
        return backends.chunk_ops(self.name)


def _why_skip(name: str) -> str | None:
    if name == "native":
        return None if _native.available() else f"grpo_fast._C not built: {_native.load_error()}"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA and TRITON_INTERPRET is not 1: the Triton kernels cannot run"
    return None


CASES = {
    "native": Case("native", "cpu", (FP32, BF16, FP16, FP64), small=False),
    # The interpreter computes tl.dot on bfloat16 wrongly: bf16 is tests/test_triton_gpu.py's, on a GPU.
    "triton": Case("triton", "cuda" if torch.cuda.is_available() else "cpu", (FP32, FP16), small=True),
}


@pytest.fixture(params=list(CASES), name="case")
def _case(request) -> Case:
    reason = _why_skip(request.param)
    if reason is not None:
        pytest.skip(reason)
    return CASES[request.param]


def _dtype(case: Case, dtype: torch.dtype) -> None:
    if dtype not in case.dtypes:
        pytest.skip(f"{case.name} is not tested in {dtype} here")


def tile(case: Case, dtype: torch.dtype, seed: int = 0, rows: int = C, cols: int = V):
    return cpu_tile(dtype, seed, rows, cols, device=case.device)


TILE_DTYPES = pytest.mark.parametrize("dtype", [FP32, BF16, FP16], ids=lambda d: DTYPE_IDS[d])

# ---------------------------------------------------------------- the ops, one by one


@TILE_DTYPES
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunk_stats(case, dtype, temperature):
    _dtype(case, dtype)
    logits, targets = tile(case, dtype, seed=1)
    before = logits.clone()
    got = case.ops.stats(logits, targets, temperature)
    assert torch.equal(logits, before), "stats must leave the tile unchanged"
    same = TorchChunkOps().stats(logits.clone(), targets, temperature)
    truth = truth_stats(logits, targets, temperature)
    for name, a, b, t in zip(("lse", "logp", "entropy"), got, same, truth, strict=True):
        # lse fp64 (m + log s unrounded, for grad_), logp and entropy fp32
        assert a.dtype == (torch.float64 if name == "lse" else torch.float32) and a.shape == (C,)
        assert_within(name, a, b, t, dtype)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1e-2])
def test_tile_pass_dlogits_carry_no_rounding_of_lse(case, temperature):
    """Peaked rows far from 0 (lse ~ 30 / T, log s ~ 1): p = exp(z - lse) with lse rounded to fp32 would
    shift every p of a row by ulp(lse), far more than log_softmax's exp((z - m) - log s) errs."""
    gen = torch.Generator().manual_seed(9)
    x = (torch.randn(C, V, generator=gen) * 3 + 30) * temperature
    x[:, 0] += 9 * temperature  # a dominant token: p near 1
    targets = torch.where(torch.rand(C, generator=gen) < 0.5, 0, torch.randint(0, V, (C,), generator=gen))
    g = torch.randn(C, generator=gen)
    p = torch.softmax(x.double() / temperature, -1)
    truth = (torch.nn.functional.one_hot(targets, V).double() - p) * g.double()[:, None] / temperature

    def err(ops) -> float:
        dl = ops.tile_pass_(
            x.clone().to(case.device), targets.to(case.device), temperature, lambda lp, e: (g, None)
        )
        return ((dl[3].double().cpu() - truth).norm() / truth.norm()).item()

    want = err(TorchChunkOps())
    assert err(case.ops) <= 2 * want + torch.finfo(torch.float32).eps, (err(case.ops), want)


@TILE_DTYPES
def test_partial_stats_of_shards_combine_to_whole(case, dtype):
    """Vocabulary shards' partials (targets outside a shard read nothing) merge into the whole row's."""
    _dtype(case, dtype)
    logits, targets = tile(case, dtype, seed=3)
    cuts = [0, 300, 301, V]
    bounds = list(zip(cuts, cuts[1:], strict=False))
    parts = [case.ops.partial_stats(logits[:, a:b], targets - a, 0.8) for a, b in bounds]
    for (a, b), p in zip(bounds, parts, strict=True):
        want = TorchChunkOps().partial_stats(logits[:, a:b], targets - a, 0.8)
        torch.testing.assert_close(p, want, rtol=2e-5, atol=2e-5)
    m, s, u, t = torch.stack(parts).double().unbind(1)
    big_m = m.max(0).values
    r = torch.exp(m - big_m)
    big_s = (r * s).sum(0)
    lse = big_m + big_s.log()
    entropy = big_s.log() - (r * (u + s * (m - big_m))).sum(0) / big_s
    truth = truth_stats(logits, targets, 0.8)
    same = TorchChunkOps().stats(logits.clone(), targets, 0.8)
    combined = (lse, t.sum(0) - lse, entropy)
    for name, a, b, want in zip(("lse", "logp", "entropy"), combined, same, truth, strict=True):
        assert_within(name, a, b, want, dtype)


@TILE_DTYPES
def test_chunk_grad_in_place(case, dtype):
    _dtype(case, dtype)
    logits, targets = tile(case, dtype, seed=4)
    lse = TorchChunkOps().stats(logits.clone(), targets, 0.7)[0]
    g = torch.randn(C, generator=torch.Generator().manual_seed(5)).to(case.device)
    targets[3] = -1  # other shards' tokens: no one-hot term
    targets[4] = V + 2
    work = logits.clone()
    out = case.ops.grad_(work, targets, lse, g, 0.7)
    assert out.data_ptr() == work.data_ptr() and out.dtype == dtype
    same = TorchChunkOps().grad_(logits.clone(), targets, lse, g, 0.7)
    truth = truth_dlogits(logits, targets.clamp(0, V - 1), lse, g, 0.7)
    for row in (3, 4):
        truth[row] = -g[row].double() / 0.7 * torch.exp(logits[row].double() / 0.7 - lse[row].double())
    assert_within("dlogits", out, same, truth, dtype)


@pytest.mark.parametrize("dtype", [FP32, BF16, FP16, FP64], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("cols", [4099, 33])
def test_chunk_grad_entropy_term_matches_autograd(case, dtype, temperature, cols):
    """stats, then grad_ with ent_coef: e * dH/dx plus g * dlogp/dx, as fp64 autograd has it."""
    _dtype(case, dtype)
    rows = 7
    logits, targets = tile(case, dtype, seed=20 + cols, rows=rows, cols=cols)
    targets[3] = -1  # other shards' tokens: no one-hot term
    targets[5] = cols + 2
    gen = torch.Generator().manual_seed(21)
    g, e = torch.randn(2, rows, generator=gen).to(case.device).unbind(0)
    e[1] = 0.0
    if dtype == FP64:  # an fp64 check has fp64 coefficients (the fp64 tiles' fallback keeps them)
        g, e = g.double(), e.double()
    truth = truth_entropy_grad(logits, targets, g, e, temperature)

    def run(ops: ChunkOps):  # each backend from its own statistics, as the chunk loop runs it
        lse, _, entropy = ops.stats(logits, targets.clamp(0, cols - 1), temperature)  # logp unused
        work = logits.clone()
        out = ops.grad_(work, targets, lse, g, temperature, ent_coef=e, entropy=entropy)
        assert out.data_ptr() == work.data_ptr() and out.dtype == dtype
        return out

    got = run(case.ops)
    if dtype == FP64:  # the torch ops' fallback: fp64 accuracy
        torch.testing.assert_close(got, truth, rtol=1e-10, atol=1e-12)
    else:
        assert_within("dlogits", got, run(TorchChunkOps()), truth, dtype)


# ---------------------------------------------------------------- the public API on each backend


@pytest.mark.parametrize("dtype", [FP32, BF16, FP16], ids=lambda d: DTYPE_IDS[d])
def test_selective_logprobs_with_grad(case, dtype):
    """With grad: the chunk loop with the stats and grad kernels (backward recomputes the tiles)."""
    if dtype not in case.dtypes or (case.name == "native" and dtype == FP16):
        pytest.skip(f"{case.name}: not tested in {dtype} here")
    base = make_batch(B=2, T=13 if case.small else C, seed=62, dtype=torch.float64, empty_row=False)
    truth = run_logprobs(gf.reference.selective_logprobs, cast(base, torch.float64), 0.7)
    same = run_logprobs(gf.reference.selective_logprobs, cast(base, dtype), 0.7)
    dev = {k: (v.to(case.device) if torch.is_tensor(v) else v) for k, v in base.items()}
    got = run_logprobs(gf.selective_logprobs, cast(dev, dtype), 0.7, backend=case.name, chunk_size=10)
    assert_within("logp", got[0], same[0], truth[0], dtype)
    assert_within("entropy", got[1], same[1], truth[1], dtype)
    for k in truth[2]:
        assert got[2][k].dtype == dtype
        assert_within(f"grad {k}", got[2][k], same[2][k], truth[2][k], dtype)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_every_type(case, loss_type, level):
    cfg = gf.GRPOConfig(
        loss_type=loss_type,
        importance_sampling_level=level,
        beta=0.04 if loss_type != "luspo" else 0.0,
        epsilon_high=0.28,
        max_completion_length=40,
        temperature=0.8,
    )
    shape = dict(B=3, T=11) if case.small else {}
    seed = 50 + LOSS_TYPES.index(loss_type)
    batch = make_batch(**shape, seed=seed, dtype=torch.float64, with_ref=cfg.beta > 0)
    chunk = 8 if case.small else 16
    check_against_truth(batch, cfg, torch.float32, case.name, device=case.device, chunk_size=chunk)


def test_backend_resolution(case):
    device = torch.device(case.device)
    for op in backends.OPS:
        assert backends.resolve(case.name, device, op) == case.name
    assert type(case.ops).__name__ == {"native": "NativeChunkOps", "triton": "TritonChunkOps"}[case.name]
    auto_ops = backends.REGISTRY[case.name].auto_ops.get(device.type, ())
    interpreted = case.name == "triton" and device.type == "cpu"  # for tests: "auto" never picks it
    for op in backends.OPS:
        picked = backends.resolve("auto", device, op)
        assert (picked == case.name) == (op in auto_ops and not interpreted), (op, picked)
    if case.name == "native":
        assert "native" in LOSS_BACKENDS  # so tests/test_loss.py's whole grid runs on it too
