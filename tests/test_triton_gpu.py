"""The Triton backend on a real GPU: bfloat16, large vocabularies, tiles past 2**31 elements.

Marked ``gpu`` and skipped without CUDA (CI has none): run with ``pytest -m gpu tests`` on a GPU machine
(``benchmarks/run_gpu.sh`` does). tests/test_triton_ops.py also runs on the GPU, natively, there.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

pytest.importorskip("triton")

import grpo_fast as gf  # noqa: E402
from grpo_fast import backends  # noqa: E402
from grpo_fast.backends.torch_ops import TorchChunkOps  # noqa: E402
from grpo_fast.backends.triton_ops import TritonChunkOps, triton_group_advantages, triton_selective_logprobs  # noqa: E402
from grpo_fast.config import LOSS_TYPES  # noqa: E402
from grpo_fast.kernels import chunk_grad, chunk_stats, logprobs  # noqa: E402

from .chunk_cases import truth_stats  # noqa: E402
from .helpers import assert_within, make_batch  # noqa: E402
from .test_loss import check_against_truth  # noqa: E402

CUDA = torch.device("cuda")


def on_cuda(batch: dict) -> dict:
    return {k: (v.to(CUDA) if torch.is_tensor(v) else v) for k, v in batch.items()}


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_bf16_loss_matches_truth(loss_type, level):
    cfg = gf.GRPOConfig(
        loss_type=loss_type,
        importance_sampling_level=level,
        beta=0.04,
        epsilon_high=0.28,
        max_completion_length=256,
        temperature=0.9,
    )
    batch = on_cuda(make_batch(B=4, T=200, H=512, V=32003, seed=1, dtype=torch.float64))
    check_against_truth(batch, cfg, torch.bfloat16, "triton", chunk_size=128)  # truth on the GPU too


def test_auto_picks_triton_on_cuda():
    for op in backends.OPS:
        assert backends.resolve("auto", CUDA, op) == "triton"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_selective_logprobs_large_vocab(dtype):
    """The fused no-grad kernel and the with-grad chunk loop at a real vocabulary, against fp64."""
    g = torch.Generator(device="cuda").manual_seed(2)
    n, h, v = 300, 1024, 151936
    hidden = torch.randn(n, h, device=CUDA, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, device=CUDA, generator=g, dtype=torch.float64) * h**-0.5 * 2
    bias = torch.randn(v, device=CUDA, generator=g, dtype=torch.float64) * 0.1
    targets = torch.randint(0, v, (n,), device=CUDA, generator=g)
    truth = gf.reference.selective_logprobs(hidden, weight, targets, bias, 0.8, return_entropy=True)
    x = [t.to(dtype) for t in (hidden, weight, bias)]
    same = gf.reference.selective_logprobs(x[0], x[1], targets, x[2], 0.8, return_entropy=True)
    fused = logprobs.fused_logprobs(x[0], x[1], x[2], targets, 0.8)
    entry = triton_selective_logprobs(x[0], x[1], x[2], targets, 0.8)
    for got in (fused, entry):
        assert_within("logp", got[0], same[0], truth[0], dtype)
        assert_within("entropy", got[1], same[1], truth[1], dtype)
    hidden_g = x[0].clone().requires_grad_(True)
    logp = gf.selective_logprobs(hidden_g, x[1], targets, x[2], 0.8, backend="triton")
    (gh,) = torch.autograd.grad(logp.sum(), hidden_g)
    h64 = hidden.clone().requires_grad_(True)
    (gt,) = torch.autograd.grad(gf.reference.selective_logprobs(h64, weight, targets, bias, 0.8).sum(), h64)
    hs = x[0].clone().requires_grad_(True)
    (gs,) = torch.autograd.grad(gf.reference.selective_logprobs(hs, x[1], targets, x[2], 0.8).sum(), hs)
    assert_within("grad hidden", gh, gs, gt, dtype)


def test_tile_past_2_31_elements():
    """A [C, V] bf16 tile with C*V > 2**31: the last rows are addressed with 64-bit offsets."""
    rows, vocab = 8300, 262144 + 7
    assert rows * vocab > 2**31
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip("needs about 12 GB of free GPU memory")
    g = torch.Generator(device="cuda").manual_seed(3)
    logits = torch.randn(rows, vocab, device=CUDA, dtype=torch.bfloat16, generator=g) * 2
    targets = torch.randint(0, vocab, (rows,), device=CUDA, generator=g)
    tail = slice(rows - 64, rows)  # rows whose offsets pass 2**31
    lse, logp, ent = chunk_stats.chunk_stats(logits, targets, 1.0)
    want = TorchChunkOps().stats(logits[tail].clone(), targets[tail], 1.0)
    for a, b in zip((lse, logp, ent), want, strict=True):
        torch.testing.assert_close(a[tail], b, rtol=1e-5, atol=1e-4)
    gvec = torch.randn(rows, device=CUDA, generator=g)
    want_grad = TorchChunkOps().grad_(logits[tail].clone(), targets[tail], lse[tail], gvec[tail], 1.0)
    chunk_grad.chunk_grad_(logits, targets, lse, gvec, 1.0)
    torch.testing.assert_close(logits[tail], want_grad, rtol=2e-2, atol=1e-6)
    del logits
    logits = torch.randn(rows, vocab, device=CUDA, dtype=torch.bfloat16, generator=g) * 2
    lse, _, ent = chunk_stats.chunk_stats(logits, targets, 1.0)
    ecoef = torch.randn(rows, device=CUDA, generator=g)
    want_ent = TorchChunkOps().grad_(
        logits[tail].clone(),
        targets[tail],
        lse[tail],
        gvec[tail],
        1.0,
        ent_coef=ecoef[tail],
        entropy=ent[tail],
    )
    TritonChunkOps().grad_(logits, targets, lse, gvec, 1.0, ent_coef=ecoef, entropy=ent)
    torch.testing.assert_close(logits[tail], want_ent, rtol=2e-2, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_stats_and_grad_with_entropy_bf16_large_vocab(temperature):
    """stats then grad_ with the entropy term on a bf16 [C, 151936] tile, against fp64 autograd of
    ``sum(g * logp_target) + sum(e * H)`` (the torch backend in bf16 sets the tolerance)."""
    rows, vocab = 256, 151936
    g = torch.Generator(device="cuda").manual_seed(6)
    spread = torch.linspace(0.1, 8.0, rows, device=CUDA, dtype=torch.float64).unsqueeze(1)
    logits = (torch.randn(rows, vocab, device=CUDA, generator=g, dtype=torch.float64) * spread + 3).bfloat16()
    targets = torch.randint(0, vocab, (rows,), device=CUDA, generator=g)
    gvec, ecoef = torch.randn(2, rows, device=CUDA, generator=g).unbind(0)
    x = logits.double().requires_grad_(True)
    log_probs = (x / temperature).log_softmax(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    loss = (gvec.double() * log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)).sum()
    (truth,) = torch.autograd.grad(loss + (ecoef.double() * entropy).sum(), x)
    del log_probs, entropy, x
    results = {}
    for ops in (TritonChunkOps(), TorchChunkOps()):
        lse, logp, ent = ops.stats(logits, targets, temperature)
        dl = ops.grad_(logits.clone(), targets, lse, gvec, temperature, ent_coef=ecoef, entropy=ent)
        assert dl.dtype == torch.bfloat16
        results[ops.name] = (lse, logp, ent, dl)
    got, same = results["triton"], results["torch"]
    stats64 = truth_stats(logits, targets, temperature)
    for name, a, b, t in zip(("lse", "logp", "entropy"), got[:3], same[:3], stats64, strict=True):
        assert_within(name, a, b, t, torch.bfloat16)
    assert_within("dlogits", got[3], same[3], truth, torch.bfloat16)


def test_fused_logprobs_weight_past_2_31_elements():
    """W [V, H] with V*H > 2**31 elements (and the hidden rows): 64-bit offsets in the fused GEMM."""
    vocab, h, n = 263000, 8192, 96
    assert vocab * h > 2**31
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * 2**30:
        pytest.skip("needs about 16 GB of free GPU memory")
    g = torch.Generator(device="cuda").manual_seed(4)
    weight = torch.randn(vocab, h, device=CUDA, dtype=torch.bfloat16, generator=g) * h**-0.5
    hidden = torch.randn(n, h, device=CUDA, dtype=torch.bfloat16, generator=g)
    targets = torch.randint(0, vocab, (n,), device=CUDA, generator=g)
    targets[:8] = vocab - 1 - torch.arange(8, device=CUDA)  # rows of W past 2**31 elements
    logp, ent = logprobs.fused_logprobs(hidden, weight, None, targets, 1.0)
    want = gf.reference.selective_logprobs(hidden.float(), weight.float(), targets, None, 1.0, True)
    torch.testing.assert_close(logp, want[0], rtol=1e-4, atol=2e-3)
    torch.testing.assert_close(ent, want[1], rtol=1e-4, atol=2e-3)


def test_loss_at_benchmark_shape_matches_torch_backend():
    """(4096, 2048, 151936) bf16: the triton backend agrees with the torch backend."""
    from grpo_fast.benchmarking.harness import BenchCase, make_inputs

    case = BenchCase(N=4096, H=2048, V=151936, B=8, dtype="bfloat16", device="cuda", beta=0.04)
    out = {}
    for backend in ("triton", "torch"):
        inputs = make_inputs(case)
        loss, metrics = gf.grpo_loss(**inputs, config=case.config(), backend=backend)
        loss.backward()
        out[backend] = (loss, metrics, inputs["hidden"].grad, inputs["weight"].grad)
    a, b = out["triton"], out["torch"]
    torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-5)
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], rtol=1e-3, atol=1e-5)
    for x, y in zip(a[2:], b[2:], strict=True):
        assert (x.float() - y.float()).norm() <= 1e-2 * y.float().norm()


def test_group_advantages_on_cuda():
    g = torch.Generator().manual_seed(5)
    rewards = torch.randn(64 * 16, 3, generator=g)
    rewards[torch.rand(rewards.shape, generator=g) < 0.1] = float("nan")
    weights = torch.tensor([1.0, 0.5, 2.0])
    for scale in ("group", "batch", "none"):
        got = triton_group_advantages(rewards.to(CUDA), weights.to(CUDA), 16, scale, 1e-4)
        want = gf.reference.group_advantages(rewards, 16, scale, 1e-4, weights)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "native", "torch"])
@pytest.mark.parametrize("temperature", [1e-3, 1e-2])
def test_low_temperature_accuracy_on_cuda(backend, temperature):
    # Every pass must round z = x / T alike (no fma fusion of the product in one pass only). fp32 with
    # the split (tile) path: the fused log-prob GEMM is forward-only.
    from .test_logprobs import run

    try:
        backends.resolve(backend, CUDA, "selective_logprobs")
    except ValueError as err:
        pytest.skip(str(err))
    base = make_batch(B=2, T=130, H=96, V=4099, seed=4327, dtype=torch.float64, empty_row=False)

    def leaves(dtype, device):
        head = ("hidden", "weight", "bias")
        out = {k: v.to(device) for k, v in base.items() if torch.is_tensor(v)}
        return out | {k: out[k].to(dtype).clone().requires_grad_(True) for k in head if k in out}

    truth = run(gf.reference.selective_logprobs, leaves(torch.float64, "cpu"), temperature)
    same = run(gf.reference.selective_logprobs, leaves(torch.float32, CUDA), temperature)
    got = run(gf.selective_logprobs, leaves(torch.float32, CUDA), temperature, backend=backend)
    assert_within("logp", got[0], same[0], truth[0], torch.float32)
    assert_within("entropy", got[1], same[1], truth[1], torch.float32)
    for k in truth[2]:
        assert_within(f"grad {k}", got[2][k], same[2][k], truth[2][k], torch.float32)
