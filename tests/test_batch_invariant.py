"""batch_invariant=True: a token's log-prob never depends on the batch it is scored in (issue: the same
sequence alone, inside padded batches of other sequences, packed, in its first tokens only, and at any
chunk size, gives bitwise-equal log-probs and entropies; selective_logprobs and grpo_loss agree bitwise)."""

from __future__ import annotations

import pytest
import torch

import grpo_fast as gf

from .test_loss import LOSS_BACKENDS

BACKENDS = [b for b in ("torch", "native") if b in LOSS_BACKENDS]
DTYPES = [torch.float32, torch.bfloat16]
T, H, V = 37, 48, 1013


def _sequence(dtype, seed=0, H=H, V=V):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(V, H, generator=g) * H**-0.5).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.1).to(dtype)
    hidden = torch.randn(T, H, generator=g).to(dtype)  # the sequence under test
    targets = torch.randint(0, V, (T,), generator=g)
    others = torch.randn(5, 150, H, generator=g).to(dtype)  # other sequences it may be batched with
    other_targets = torch.randint(0, V, (5, 150), generator=g)
    return weight, bias, hidden, targets, others, other_targets


def _logprobs(hidden, weight, targets, bias, backend, **kw):
    return gf.selective_logprobs(
        hidden, weight, targets, bias, 0.9, True, backend=backend, batch_invariant=True, **kw
    )


@pytest.mark.parametrize("shape", [(H, V), (256, 4099)], ids=["small", "wider"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_do_not_depend_on_the_batch(backend, dtype, shape):
    weight, bias, hidden, targets, others, other_targets = _sequence(dtype, H=shape[0], V=shape[1])
    want_logp, want_ent = _logprobs(hidden, weight, targets, bias, backend)
    # padded into a [B, 150] batch of other sequences, at row 2
    batch, batch_targets = others.clone(), other_targets.clone()
    batch[2, :T], batch_targets[2, :T] = hidden, targets
    cases = {
        "padded batch": lambda kw: tuple(
            x[2, :T] for x in _logprobs(batch, weight, batch_targets, bias, backend, **kw)
        )
    }
    # packed after 95 tokens of another sequence
    packed = torch.cat([others[0, :95], hidden, others[1, :20]])
    packed_targets = torch.cat([other_targets[0, :95], targets, other_targets[1, :20]])
    cases["packed"] = lambda kw: tuple(
        x[95 : 95 + T] for x in _logprobs(packed, weight, packed_targets, bias, backend, **kw)
    )
    for name, run in cases.items():
        for chunk_size in (None, 1, 7, 64, 1000):
            logp, ent = run({"chunk_size": chunk_size})
            assert torch.equal(logp, want_logp), (name, chunk_size)
            assert torch.equal(ent, want_ent), (name, chunk_size)
    # the first tokens alone
    for k in (1, 5, 20):
        logp, ent = _logprobs(hidden[:k], weight, targets[:k], bias, backend)
        assert torch.equal(logp, want_logp[:k]) and torch.equal(ent, want_ent[:k]), k
    # and still right: the same numbers as the default path, within rounding
    ref_logp = gf.selective_logprobs(hidden, weight, targets, bias, 0.9, backend=backend)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(want_logp, ref_logp, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_on_policy_loss_is_exactly_minus_one(backend, dtype):
    """Old log-probs from selective_logprobs, scored again inside grpo_loss: ratio exactly 1 everywhere."""
    weight, bias, _, _, others, other_targets = _sequence(dtype, seed=1)
    hidden, targets = others[:4, :100], other_targets[:4, :100]
    mask = torch.ones(4, 100)
    mask[1, 60:] = 0
    mask[3, 10:] = 0
    with torch.no_grad():  # scored as one [B, T] batch, with a different chunking
        old = gf.selective_logprobs(hidden, weight, targets, bias, 1.0, backend=backend, batch_invariant=True)
    cfg = gf.GRPOConfig(loss_type="dapo", beta=0.0)
    for chunk_size in (None, 1, 7, 64, 1000):
        loss, metrics = gf.grpo_loss(
            hidden, weight, targets, mask, torch.ones(4), old, None, bias, cfg,
            backend=backend, chunk_size=chunk_size, batch_invariant=True,
        )  # fmt: skip
        assert loss.item() == -1.0, chunk_size
        assert metrics["ratio_not_one"].item() == 0.0
        assert metrics["clip_ratio_region"].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_are_run_to_run_identical(backend):
    weight, bias, _, _, others, other_targets = _sequence(torch.float32, seed=2)
    mask = torch.ones(3, 150)
    mask[0, 100:] = 0

    def run():
        h = others[:3].clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        loss, _ = gf.grpo_loss(
            h, w, other_targets[:3], mask, torch.tensor([1.0, -0.5, 0.3]), config=gf.GRPOConfig(beta=0.0),
            backend=backend, batch_invariant=True,
        )  # fmt: skip
        return torch.autograd.grad(loss, [h, w])

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_bad_options():
    weight, bias, hidden, targets, _, _ = _sequence(torch.float32)
    with pytest.raises(TypeError, match="batch_invariant must be a bool"):
        gf.selective_logprobs(hidden, weight, targets, batch_invariant="yes")
    with pytest.raises(ValueError, match="fused_gemm=True is not batch-invariant"):
        gf.selective_logprobs(hidden, weight, targets, fused_gemm=True, batch_invariant=True)
    with pytest.raises(TypeError, match="batch_invariant must be a bool"):
        gf.grpo_loss(
            hidden,
            weight,
            targets,
            torch.ones(T),
            torch.ones(1),
            seq_ids=torch.zeros(T, dtype=torch.long),
            batch_invariant=1,
        )
    assert "batch_invariant=True" in repr(gf.GRPOLoss(batch_invariant=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["triton", "native"])
def test_gpu_logprobs_do_not_depend_on_the_batch(backend, dtype):
    """The same checks on CUDA tensors: cuBLAS picks its kernel by shape too."""
    weight, bias, hidden, targets, others, other_targets = (x.cuda() for x in _sequence(dtype, H=256, V=4099))
    want = _logprobs(hidden, weight, targets, bias, backend)
    batch, batch_targets = others.clone(), other_targets.clone()
    batch[2, :T], batch_targets[2, :T] = hidden, targets
    for chunk_size in (None, 1, 7, 1000):
        got = _logprobs(batch, weight, batch_targets, bias, backend, chunk_size=chunk_size)
        assert all(torch.equal(g[2, :T], w) for g, w in zip(got, want, strict=True)), chunk_size
    got = _logprobs(hidden[:5], weight, targets[:5], bias, backend)
    assert all(torch.equal(g, w[:5]) for g, w in zip(got, want, strict=True))
