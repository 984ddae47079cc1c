"""The Triton kernels and the "triton" backend against the fp64 truth, under Triton's interpreter on the CPU.

Without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported, and the kernels run
in numpy on CPU tensors (with CUDA they run on the GPU). The interpreter computes ``tl.dot`` on bfloat16
wrongly, so these tests use float32 and float16; bfloat16 is covered by tests/test_triton_gpu.py. Sizes
are odd (not tile multiples) and small: the interpreter runs one program at a time.

Tolerance (tests/helpers.py): the kernel's error against the fp64 truth may exceed the error of
PyTorch in the same dtype by at most a small per-dtype margin.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "no CUDA and TRITON_INTERPRET is not 1: the Triton kernels cannot run", allow_module_level=True
    )

import grpo_fast as gf  # noqa: E402
from grpo_fast.backends.triton_ops import (  # noqa: E402
    triton_group_advantages,
    triton_selective_logprobs,
)
from grpo_fast.kernels import advantages as adv_kernels  # noqa: E402
from grpo_fast.kernels import chunk_grad, chunk_stats, logprobs  # noqa: E402

from .chunk_cases import C, H, V, truth_entropy_grad, truth_stats  # noqa: E402
from .chunk_cases import tile as cpu_tile  # noqa: E402
from .helpers import assert_within, cast, make_batch  # noqa: E402
from .test_loss import check_against_truth, run_loss  # noqa: E402

# The interpreter evaluates both sides of tl.where in numpy, so masked lanes warn about inf - inf.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16]
DTYPE_IDS = ["fp32", "fp16"]


def tile(dtype: torch.dtype, seed: int = 0, rows: int = C, cols: int = V):
    """chunk_cases.tile on the device the kernels run on."""
    return cpu_tile(dtype, seed, rows, cols, device=DEVICE)


# ---------------------------------------------------------------- kernels, one by one


def test_chunk_stats_leaves_tile_and_takes_row_stride():
    logits, targets = tile(torch.float32, seed=2, cols=V + 29)
    view = logits[:, 5 : 5 + V]  # rows contiguous, row stride V + 29
    before = logits.clone()
    got = chunk_stats.chunk_stats(view, targets.clamp(max=V - 1), 0.9)
    truth = truth_stats(view, targets.clamp(max=V - 1), 0.9)
    assert torch.equal(logits, before)
    for a, t in zip(got, truth, strict=True):
        torch.testing.assert_close(a.double(), t, rtol=1e-5, atol=1e-5)


def test_online_softmax_first_block_all_masked():
    """A row whose first vocabulary block is all -inf: the running max stays -inf through it, and the online
    update must not compute exp(-inf - -inf) = NaN; the statistics are the unmasked columns' own."""
    block = chunk_stats.row_block(V, 1024 if chunk_stats.interpreting() else 4096)
    cols = block + 37  # the whole first block masked, 37 real columns after it
    logits, targets = tile(torch.float32, seed=21, rows=5, cols=cols)
    logits[:, :block] = -float("inf")
    targets = block + targets % 37
    for partial in (False, True):
        got = (chunk_stats.chunk_partial_stats if partial else chunk_stats.chunk_stats)(logits, targets, 0.9)
        assert all(torch.isfinite(x).all() for x in got), got
    want = truth_stats(logits[:, block:], targets - block, 0.9)
    for a, t in zip(chunk_stats.chunk_stats(logits, targets, 0.9), want, strict=True):
        torch.testing.assert_close(a.double(), t, rtol=1e-5, atol=1e-5)


def test_chunk_grad_entropy_term_with_masked_vocabulary():
    """-inf logits (masked vocabulary) get gradient 0, not 0 * -inf; the rest is the unmasked row's."""
    logits, targets = tile(torch.float32, seed=16, rows=5, cols=33)
    targets = targets.clamp(max=29)
    gen = torch.Generator().manual_seed(17)
    g, e = torch.randn(2, 5, generator=gen).to(DEVICE).unbind(0)
    masked = logits.clone()
    masked[:, 30:] = -float("inf")
    lse, _, entropy = chunk_stats.chunk_stats(masked, targets, 0.9)
    out = chunk_grad.chunk_grad_(masked, targets, lse, g, 0.9, ent_coef=e, entropy=entropy)
    assert torch.all(out[:, 30:] == 0)
    want = truth_entropy_grad(logits[:, :30], targets, g, e, 0.9)
    torch.testing.assert_close(out[:, :30].double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("temperature, bias", [(1.0, False), (0.7, True)])
def test_fused_logprobs(dtype, temperature, bias):
    base = make_batch(B=1, T=C, H=H, V=V, seed=11, dtype=torch.float64, bias=bias, empty_row=False)
    flat = {k: (v.reshape(-1, H) if k == "hidden" else v) for k, v in base.items() if v is not None}
    flat["targets"] = base["targets"].reshape(-1)
    x = cast(flat, dtype)
    with torch.no_grad():
        logp, ent = logprobs.fused_logprobs(
            x["hidden"].to(DEVICE),
            x["weight"].to(DEVICE),
            x["bias"].to(DEVICE) if bias else None,
            x["targets"].to(DEVICE),
            temperature,
        )
        args = lambda b: (b["hidden"], b["weight"], b["targets"], b.get("bias"), temperature)  # noqa: E731
        same = gf.reference.selective_logprobs(*args(x), return_entropy=True)
        truth = gf.reference.selective_logprobs(*args(cast(flat, torch.float64)), return_entropy=True)
    assert_within("logp", logp, same[0], truth[0], dtype)
    assert_within("entropy", ent, same[1], truth[1], dtype)


@pytest.mark.parametrize(
    "config",
    [
        logprobs.LogprobsConfig(block_n=16, block_v=32, block_k=16, num_warps=4, num_stages=1, splits=1),
        logprobs.LogprobsConfig(block_n=32, block_v=128, block_k=64, num_warps=4, num_stages=1, splits=5),
        logprobs.LogprobsConfig(block_n=16, block_v=16, block_k=16, num_warps=4, num_stages=1, splits=1000),
        # persistent programs over the grouped order: a partial last group, fewer programs than items
        logprobs.LogprobsConfig(
            block_n=4, block_v=32, block_k=16, num_warps=4, num_stages=1, splits=3, group=2, programs=4
        ),
        logprobs.LogprobsConfig(
            block_n=8, block_v=64, block_k=16, num_warps=4, num_stages=1, splits=2, group=5, programs=1
        ),
    ],
    ids=["one-split", "five-splits", "split-per-tile", "grouped-persistent", "one-program"],
)
def test_fused_logprobs_tilings(config):
    """Any tiling gives the same answer: splits merge exactly, partial tiles at every edge."""
    g = torch.Generator().manual_seed(12)
    n, h, v = 21, 40, 203
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.4
    targets = torch.randint(0, v, (n,), generator=g)
    targets[0], targets[1] = 0, v - 1  # the first and last column of the vocabulary
    logp, ent = logprobs.fused_logprobs(
        hidden.to(DEVICE), weight.to(DEVICE), None, targets.to(DEVICE), 1.3, config=config
    )
    want = gf.reference.selective_logprobs(hidden.double(), weight.double(), targets, None, 1.3, True)
    torch.testing.assert_close(logp.cpu().double(), want[0].double(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.cpu().double(), want[1].double(), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize(
    "n, resident, want",
    [
        (16384, 132, (132, 11, 12)),  # an H100 at 1 CTA per SM: 11 row blocks x 12 splits resident
        (16384, 264, (264, 16, 17)),  # 2 CTAs per SM
        (1024, 132, (132, 8, 17)),  # 8 row blocks: more splits fill the GPU
        (100, 132, (132, 1, 132)),  # one row block
    ],
)
def test_fused_logprobs_launch_plan(n, resident, want):
    """The persistent grid is what the GPU holds at once; resident programs cover few row blocks (about
    sqrt of them) and many vocabulary splits, so hidden blocks and W tiles are shared through L2."""
    launch = logprobs.plan_launch(logprobs.LogprobsConfig(), n, 151936, resident)
    assert (launch.programs, launch.group, launch.splits) == want
    assert launch.cols_per_split % 128 == 0 and (launch.splits - 1) * launch.cols_per_split < 151936


def rewards_with_nans(m: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, r, generator=g) * 3
    x[torch.rand(m, r, generator=g) < 0.2] = float("nan")
    x[1] = float("nan")  # no reward applies to this completion
    return x


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("R, G", [(1, 8), (3, 5), (2, 1), (1, 37)])
def test_group_advantages_kernel(scale, R, G):
    rewards = rewards_with_nans(6 * G, R, seed=R * 10 + G)
    rewards[-G:] = 2.5  # a group of equal rewards: advantage 0
    weights = torch.linspace(0.5, 2.0, R)
    got = triton_group_advantages(rewards.to(DEVICE), weights.to(DEVICE), G, scale, 1e-4)
    want = gf.reference.group_advantages(rewards, G, scale, 1e-4, weights)
    assert got.dtype == torch.float32 and got.shape == (6 * G,)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    assert got[1] == 0 and torch.all(got[-G:] == 0)


def test_group_advantages_kernel_edge_values():
    """A single completion (batch std of one value is 0), all-NaN groups, infinities (nan_to_num)."""
    w1 = torch.ones(1)
    one = torch.tensor([[3.0]])
    for scale in ("group", "batch", "none"):
        got = triton_group_advantages(one.to(DEVICE), w1.to(DEVICE), 1, scale, 1e-4)
        assert got.cpu().tolist() == gf.reference.group_advantages(one, 1, scale, 1e-4, w1).tolist()
    rewards = torch.tensor([[float("nan")] * 4 + [1.0, float("inf"), 0.0, 2.0] + [1e38, -1e38, 0.0, 1.0]]).T
    for scale in ("group", "batch", "none"):
        got = triton_group_advantages(rewards.to(DEVICE), w1.to(DEVICE), 4, scale, 0.0)
        want = gf.reference.group_advantages(rewards, 4, scale, 0.0, w1)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("G", [1, 5])
def test_triton_group_advantages_entry(scale, G):
    """[M] or [M, R] rewards in any float dtype are made fp32 here, as the reference does."""
    rewards = rewards_with_nans(35, 1, seed=30 + G).double()
    want = gf.reference.group_advantages(rewards, G, scale, 1e-4)
    weights = torch.ones(1, dtype=torch.float64, device=DEVICE)
    for r in (rewards, rewards[:, 0]):
        got = triton_group_advantages(r.to(DEVICE), weights, G, scale, 1e-4)
        assert got.dtype == torch.float32 and got.shape == (35,)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- launch checks


def test_launchers_reject_bad_inputs(monkeypatch):
    logits, targets = tile(torch.float32, seed=13, rows=4, cols=50)
    lse = torch.zeros(4, device=DEVICE)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        chunk_stats.chunk_stats(logits.double(), targets, 1.0)
    with pytest.raises(ValueError, match=r"\[C, V\] tile"):
        chunk_stats.chunk_stats(logits[0], targets, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        chunk_grad.chunk_grad_(logits.t(), targets, lse, lse, 1.0)
    with pytest.raises(ValueError, match=r"targets must have shape \[4\]"):
        chunk_stats.chunk_stats(logits, targets[:3], 1.0)
    with pytest.raises(TypeError, match="g must be float32"):
        chunk_grad.chunk_grad_(logits, targets, lse, lse.double(), 1.0)
    with pytest.raises(ValueError, match="ent_coef needs entropy"):
        chunk_grad.chunk_grad_(logits, targets, lse, lse, 1.0, ent_coef=lse)
    with pytest.raises(ValueError, match="entropy needs ent_coef"):
        chunk_grad.chunk_grad_(logits, targets, lse, lse, 1.0, entropy=lse)
    with pytest.raises(TypeError, match="ent_coef must be float32"):
        chunk_grad.chunk_grad_(logits, targets, lse, lse, 1.0, ent_coef=lse.half(), entropy=lse)
    with pytest.raises(ValueError, match=r"entropy must have shape \[4\]"):
        chunk_grad.chunk_grad_(logits, targets, lse, lse, 1.0, ent_coef=lse, entropy=lse[:3])
    with pytest.raises(ValueError, match="rows overlap"):
        chunk_grad.chunk_grad_(logits.reshape(-1)[:60].as_strided((4, 50), (3, 1)), targets, lse, lse, 1.0)
    with pytest.raises(ValueError, match=r"hidden must be \[N, H\]"):
        logprobs.fused_logprobs(logits, logits[:, :7], None, targets, 1.0)
    with pytest.raises(ValueError, match="group_size"):
        adv_kernels.group_advantages(logits, torch.ones(50, device=DEVICE), 3, "group", 1e-4)
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="need CUDA tensors"):
            chunk_stats.chunk_stats(logits, targets, 1.0)


def test_empty_tile_and_empty_batch():
    logits, targets = tile(torch.float32, rows=0, cols=30)
    assert all(x.shape == (0,) for x in chunk_stats.chunk_stats(logits, targets, 1.0))
    out = logprobs.fused_logprobs(
        torch.zeros(0, 8, device=DEVICE), torch.ones(30, 8, device=DEVICE), None, targets, 1.0
    )
    assert all(x.shape == (0,) for x in out)


# ---------------------------------------------------------------- the public API on backend="triton"


@pytest.mark.parametrize(
    "loss_type, options",
    [
        ("dapo", dict(beta=0.04)),
        ("cispo", dict(beta=0.04, epsilon_high=5.0)),
        ("sapo", dict(beta=0.0)),
        ("grpo", dict(delta=1.2, beta=0.0)),
    ],
)
def test_loss_fp16(loss_type, options):
    cfg = gf.GRPOConfig(loss_type=loss_type, temperature=0.9, **options)
    batch = make_batch(B=3, T=11, seed=20, dtype=torch.float64, with_ref=cfg.beta > 0)
    check_against_truth(batch, cfg, torch.float16, "triton", device=DEVICE, chunk_size=8)


@pytest.mark.parametrize(
    "options, batch_options",
    [
        (dict(loss_type="dapo", beta=0.04), dict(with_old=False)),  # on-policy: ratio 1
        (dict(loss_type="bnpo", beta=0.1, use_bias_correction_kl=False), dict(bias=False)),
        (dict(loss_type="dapo", beta=0.0), dict(with_old=True, with_ref=True)),  # ref given, no KL
        # Gemma 2's soft-capping (in the chunk loop, around the kernels) and TRL 1.16's other loss options
        (dict(loss_type="dapo", beta=0.04, logit_softcap=3.0, temperature=0.8), dict()),
        (dict(loss_type="grpo", beta=0.04, top_entropy_quantile=0.4, entropy_coef=0.05), dict()),
    ],
    ids=["on-policy", "no-bias-no-correction", "ref-without-beta", "softcap", "entropy-options"],
)
def test_loss_options(options, batch_options):
    cfg = gf.GRPOConfig(epsilon_high=0.28, **options)
    batch = make_batch(B=3, T=11, seed=21, dtype=torch.float64, **batch_options)
    check_against_truth(batch, cfg, torch.float32, "triton", device=DEVICE, chunk_size=16)


def test_loss_all_masked():
    batch = cast(make_batch(B=2, T=5, seed=22, dtype=torch.float64), torch.float32)
    batch["mask"] = torch.zeros_like(batch["mask"])
    batch = {k: (v.to(DEVICE) if torch.is_tensor(v) else v) for k, v in batch.items()}
    loss, metrics, g = run_loss(batch, gf.GRPOConfig(beta=0.04), gf.grpo_loss, backend="triton")
    # the per-sequence clip extremes have no sequence with tokens: NaN (TRL's nanmin / nanmax)
    nan_ok = ("clip_ratio_low_min", "clip_ratio_high_max")
    assert loss.item() == 0.0
    assert all(math.isnan(v.item()) if k in nan_ok else v.item() == 0.0 for k, v in metrics.items())
    assert all(torch.count_nonzero(v) == 0 for v in g.values())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("temperature, bias", [(1.0, False), (0.7, True)])
def test_triton_selective_logprobs_entry(dtype, temperature, bias):
    """The no-grad fused-GEMM entry point on odd sizes, against the fp64 truth (tolerance rule)."""
    n, h, v = 37, 48, 1031
    gen = torch.Generator().manual_seed(24)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * h**-0.5 * 2
    b = torch.randn(v, generator=gen, dtype=torch.float64) * 0.1 if bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[:2] = torch.tensor([0, v - 1])  # the vocabulary's first and last column
    x = [t.to(dtype).requires_grad_(True) if t is not None else None for t in (hidden, weight, b)]
    logp, ent = triton_selective_logprobs(
        x[0].to(DEVICE),
        x[1].to(DEVICE),
        x[2].to(DEVICE) if bias else None,
        targets.to(DEVICE).int(),  # any integer ids
        temperature,
    )
    assert not logp.requires_grad and not ent.requires_grad
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ent.shape == (n,)
    with torch.no_grad():
        truth = gf.reference.selective_logprobs(hidden, weight, targets, b, temperature, return_entropy=True)
        same = gf.reference.selective_logprobs(x[0], x[1], targets, x[2], temperature, return_entropy=True)
    assert_within("logp", logp, same[0], truth[0], dtype)
    assert_within("entropy", ent, same[1], truth[1], dtype)


def test_frozen_head_gets_no_gradient_work():
    """Only the inputs that require grad get gradients (the chunk loop skips the weight GEMM)."""
    base = make_batch(B=2, T=7, seed=25, dtype=torch.float64, bias=False)
    cfg = gf.GRPOConfig(beta=0.04)
    keys = ("hidden", "weight", "targets", "mask", "advantages", "old_logp", "ref_logp")

    def loss_and_hidden_grad(batch, fn, **kw):
        batch["weight"].requires_grad_(False)
        loss, _ = fn(*(batch[k] for k in keys), config=cfg, **kw)
        return loss, torch.autograd.grad(loss, [batch["hidden"]])[0]

    dev = cast({k: (v.to(DEVICE) if torch.is_tensor(v) else v) for k, v in base.items()}, torch.float32)
    loss, gh = loss_and_hidden_grad(dev, gf.grpo_loss, backend="triton")
    want, gw = loss_and_hidden_grad(cast(base, torch.float64), gf.reference.grpo_loss)
    assert dev["weight"].grad is None
    torch.testing.assert_close(loss.double().cpu(), want.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh.double().cpu(), gw.double(), rtol=1e-4, atol=1e-6)


def test_check_far_from_reference_case():
    """One of grpo-fast check's far-from-reference cases (KL up to ~30, T = 0.7) on the Triton kernels:
    at most twice the plain PyTorch computation's gradient error (the full set is the check's)."""
    from grpo_fast.commands import check

    _, _, status = check.check_far_case("triton", DEVICE, torch.float32, check.FAR_SHAPES[0], 30.0, 0.7)
    assert status == "PASS", status
