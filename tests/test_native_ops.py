"""The native backend (the chunk ops of grpo_fast._C) against the fp64 truth, on the CPU.

Kernels one by one (stats, vocab-shard partials, grad, fused token pass, token loss from log-probs),
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
import torch.multiprocessing as mp

import grpo_fast as gf
from grpo_fast import _native, backends, objective
from grpo_fast.chunk_ops import TorchChunkOps
from grpo_fast.config import LOSS_TYPES
from grpo_fast.native_ops import NativeChunkOps, op_terms, per_token_loss, token_loss_terms

from .chunk_cases import (
    CASE_IDS,
    CASES,
    C,
    V,
    ratio_spread,
    tile,
    token_inputs,
    truth_dlogits,
    truth_stats,
)
from .helpers import assert_within, cast, grads, make_batch
from .test_loss import LOSS_BACKENDS, check_against_truth, run_loss

pytestmark = pytest.mark.skipif(
    not _native.available(), reason=f"grpo_fast._C not built: {_native.load_error()}"
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
OPS = ("chunk_stats", "chunk_partial_stats", "chunk_grad", "token_pass", "token_loss")
# ---------------------------------------------------------------- the ops, one by one


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunk_stats(dtype, temperature):
    logits, targets = tile(dtype, seed=1)
    before = logits.clone()
    got = NativeChunkOps().stats(logits, targets, temperature)
    assert torch.equal(logits, before), "chunk_stats must leave the tile unchanged"
    same = TorchChunkOps().stats(logits.clone(), targets, temperature)
    truth = truth_stats(logits, targets, temperature)
    for name, a, b, t in zip(("lse", "logp", "entropy"), got, same, truth, strict=True):
        assert a.dtype == torch.float32 and a.shape == (C,)
        assert_within(name, a, b, t, dtype)


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


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_partial_stats_of_shards_combine_to_whole(dtype):
    """Vocabulary shards' partials (targets outside a shard read nothing) merge into the whole row's."""
    logits, targets = tile(dtype, seed=3)
    cuts = [0, 300, 301, V]
    bounds = list(zip(cuts, cuts[1:], strict=False))
    parts = [NativeChunkOps().partial_stats(logits[:, a:b], targets - a, 0.8) for a, b in bounds]
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
    for name, a, b, want in zip(
        ("lse", "logp", "entropy"), (lse, t.sum(0) - lse, entropy), same, truth, strict=True
    ):
        assert_within(name, a, b, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_chunk_grad_in_place(dtype):
    logits, targets = tile(dtype, seed=4)
    lse = TorchChunkOps().stats(logits.clone(), targets, 0.7)[0]
    g = torch.randn(C, generator=torch.Generator().manual_seed(5))
    targets[3] = -1  # another shard's token: no one-hot term
    targets[4] = V + 2
    work = logits.clone()
    out = NativeChunkOps().grad_(work, targets, lse, g, 0.7)
    assert out.data_ptr() == work.data_ptr() and out.dtype == dtype
    same = TorchChunkOps().grad_(logits.clone(), targets, lse, g, 0.7)
    truth = truth_dlogits(logits, targets.clamp(0, V - 1), lse, g, 0.7)
    for row in (3, 4):
        truth[row] = -g[row].double() / 0.7 * torch.exp(logits[row].double() / 0.7 - lse[row].double())
    assert_within("dlogits", out, same, truth, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_token_pass(dtype, case):
    _, cfg, with_old, with_ref = case
    cfg = gf.GRPOConfig(**{**cfg.__dict__, "temperature": 0.8})
    logits, targets = tile(dtype, seed=6)
    lse64, logp64, ent64 = truth_stats(logits, targets, cfg.temperature)
    old, ref, adv, w = token_inputs(logp64, with_old, with_ref, seed=7)
    work = logits.clone()
    logp, entropy, dl = NativeChunkOps().token_pass_(work, targets, old, ref, adv, w, cfg)
    assert dl.data_ptr() == work.data_ptr() and dl.dtype == dtype
    same = TorchChunkOps().token_pass_(logits.clone(), targets, old, ref, adv, w, cfg)
    as64 = lambda x: x.double() if x is not None else None  # noqa: E731
    g64 = objective.token_grad(logp64, as64(old), as64(ref), adv.double(), w.double(), cfg)
    assert_within("logp", logp, same[0], logp64, dtype)
    assert_within("entropy", entropy, same[1], ent64, dtype)
    assert_within("dlogits", dl, same[2], truth_dlogits(logits, targets, lse64, g64, cfg.temperature), dtype)


def test_token_pass_g_matches_token_grad_exactly_in_fp32():
    """The op's g_t (read off the target column) is objective.token_grad's, branch for branch."""
    logits, targets = tile(torch.float32, seed=8, cols=64)
    gen = torch.Generator().manual_seed(9)
    for _, cfg, with_old, with_ref in CASES:
        logp = NativeChunkOps().stats(logits, targets, 1.0)[1]  # bit for bit the token pass's logp
        old = ratio_spread(logp, with_old)
        ref = logp + 0.3 * torch.randn(C, generator=gen) if with_ref else None
        adv = torch.randn(C, generator=gen)
        w = torch.ones(C)
        lp, _, dl = NativeChunkOps().token_pass_(logits.clone(), targets, old, ref, adv, w, cfg)
        torch.testing.assert_close(lp, logp, rtol=0, atol=0)
        want = objective.token_grad(lp, old, ref if cfg.beta else None, adv, w, cfg)
        g = dl.gather(1, targets.unsqueeze(1)).squeeze(1) / (1 - torch.exp(lp))
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_token_loss_matches_objective(case):
    """token_loss from log-probs: TRL's per-token loss, g, KL and clip flags, as in grpo_fast.objective."""
    _, cfg, with_old, with_ref = case
    gen = torch.Generator().manual_seed(10)
    n = 203
    logp = -torch.rand(n, generator=gen) * 8
    old = ratio_spread(logp, with_old)
    ref = logp + 0.3 * torch.randn(n, generator=gen) if with_ref else None
    adv = torch.randn(n, generator=gen)
    adv[:5] = 0.0
    w = torch.rand(n, generator=gen)
    out = token_loss_terms(logp, adv, cfg, old, ref, w)
    batch = objective.TokenBatch(
        seq_ids=torch.zeros(n, dtype=torch.long),
        mask=torch.ones(n),
        adv=adv,
        old_logp=old,
        ref_logp=ref if cfg.beta else None,
        seq_adv=adv[:1],
        seq_len=torch.tensor([float(n)]),
        loss_w=w,
    )
    loss, kl, coef = objective.per_token_objective(logp, batch, cfg)
    torch.testing.assert_close(out[0], loss, rtol=1e-5, atol=1e-6)
    want_g = objective.token_grad(logp, old, ref if cfg.beta else None, adv, w, cfg)
    torch.testing.assert_close(out[1], want_g, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out[2], kl if kl is not None else torch.zeros(n), rtol=1e-5, atol=1e-6)
    if cfg.loss_type == "cispo":
        low, high = torch.zeros(n), ((coef > cfg.eps_high) & (adv > 0)).float()
    elif cfg.loss_type == "sapo":
        low = high = torch.zeros(n)
    else:
        low = ((coef < 1 - cfg.epsilon_low) & (adv < 0)).float()
        high = ((coef > 1 + cfg.eps_high) & (adv > 0)).float()
    assert torch.equal(out[3], low) and torch.equal(out[4], high)


@pytest.mark.parametrize("loss_type", ["dapo", "cispo", "sapo"])
def test_per_token_loss_autograd(loss_type):
    """per_token_loss is differentiable in logp, with the gradient autograd gives the torch objective."""
    cfg = gf.GRPOConfig(loss_type=loss_type, beta=0.04, delta=1.3 if loss_type == "dapo" else None)
    gen = torch.Generator().manual_seed(11)
    logp = (-torch.rand(3, 17, generator=gen) * 5).requires_grad_(True)
    old = (logp.detach() + 0.3 * torch.randn(3, 17, generator=gen)).float()
    ref = logp.detach() + 0.3 * torch.randn(3, 17, generator=gen)
    adv = torch.randn(3, generator=gen)
    weight = torch.rand(3, 17, generator=gen)
    loss, metrics = per_token_loss(logp, adv, cfg, old_logp=old, ref_logp=ref)
    assert loss.shape == (3, 17) and set(metrics) == {"kl", "is_low_clipped", "is_high_clipped"}
    (g,) = torch.autograd.grad((loss * weight).sum(), logp)
    lp = logp.detach().reshape(-1).requires_grad_(True)
    batch = objective.TokenBatch(
        seq_ids=torch.arange(3).repeat_interleave(17),
        mask=torch.ones(51),
        adv=adv.repeat_interleave(17),
        old_logp=old.reshape(-1),
        ref_logp=ref.reshape(-1),
        seq_adv=adv,
        seq_len=torch.full((3,), 17.0),
        loss_w=weight.reshape(-1),
    )
    want, kl, _ = objective.per_token_objective(lp, batch, cfg)
    (want_g,) = torch.autograd.grad((want * weight.reshape(-1)).sum(), lp)
    torch.testing.assert_close(loss.detach().reshape(-1), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["kl"].reshape(-1), kl.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.reshape(-1), want_g, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="token"):
        per_token_loss(logp, adv, gf.GRPOConfig(importance_sampling_level="sequence"), old_logp=old)


def test_family_codes_and_terms():
    assert (objective.FAMILY_CLIPPED, objective.FAMILY_CISPO, objective.FAMILY_SAPO) == (0, 1, 2)
    terms = op_terms(gf.GRPOConfig(loss_type="cispo", delta=2.0, epsilon_high=3.0))
    assert terms["family"] == 1 and terms["delta"] is None and terms["cispo_max"] == 3.0


def test_empty_tile():
    logits, targets = tile(torch.float32, rows=0, cols=30)
    assert all(x.shape == (0,) for x in NativeChunkOps().stats(logits, targets, 1.0))
    lp, ent, dl = NativeChunkOps().token_pass_(
        logits, targets, None, None, torch.zeros(0), torch.zeros(0), gf.GRPOConfig()
    )
    assert lp.shape == ent.shape == (0,) and dl.shape == (0, 30)


# ---------------------------------------------------------------- the public API on backend="native"


def test_backend_resolution():
    cpu = torch.device("cpu")
    for op in backends.OPS:
        assert backends.resolve("native", cpu, op) == "native"
        want = "native" if op in backends.AUTO_CPU_NATIVE else "torch"
        assert backends.resolve("auto", cpu, op) == want
    assert isinstance(backends.chunk_ops("native"), NativeChunkOps)
    assert "native" in LOSS_BACKENDS  # so tests/test_loss.py's whole grid runs on it too


def test_native_tiles_take_the_whole_budget():
    """No [C, V] temporaries: the native pass gets the torch pass's rows times (3 * 4 + 4) / 4."""
    from grpo_fast.chunking import auto_chunk_size

    cpu = torch.device("cpu")
    assert NativeChunkOps.fp32_temps == 0 and TorchChunkOps.fp32_temps == 3
    rows = auto_chunk_size(10**6, 65536, torch.float32, cpu, NativeChunkOps.fp32_temps)
    assert rows == 4 * auto_chunk_size(10**6, 65536, torch.float32, cpu)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_every_type(loss_type, level):
    cfg = gf.GRPOConfig(
        loss_type=loss_type,
        importance_sampling_level=level,
        beta=0.04 if loss_type != "luspo" else 0.0,
        epsilon_high=0.28,
        max_completion_length=40,
        temperature=0.8,
    )
    batch = make_batch(seed=50 + LOSS_TYPES.index(loss_type), dtype=torch.float64, with_ref=cfg.beta > 0)
    check_against_truth(batch, cfg, torch.float32, "native", chunk_size=16)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_selective_logprobs_with_grad(dtype):
    base = make_batch(B=2, T=C, seed=62, dtype=torch.float64, empty_row=False)

    def run(batch, **kw):
        logp, ent = (gf.selective_logprobs if kw else gf.reference.selective_logprobs)(
            batch["hidden"], batch["weight"], batch["targets"], batch["bias"], 0.7, return_entropy=True, **kw
        )
        weights = torch.linspace(-1, 1, logp.numel(), dtype=torch.float64).reshape(logp.shape)
        return logp, ent, grads((logp.double() * weights).sum(), batch)

    truth = run(cast(base, torch.float64))
    same = run(cast(base, dtype))
    got = run(cast(base, dtype), backend="native", chunk_size=10)
    assert_within("logp", got[0], same[0], truth[0], dtype)
    assert_within("entropy", got[1], same[1], truth[1], dtype)
    for k in truth[2]:
        assert got[2][k].dtype == dtype
        assert_within(f"grad {k}", got[2][k], same[2][k], truth[2][k], dtype)


def test_vocab_parallel_native(tmp_path, monkeypatch):
    """2 gloo ranks, each with a vocabulary shard: the native partial stats and grads equal one process."""
    from .test_vocab_parallel import _worker

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the ranks share this machine's cores
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), "native"), nprocs=2, join=True)


# ---------------------------------------------------------------- registration, errors, build


def op_args(name: str, dtype=torch.float32):
    logits, targets = tile(dtype, seed=12, rows=6, cols=77)
    targets[1] = -3
    vec = lambda s: torch.randn(6, generator=torch.Generator().manual_seed(s))  # noqa: E731
    terms = dict(op_terms(gf.GRPOConfig(loss_type="grpo", beta=0.04, delta=1.5)))
    terms = tuple(terms.values())
    if name in ("chunk_stats", "chunk_partial_stats"):
        k = 3 if name == "chunk_stats" else 4
        return (logits, targets, 0.9, torch.empty(k, 6))
    if name == "chunk_grad":
        return (logits, targets, vec(1) + 5.0, vec(2), 0.9)
    fam, lo, hi, cmax, delta, beta, bc, tp, tn = terms
    if name == "token_pass":
        return (logits, targets, vec(3) - 4, vec(4) - 4, vec(5), vec(6).abs(), torch.empty(2, 6),
                fam, lo, hi, cmax, delta, beta, bc, 0.9, tp, tn)  # fmt: skip
    return (
        vec(7) - 4,
        vec(3) - 4,
        None,
        vec(5),
        vec(6).abs(),
        torch.empty(5, 6),
        2,
        lo,
        hi,
        cmax,
        None,
        0.0,
        bc,
        tp,
        tn,
    )


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name):
    for dtype in (torch.float32, torch.bfloat16) if name != "token_loss" else (torch.float32,):
        torch.library.opcheck(getattr(torch.ops.grpo_fast, name).default, op_args(name, dtype))


def test_torch_compile_fullgraph():
    """The fake kernels let torch.compile trace the ops (functionalized in-place tile included)."""
    logits, targets = tile(torch.float32, seed=13, rows=8, cols=131)
    cfg = gf.GRPOConfig(loss_type="dapo", beta=0.0)
    adv, w = torch.randn(8), torch.full((8,), 0.125)

    def fn(x, t, a, weights):
        out = torch.empty(2, x.shape[0])
        work = x * 1.0
        torch.ops.grpo_fast.token_pass(work, t, None, None, a, weights, out, temperature=1.0, **op_terms(cfg))
        return out, work

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got, want = compiled(logits, targets, adv, w), fn(logits, targets, adv, w)
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
    terms = op_terms(gf.GRPOConfig(beta=0.1))
    with pytest.raises(RuntimeError, match="grpo_fast::token_pass: beta=0.1 needs ref_logp"):
        ops.token_pass(
            logits,
            targets,
            None,
            None,
            torch.zeros(4),
            torch.zeros(4),
            torch.empty(2, 4),
            temperature=1.0,
            **terms,
        )
    with pytest.raises(RuntimeError, match="family must be 0 \\(clipped\\), 1 \\(cispo\\) or 2 \\(sapo\\)"):
        z = torch.zeros(4)
        ops.token_loss(z, None, z, z, z, torch.empty(5, 4), **{**terms, "family": 7})


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
    _, cfg, _, _ = CASES[0]
    lp64 = truth_stats(logits, targets.clamp(min=0), 1.0)[1]
    old, ref, adv, w = token_inputs(lp64, True, True, seed=16)
    want = ops.token_pass_(logits.clone(), targets, old, ref, adv, w, cfg)
    dev = lambda x: x.cuda() if x is not None else None  # noqa: E731
    got = ops.token_pass_(logits.cuda(), targets.cuda(), dev(old), dev(ref), dev(adv), dev(w), cfg)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.cpu().float(), b.float(), **tol)
    out = token_loss_terms(lp64.float(), adv, cfg, old, ref, w)
    torch.testing.assert_close(
        token_loss_terms(dev(lp64.float()), dev(adv), cfg, dev(old), dev(ref), dev(w)).cpu(), out,
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip


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
