"""selective_logprobs of every CPU backend against the fp64 truth, forward and gradients."""

from __future__ import annotations

import pytest
import torch

import grpo_fast as gf

from .helpers import assert_within, cast, make_batch
from .test_loss import cpu_backends

BACKENDS = cpu_backends("selective_logprobs")


def run(fn, batch, temperature, **kw):
    logp, ent = fn(
        batch["hidden"],
        batch["weight"],
        batch["targets"],
        batch.get("bias"),
        temperature,
        return_entropy=True,
        **kw,
    )
    weights = torch.linspace(-1, 1, logp.numel(), dtype=torch.float64, device=logp.device).reshape(logp.shape)
    names = [k for k in ("hidden", "weight", "bias") if batch.get(k) is not None]
    g = torch.autograd.grad((logp.double() * weights).sum(), [batch[k] for k in names])
    return logp, ent, dict(zip(names, g, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize("temperature, bias", [(1.0, False), (0.7, True)])
def test_logprobs_match_truth(backend, dtype, temperature, bias):
    base = make_batch(seed=21, dtype=torch.float64, bias=bias, empty_row=False)
    truth = run(gf.reference.selective_logprobs, cast(base, torch.float64), temperature)
    same = run(gf.reference.selective_logprobs, cast(base, dtype), temperature)
    got = run(gf.selective_logprobs, cast(base, dtype), temperature, backend=backend, chunk_size=10)
    assert got[0].dtype == torch.float32 and got[0].shape == base["targets"].shape
    assert_within("logp", got[0], same[0], truth[0], dtype)
    assert_within("entropy", got[1], same[1], truth[1], dtype)
    for k in truth[2]:
        assert_within(f"grad {k}", got[2][k], same[2][k], truth[2][k], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_any_leading_shape_and_no_grad(backend):
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(2, 3, 4, 16, generator=g), torch.randn(50, 16, generator=g)
    targets = torch.randint(0, 50, (2, 3, 4), generator=g)
    with torch.no_grad():
        logp = gf.selective_logprobs(hidden, weight, targets, backend=backend)
    want = gf.reference.selective_logprobs(hidden, weight, targets)
    torch.testing.assert_close(logp, want)
    assert not logp.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_accuracy_at_a_wider_vocab(backend):
    # The entropy's fp32 sum over V terms: a blocked dot product once lost to PyTorch's own here.
    base = make_batch(B=2, T=130, H=96, V=4099, seed=4327, dtype=torch.float64, empty_row=False)
    truth = run(gf.reference.selective_logprobs, cast(base, torch.float64), 0.9)
    same = run(gf.reference.selective_logprobs, cast(base, torch.float32), 0.9)
    got = run(gf.selective_logprobs, cast(base, torch.float32), 0.9, backend=backend)
    assert_within("entropy", got[1], same[1], truth[1], torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1e-3, 1e-2])
def test_low_temperature_accuracy(backend, temperature):
    # |z| = |x| / T ~ 1e3: every p carries z's rounding, so all passes must round z alike. A product fused
    # into an fma in the exps but rounded for the max (hence lse) makes the gradient error 8x PyTorch's at
    # T = 1e-3.
    base = make_batch(B=2, T=130, H=96, V=4099, seed=4327, dtype=torch.float64, empty_row=False)
    truth = run(gf.reference.selective_logprobs, cast(base, torch.float64), temperature)
    same = run(gf.reference.selective_logprobs, cast(base, torch.float32), temperature)
    got = run(gf.selective_logprobs, cast(base, torch.float32), temperature, backend=backend)
    assert_within("logp", got[0], same[0], truth[0], torch.float32)
    assert_within("entropy", got[1], same[1], truth[1], torch.float32)
    for k in truth[2]:
        assert_within(f"grad {k}", got[2][k], same[2][k], truth[2][k], torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_capped_logprobs_match_truth(backend):
    base = make_batch(seed=23, dtype=torch.float64, bias=True, empty_row=False)
    kw = dict(logit_softcap=2.5)
    truth = run(gf.reference.selective_logprobs, cast(base, torch.float64), 0.9, **kw)
    same = run(gf.reference.selective_logprobs, cast(base, torch.float32), 0.9, **kw)
    got = run(gf.selective_logprobs, cast(base, torch.float32), 0.9, backend=backend, chunk_size=10, **kw)
    assert_within("logp", got[0], same[0], truth[0], torch.float32)
    assert_within("entropy", got[1], same[1], truth[1], torch.float32)
    for k in truth[2]:
        assert_within(f"grad {k}", got[2][k], same[2][k], truth[2][k], torch.float32)
    plain = run(gf.reference.selective_logprobs, cast(base, torch.float64), 0.9)
    assert (plain[0] - truth[0]).abs().max() > 1e-2  # the cap really bends these logits
