"""The native backend (the chunk ops of grpo_fast._C) against the fp64 truth, on the CPU.

Kernels one by one (stats, vocab-shard partials, grad with and without the entropy-gradient term),
then the public API on backend="native", the ops' registration (opcheck, fake kernels under
torch.compile, TORCH_CHECK messages) and the build. Sizes are odd (V=1013, H=67, T=37), not multiples
of any block. Tolerance (tests/helpers.py): the op's error against the fp64 truth may exceed PyTorch's
error in the same dtype by at most a small per-dtype margin. The CUDA kernels are compared with the CPU
ones where a GPU exists (marked gpu).
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import grpo_fast as gf
from grpo_fast import backends
from grpo_fast.backends import _native
from grpo_fast.backends.native_ops import NativeChunkOps
from grpo_fast.backends.torch_ops import TorchChunkOps

from .chunk_cases import C, V, tile, truth_dlogits, truth_entropy_grad, truth_stats
from .helpers import cast, make_batch
from .spawn import spawn
from .test_loss import check_against_truth, run_loss

pytestmark = pytest.mark.skipif(
    not _native.available(), reason=f"grpo_fast._C not built: {_native.load_error()}"
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
OPS = ("chunk_stats", "chunk_partial_stats", "chunk_grad")
# ---------------------------------------------------------------- the ops, one by one


def test_chunk_stats_takes_row_stride_and_wide_rows():
    """A row stride other than V, and rows longer than one 2048-column block (masked -inf columns too)."""
    logits, targets = tile(torch.float32, seed=2, rows=5, cols=5000 + 29)
    logits[0, 100:4000] = float("-inf")  # masked vocabulary: exp must be exactly 0, no NaN from 0 * -inf
    targets[0] = 7
    view = logits[:, 5 : 5 + 5000]
    before = logits.clone()
    got = NativeChunkOps().stats(view, targets.clamp(max=4999), 0.9)
    truth = truth_stats(view, targets.clamp(max=4999), 0.9)
    assert torch.equal(logits, before)
    for a, t in zip(got, truth, strict=True):
        torch.testing.assert_close(a.double(), t, rtol=1e-5, atol=1e-5)


def test_chunk_grad_entropy_term_masked_vocabulary():
    """Masked (-inf) logits get exactly 0 from the entropy term (no 0 * inf), wide rows in 2048-blocks."""
    logits, targets = tile(torch.float32, seed=22, rows=5, cols=5029)
    logits[0, 100:4000] = float("-inf")
    logits[2, :2] = float("-inf")
    targets[0] = 7
    g, e = torch.randn(5), torch.randn(5)
    ops = NativeChunkOps()
    lse, _, entropy = ops.stats(logits, targets, 0.9)
    got = ops.grad_(logits.clone(), targets, lse, g, 0.9, ent_coef=e, entropy=entropy)
    assert torch.equal(got[0, 100:4000], torch.zeros(3900)) and torch.equal(got[2, :2], torch.zeros(2))
    torch.testing.assert_close(
        got.double(), truth_entropy_grad(logits, targets, g, e, 0.9), rtol=1e-5, atol=1e-6
    )


def test_chunk_grad_without_entropy_term_is_unchanged():
    """ent_coef = 0 gives the plain pass bit for bit (the entropy term only adds, per element)."""
    logits, targets = tile(torch.float32, seed=23, rows=6, cols=3001)
    ops = NativeChunkOps()
    lse, _, entropy = ops.stats(logits, targets, 0.8)
    g = torch.randn(6)
    plain = ops.grad_(logits.clone(), targets, lse, g, 0.8)
    zero = ops.grad_(logits.clone(), targets, lse, g, 0.8, ent_coef=torch.zeros(6), entropy=entropy)
    torch.testing.assert_close(zero, plain, rtol=0, atol=0)


def test_empty_tile():
    logits, targets = tile(torch.float32, rows=0, cols=30)
    ops = NativeChunkOps()
    assert all(x.shape == (0,) for x in ops.stats(logits, targets, 1.0))
    z = torch.zeros(0)
    assert ops.grad_(logits, targets, z, z, 1.0, ent_coef=z, entropy=z).shape == (0, 30)


# ---------------------------------------------------------------- the public API on backend="native"


def test_native_tiles_take_the_whole_budget():
    """No [C, V] temporaries: the native pass gets the torch pass's rows times (3 * 4 + 4) / 4."""
    from grpo_fast.engine.tile_size import auto_chunk_size

    cpu = torch.device("cpu")
    assert NativeChunkOps.fp32_temps == 0 and TorchChunkOps.fp32_temps == 3
    rows = auto_chunk_size(10**6, 65536, torch.float32, cpu, NativeChunkOps.fp32_temps)
    assert rows == 4 * auto_chunk_size(10**6, 65536, torch.float32, cpu, TorchChunkOps.fp32_temps)


@pytest.mark.parametrize(
    "loss_type, level, options",
    [
        ("dapo", "token", dict(beta=0.04)),
        ("grpo", "sequence", dict(beta=0.04)),
        ("cispo", "token", dict(beta=0.04, epsilon_high=5.0)),
        ("sapo", "token", dict(beta=0.0)),
        ("bnpo", "token", dict(delta=1.2, beta=0.0)),
    ],
)
def test_loss_bf16(loss_type, level, options):
    cfg = gf.GRPOConfig(loss_type=loss_type, importance_sampling_level=level, temperature=0.9, **options)
    batch = make_batch(seed=60, dtype=torch.float64, with_ref=cfg.beta > 0)
    check_against_truth(batch, cfg, torch.bfloat16, "native", chunk_size=16)


def test_loss_on_policy_and_frozen_head():
    cfg = gf.GRPOConfig(loss_type="dapo", beta=0.04)
    batch = make_batch(seed=61, dtype=torch.float64, with_old=False)
    check_against_truth(batch, cfg, torch.float32, "native")
    x = cast(batch, torch.float32)
    x["weight"].requires_grad_(False)
    loss, _ = gf.grpo_loss(
        x["hidden"], x["weight"], x["targets"], x["mask"], x["advantages"],
        ref_logp=x["ref_logp"], bias=x["bias"], config=cfg, backend="native",
    )  # fmt: skip
    loss.backward()
    assert x["weight"].grad is None and x["hidden"].grad is not None


def test_vocab_parallel_native(tmp_path, monkeypatch):
    """2 gloo ranks, each with a vocabulary shard: the native partial stats and grads equal one process."""
    from .test_vocab_parallel import _worker

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the ranks share this machine's cores
    spawn(_worker, args=(2, str(tmp_path / "rendezvous"), "native"), nprocs=2)


# ---------------------------------------------------------------- registration, errors, build


def op_args(name: str, dtype=torch.float32):
    """Arguments of each op ("chunk_grad_ent": chunk_grad with the entropy term)."""
    logits, targets = tile(dtype, seed=12, rows=6, cols=77)
    targets[1] = -3
    vec = lambda s: torch.randn(6, generator=torch.Generator().manual_seed(s))  # noqa: E731
    if name in ("chunk_stats", "chunk_partial_stats"):
        k = 3 if name == "chunk_stats" else 4
        return (logits, targets, 0.9, torch.empty(k, 6))
    if name == "chunk_grad":
        return (logits, targets, vec(1) + 5.0, vec(2), 0.9)
    assert name == "chunk_grad_ent"
    return (logits, targets, vec(1) + 5.0, vec(2), 0.9, vec(3), vec(4).abs() + 1.0)


@pytest.mark.parametrize("name", [*OPS, "chunk_grad_ent"])
def test_opcheck(name):
    op = torch.ops.grpo_fast.chunk_grad if name == "chunk_grad_ent" else getattr(torch.ops.grpo_fast, name)
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(op.default, op_args(name, dtype))


@pytest.mark.parametrize("with_entropy", [False, True], ids=["plain", "entropy"])
def test_torch_compile_fullgraph(with_entropy):
    """The fake kernels let torch.compile trace the pass the chunk loop runs: stats, then grad in place
    (the in-place tile functionalized)."""
    logits, targets = tile(torch.float32, seed=13, rows=8, cols=131)
    g, e = torch.randn(8), torch.randn(8)

    def fn(x, t, g, e):
        out = torch.empty(3, x.shape[0])
        torch.ops.grpo_fast.chunk_stats(x, t, 0.9, out)
        work = x * 1.0
        terms = dict(ent_coef=e, entropy=out[2]) if with_entropy else {}
        torch.ops.grpo_fast.chunk_grad(work, t, out[0], g, 0.9, **terms)
        return out, work

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got, want = compiled(logits, targets, g, e), fn(logits, targets, g, e)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_torch_check_messages():
    logits, targets = tile(torch.float32, seed=14, rows=4, cols=50)
    out = torch.empty(3, 4)
    ops = torch.ops.grpo_fast
    with pytest.raises(
        RuntimeError, match="grpo_fast::chunk_stats: logits must be float32, bfloat16 or float16, got Double"
    ):
        ops.chunk_stats(logits.double(), targets, 1.0, out)
    with pytest.raises(RuntimeError, match=r"logits must be a 2-D \[C, V\] tile"):
        ops.chunk_stats(logits[0], targets, 1.0, out)
    with pytest.raises(RuntimeError, match=r"logits rows must be contiguous \(stride\(1\) == 1\)"):
        ops.chunk_grad(logits.t(), targets, torch.zeros(50), torch.zeros(50), 1.0)
    with pytest.raises(RuntimeError, match=r"targets must have shape \[4\], got \[3\]"):
        ops.chunk_stats(logits, targets[:3], 1.0, out)
    with pytest.raises(RuntimeError, match="targets must be Long, got Int"):
        ops.chunk_stats(logits, targets.int(), 1.0, out)
    with pytest.raises(RuntimeError, match=r"out must have shape \[4, 4\]"):
        ops.chunk_partial_stats(logits, targets, 1.0, out)
    with pytest.raises(RuntimeError, match="temperature must be a positive finite number"):
        ops.chunk_stats(logits, targets, 0.0, out)
    with pytest.raises(RuntimeError, match="g must be Float, got Double"):
        ops.chunk_grad(logits, targets, torch.zeros(4), torch.zeros(4, dtype=torch.float64), 1.0)
    with pytest.raises(RuntimeError, match="lse must be contiguous"):
        ops.chunk_grad(logits, targets, torch.zeros(8)[::2], torch.zeros(4), 1.0)


def test_chunk_grad_entropy_inputs_checked():
    """ent_coef and entropy go together, fp32 [C] each: a clear error naming the op and the argument."""
    logits, targets = tile(torch.float32, seed=14, rows=4, cols=50)
    z = torch.zeros(4)
    ops = torch.ops.grpo_fast
    alone = r"grpo_fast::chunk_grad: ent_coef and entropy go together .* got ent_coef alone"
    with pytest.raises(RuntimeError, match=alone):
        ops.chunk_grad(logits, targets, z, z, 1.0, ent_coef=z)
    with pytest.raises(RuntimeError, match=alone):
        NativeChunkOps().grad_(logits, targets, z, z, 1.0, ent_coef=z)  # the wrapper passes it on
    with pytest.raises(
        RuntimeError, match="grpo_fast::chunk_grad: ent_coef and entropy go together .* entropy alone"
    ):
        ops.chunk_grad(logits, targets, z, z, 1.0, entropy=z)
    with pytest.raises(
        RuntimeError, match=r"grpo_fast::chunk_grad: ent_coef must have shape \[4\], got \[5\]"
    ):
        ops.chunk_grad(logits, targets, z, z, 1.0, ent_coef=torch.zeros(5), entropy=z)
    with pytest.raises(RuntimeError, match="grpo_fast::chunk_grad: entropy must be Float, got Half"):
        ops.chunk_grad(logits, targets, z, z, 1.0, ent_coef=z, entropy=z.half())
    before = logits.clone()
    with pytest.raises(RuntimeError, match="ent_coef must be contiguous"):
        ops.chunk_grad(logits, targets, z, z, 1.0, ent_coef=torch.zeros(8)[::2], entropy=z)
    assert torch.equal(logits, before), "a rejected call must leave the tile alone"


def test_cuda_kernels_built_when_possible():
    """torch with CUDA plus an nvcc at build time: a build with the CUDA kernels, chunk ops included."""
    import grpo_fast._C

    has_nvcc = shutil.which("nvcc") or any(os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH"))
    if not (torch.version.cuda and has_nvcc) or os.environ.get("GRPO_FAST_NO_CUDA", "0") not in ("", "0"):
        pytest.skip("no CUDA toolkit: a CPU-only build is expected")
    assert grpo_fast._C.cuda_built()
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"grpo_fast::{name}", "CUDA"), name


# ---------------------------------------------------------------- CUDA kernels against the CPU ones


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("cols", [V, 4096, 70001])
def test_cuda_matches_cpu(dtype, cols):
    if not _native.cuda_built():
        pytest.skip("grpo_fast._C built without CUDA kernels")
    logits, targets = tile(dtype, seed=15, cols=cols)
    targets[2] = -1
    ops = NativeChunkOps()
    for got, want in zip(
        ops.stats(logits.cuda(), targets.cuda(), 0.8), ops.stats(logits, targets, 0.8), strict=True
    ):
        torch.testing.assert_close(got.cpu(), want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(
        ops.partial_stats(logits.cuda(), targets.cuda(), 0.8).cpu(), ops.partial_stats(logits, targets, 0.8),
        rtol=2e-5, atol=2e-5,
    )  # fmt: skip
    lse, _, entropy = ops.stats(logits, targets, 0.8)
    gen = torch.Generator().manual_seed(16)
    g, e = torch.randn(C, generator=gen), torch.randn(C, generator=gen)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
    for terms in ({}, dict(ent_coef=e, entropy=entropy)):
        want = ops.grad_(logits.clone(), targets, lse, g, 0.8, **terms)
        dev = {k: v.cuda() for k, v in terms.items()}
        got = ops.grad_(logits.cuda(), targets.cuda(), lse.cuda(), g.cuda(), 0.8, **dev)
        assert got.dtype == dtype and got.is_cuda
        torch.testing.assert_close(got.cpu().float(), want.float(), **tol)
    # A row stride other than V (the leading columns of a wider tile; 16-byte vectors still apply at
    # cols=4096), with the entropy term; the columns outside the view stay as they were.
    wide = torch.cat([logits, logits[:, :8]], 1)
    view = wide[:, :cols]
    stats = ops.stats(view, targets, 0.8)
    want = ops.grad_(view.clone(), targets, stats[0], g, 0.8, ent_coef=e, entropy=stats[2])
    dev_wide = wide.cuda()
    dev = [x.cuda() for x in (targets, stats[0], g, e, stats[2])]
    ops.grad_(dev_wide[:, :cols], dev[0], dev[1], dev[2], 0.8, ent_coef=dev[3], entropy=dev[4])
    torch.testing.assert_close(dev_wide[:, :cols].cpu().float(), want.float(), **tol)
    assert torch.equal(dev_wide[:, cols:].cpu(), wide[:, cols:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_loss_matches_truth():
    if not _native.cuda_built():
        pytest.skip("grpo_fast._C built without CUDA kernels")
    cfg = gf.GRPOConfig(loss_type="dapo", beta=0.04, temperature=0.8)
    batch = make_batch(seed=63, dtype=torch.float64)
    truth = run_loss(cast(batch, torch.float64), cfg, gf.reference.grpo_loss)
    dev = cast({k: (v.cuda() if torch.is_tensor(v) else v) for k, v in batch.items()}, torch.float32)
    got = run_loss(dev, cfg, gf.grpo_loss, backend="native", chunk_size=16)
    torch.testing.assert_close(got[0].cpu().double(), truth[0].double(), rtol=1e-5, atol=1e-6)
    for k in truth[2]:
        torch.testing.assert_close(got[2][k].cpu().double(), truth[2][k].double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tile_pass_is_stats_then_coefficients_then_grad(dtype, with_entropy):
    """Every CPU backend's tile_pass_ (the torch ops share their probabilities between statistics and
    dlogits) gives the fp64 truth, with the coefficients computed from the statistics it handed over."""
    from grpo_fast.backends.base import split_tile_pass_

    logits, targets = tile(dtype, seed=31, rows=6, cols=2053)
    logits[1, 7:900] = float("-inf")  # banned tokens: p = 0, no NaN from the entropy term
    seen = {}

    def coefficients(logp, entropy):  # some smooth function of the statistics, as the objective is
        seen["logp"], seen["entropy"] = logp, entropy
        return torch.tanh(logp) * 0.5, (torch.sin(entropy) if with_entropy else None)

    truth_lse, truth_logp, truth_ent = truth_stats(logits, targets, 0.8)
    g, e = coefficients(truth_logp.float(), truth_ent.float())
    truth = (
        truth_entropy_grad(logits, targets, g, e, 0.8)
        if with_entropy
        else truth_dlogits(logits, targets, truth_lse, g, 0.8)
    )
    for ops in (TorchChunkOps(), NativeChunkOps()):
        for run in (ops.tile_pass_, lambda *a, ops=ops: split_tile_pass_(ops, *a)):
            lse, logp, ent, dl = run(logits.clone(), targets, 0.8, coefficients)
            assert torch.equal(seen["logp"], logp) and torch.equal(seen["entropy"], ent)
            torch.testing.assert_close(ent.double(), truth_ent, rtol=2e-5, atol=2e-5)
            torch.testing.assert_close(logp.double(), truth_logp, rtol=2e-5, atol=2e-5)
            assert torch.isfinite(dl).all() and torch.equal(dl[1, 7:900].float(), torch.zeros(893))
            tol = dict(rtol=2e-2, atol=2e-3) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(dl.double(), truth, **tol)


def test_registry_says_what_runs_where_and_why_not():
    table = {(r["backend"], r["device"], r["op"]): r["status"] for r in backends.support_table()}
    assert len(table) == len(backends.REGISTRY) * 2 * len(backends.OPS)
    for op in backends.OPS:
        assert table[("native", "cpu", op)] == "auto picks it"  # measured faster than torch on the CPU
        assert table[("torch", "cpu", op)] == "auto fallback"
        # Triton on CPU tensors: only its interpreter (the tests set TRITON_INTERPRET=1), never for "auto"
        triton_cpu = table[("triton", "cpu", op)]
        assert triton_cpu == "explicit only" or "cuda tensors only" in triton_cpu
    assert table[("native", "cuda", "grpo_loss")] in ("explicit only", "auto picks it", "auto fallback") or (
        "without CUDA kernels" in table[("native", "cuda", "grpo_loss")]
    )
    assert "no backend 'bogus'" in backends.why_not("bogus", torch.device("cpu"), "grpo_loss")
    assert backends.BACKENDS == ("auto", *backends.REGISTRY)
