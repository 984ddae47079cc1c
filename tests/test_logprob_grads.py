"""Gradients through both outputs of selective_logprobs: any weighted sum of log-probs and entropies, on
every backend, against the fp64 materialized-logits truth (the tolerance rule of tests/helpers.py).

The weights are random per token and 0 on the batch's masked tokens, as a loss written on the log-probs
masks them. An entropy that receives no gradient costs nothing: the tiles then skip its term.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import grpo_fast as gf
from grpo_fast.engine import chunk_loop

from .helpers import assert_within, cast, make_batch
from .spawn import spawn
from .test_loss import cpu_backends
from .test_vocab_parallel import _shard_rows

BACKENDS = cpu_backends("selective_logprobs")
LEAVES = ("hidden", "weight", "bias")


def _coefficients(batch: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random fp64 per-token weights (a for logp, b for entropy), 0 where the batch masks the token."""
    g = torch.Generator().manual_seed(seed)
    shape, keep = batch["targets"].shape, batch["mask"].double()
    return torch.randn(shape, generator=g, dtype=torch.float64) * keep, torch.randn(
        shape, generator=g, dtype=torch.float64
    ) * keep


def weighted_grads(fn, batch: dict, coefs, temperature: float, device: str = "cpu", **kw) -> dict:
    """Gradients of ``sum(a * logp + b * entropy)`` to hidden, weight and bias (on ``device``)."""
    names = [k for k in LEAVES if batch.get(k) is not None]
    leaves = [batch[k].detach().to(device).requires_grad_(True) for k in names]
    x = dict(zip(names, leaves, strict=True))
    targets = batch["targets"].clamp(min=0).to(device)
    logp, ent = fn(x["hidden"], x["weight"], targets, x.get("bias"), temperature, True, **kw)
    a, b = (c.to(device) for c in coefs)
    objective = (a * logp.double()).sum() + (b * ent.double()).sum()
    return dict(zip(names, (g.cpu() for g in torch.autograd.grad(objective, leaves)), strict=True))


def check(base: dict, dtype: torch.dtype, temperature: float, backend: str, seed: int, **kw) -> None:
    coefs = _coefficients(base, seed)
    ref_kw = {"logit_softcap": kw["logit_softcap"]} if "logit_softcap" in kw else {}
    truth = weighted_grads(
        gf.reference.selective_logprobs, cast(base, torch.float64), coefs, temperature, **ref_kw
    )
    same = weighted_grads(gf.reference.selective_logprobs, cast(base, dtype), coefs, temperature, **ref_kw)
    got = weighted_grads(gf.selective_logprobs, cast(base, dtype), coefs, temperature, backend=backend, **kw)
    for k in truth:
        assert got[k].dtype == dtype
        assert_within(f"grad {k}", got[k], same[k], truth[k], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "temperature, options",
    [
        (1.0, dict(bias=False)),
        (0.7, dict(softcap=2.5)),
        (0.9, dict(batch_invariant=True)),
    ],
    ids=["plain", "bias-softcap", "batch-invariant"],
)
def test_weighted_logp_and_entropy_grads_match_truth(backend, dtype, temperature, options):
    options = dict(options)
    base = make_batch(seed=31, dtype=torch.float64, bias=options.pop("bias", True))
    kw = {"chunk_size": 10}
    if "softcap" in options:
        kw["logit_softcap"] = options.pop("softcap")
    check(base, dtype, temperature, backend, seed=32, **kw, **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_rows_and_entropy_only(backend):
    """A packed ``[N, H]`` layout (odd N), and a gradient through the entropy alone."""
    base = make_batch(B=1, T=53, H=41, V=577, seed=33, dtype=torch.float64)
    base = {k: v[0] if k in ("hidden", "targets", "mask") else v for k, v in base.items()}
    check(base, torch.float32, 0.8, backend, seed=34, chunk_size=16)
    _, b = _coefficients(base, 35)
    zeros = torch.zeros_like(b)
    truth = weighted_grads(gf.reference.selective_logprobs, cast(base, torch.float64), (zeros, b), 0.8)
    same = weighted_grads(gf.reference.selective_logprobs, cast(base, torch.float32), (zeros, b), 0.8)
    got = weighted_grads(gf.selective_logprobs, cast(base, torch.float32), (zeros, b), 0.8, backend=backend)
    for k in truth:
        assert_within(f"grad {k}", got[k], same[k], truth[k], torch.float32)


def _entropy_terms(monkeypatch) -> list[bool]:
    """Records, per gradient pass over the tiles, whether it ran the entropy term."""
    seen: list[bool] = []
    inner = chunk_loop.grad_pass

    def spy(*args, **kwargs):
        seen.append(args[5][1] is not None)  # coefs = (g, e)
        return inner(*args, **kwargs)

    monkeypatch.setattr(chunk_loop, "grad_pass", spy)
    return seen


def test_an_entropy_without_gradient_costs_nothing(monkeypatch):
    seen = _entropy_terms(monkeypatch)
    batch = cast(make_batch(B=2, T=9, H=16, V=101, seed=36, dtype=torch.float64), torch.float32)
    args = (batch["hidden"], batch["weight"], batch["targets"].clamp(min=0), batch["bias"])
    logp, ent = gf.selective_logprobs(*args, return_entropy=True)
    logp.sum().backward(retain_graph=True)  # the entropy is a metric here: no entropy term
    (logp.sum() + 0.0 * ent.sum()).backward(retain_graph=True)  # the entropy is differentiated: its term
    ent.mean().backward()
    assert seen == [False, True, True]
    assert ent.requires_grad  # differentiable output, detached or not by the caller's choice


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's masked lanes: inf - inf
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_weighted_grads_match_truth(dtype):
    """The Triton backend under the interpreter (bf16's tl.dot is wrong there; the GPU tests cover it)."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the Triton kernels cannot run")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = make_batch(B=2, T=9, H=24, V=131, seed=37, dtype=torch.float64)
    coefs = _coefficients(base, 38)
    truth = weighted_grads(gf.reference.selective_logprobs, cast(base, torch.float64), coefs, 0.8)
    same = weighted_grads(gf.reference.selective_logprobs, cast(base, dtype), coefs, 0.8)
    got = weighted_grads(
        gf.selective_logprobs, cast(base, dtype), coefs, 0.8, device, backend="triton", chunk_size=8
    )
    for k in truth:
        assert_within(f"grad {k}", got[k], same[k], truth[k], dtype)


def _vocab_parallel_worker(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for backend in BACKENDS:
            base = make_batch(B=2, T=13, H=24, V=301, seed=39, dtype=torch.float64)
            batch, coefs = cast(base, torch.float32), _coefficients(base, 40)
            want = weighted_grads(
                gf.selective_logprobs, batch, coefs, 0.7, backend=backend, logit_softcap=3.0
            )
            rows = _shard_rows(batch["weight"].shape[0], world, rank)
            local = dict(batch, weight=batch["weight"][rows], bias=batch["bias"][rows])
            got = weighted_grads(
                gf.selective_logprobs, local, coefs, 0.7, backend=backend, logit_softcap=3.0,
                chunk_size=8 + rank, process_group=dist.group.WORLD,
            )  # fmt: skip
            torch.testing.assert_close(got["hidden"], want["hidden"], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(got["weight"], want["weight"][rows], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(got["bias"], want["bias"][rows], rtol=1e-4, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_weighted_grads_equal_single_process(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # two processes share this machine's cores
    spawn(_vocab_parallel_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2)
