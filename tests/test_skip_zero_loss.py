"""Rows whose gradient is exactly zero take no part in dlogits and the gradient GEMMs: the loss, metrics and
gradients are those of the full computation, on every backend, and the skipped work really is skipped."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import grpo_fast as gf
from grpo_fast import backends
from grpo_fast.config import LOSS_TYPES
from grpo_fast.engine import chunk_loop
from grpo_fast.engine.plan import LossCall, plan_loss, run_loss_plan

from .helpers import cast, grads, make_batch


def _backends() -> list[str]:
    out = []
    for name in ("torch", "native", "triton"):
        try:
            backends.resolve(name, torch.device("cpu"), "grpo_loss")
        except (ValueError, RuntimeError, ImportError):
            continue
        out.append(name)
    return out


BACKENDS = _backends()
FAST_BACKENDS = [b for b in BACKENDS if b != "triton"]  # Triton runs in its CPU interpreter: fewer cases


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def zero_adv_batch(seed: int = 0, zeros=(1, 3), B: int = 5, T: int = 11, **kw) -> dict:
    """A small fp32 batch (off-policy old log-probs: some ratios clip) with advantage 0 on rows ``zeros``."""
    batch = make_batch(B=B, T=T, H=24, V=131, seed=seed, empty_row=False, **kw)
    adv = batch["advantages"].clone()
    adv[list(zeros)] = 0.0
    batch["advantages"] = adv
    return cast(batch, torch.float32)


def run(batch: dict, cfg: gf.GRPOConfig, skip: bool, monkeypatch, **kw):
    """(loss, metrics, grads) with the skip, or with every row walked (``skip=False``)."""
    with monkeypatch.context() as m:
        if not skip:
            m.setattr(chunk_loop, "zero_split", lambda zero, live=None: None)
        batch = cast(batch, torch.float32)
        args = {k: batch.get(k) for k in ("old_logp", "ref_logp", "bias")}
        loss, metrics = gf.grpo_loss(
            batch["hidden"], batch["weight"], batch["targets"], batch["mask"], batch["advantages"],
            config=cfg, **args, **kw,
        )  # fmt: skip
        return loss, metrics, grads(loss, batch)


def assert_same(got, want, tol: float = 1e-5, exact: bool = False) -> None:
    loss, metrics, g = got
    loss0, metrics0, g0 = want
    check = (
        torch.equal if exact else (lambda a, b: torch.allclose(a, b, rtol=1e-6, atol=1e-7, equal_nan=True))
    )
    assert check(loss, loss0), (loss, loss0)
    assert metrics.keys() == metrics0.keys()
    for k in metrics0:
        assert check(metrics[k], metrics0[k]) or (metrics[k].isnan() and metrics0[k].isnan()), k
    for k in g0:
        assert rel(g[k], g0[k]) <= tol, (k, rel(g[k], g0[k]))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_skip_matches_full_walk(backend, level, loss_type, monkeypatch):
    batch = zero_adv_batch(seed=1)
    cfg = gf.GRPOConfig(loss_type=loss_type, importance_sampling_level=level, max_completion_length=11)
    got = run(batch, cfg, True, monkeypatch, backend=backend, chunk_size=16)
    want = run(batch, cfg, False, monkeypatch, backend=backend, chunk_size=16)
    assert_same(got, want)
    # The zero-advantage rows' hidden gradient is exactly zero.
    assert torch.count_nonzero(got[2]["hidden"][[1, 3]]) == 0


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_skip_matches_full_walk_triton(level, loss_type, monkeypatch):
    if "triton" not in BACKENDS:
        pytest.skip("Triton is not installed")
    batch = zero_adv_batch(seed=2, zeros=(1,), B=3, T=5)
    cfg = gf.GRPOConfig(loss_type=loss_type, importance_sampling_level=level)
    got = run(batch, cfg, True, monkeypatch, backend="triton", chunk_size=8)
    want = run(batch, cfg, False, monkeypatch, backend="triton", chunk_size=8)
    assert_same(got, want)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_skip_matches_truth(backend, level):
    from .test_loss import check_against_truth

    batch = make_batch(B=4, T=13, H=24, V=131, seed=3)
    batch["advantages"][[0, 2]] = 0.0
    for loss_type in ("dapo", "grpo", "bnpo", "dr_grpo"):
        cfg = gf.GRPOConfig(loss_type=loss_type, importance_sampling_level=level, max_completion_length=13)
        check_against_truth(batch, cfg, torch.float32, backend, chunk_size=8)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_batch_invariant_skip_is_bitwise(backend, level, monkeypatch):
    """Gathered into the same 128-row GEMMs, the kept rows' statistics and hidden gradients are bitwise those
    of the full walk; the weight gradient sums the same products in another grouping (fp32 rounding)."""
    batch = zero_adv_batch(seed=4, zeros=(0, 2, 3))
    cfg = gf.GRPOConfig(importance_sampling_level=level)
    kw = dict(backend=backend, chunk_size=16, batch_invariant=True)
    got = run(batch, cfg, True, monkeypatch, **kw)
    want = run(batch, cfg, False, monkeypatch, **kw)
    assert_same(got, want, exact=True)
    assert torch.equal(got[2]["hidden"], want[2]["hidden"])
    again = run(batch, cfg, True, monkeypatch, **kw)
    assert all(torch.equal(again[2][k], got[2][k]) for k in got[2])  # run to run


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_everything_skipped(backend, level, monkeypatch):
    batch = zero_adv_batch(seed=5, zeros=range(5))
    cfg = gf.GRPOConfig(importance_sampling_level=level)
    got = run(batch, cfg, True, monkeypatch, backend=backend)
    want = run(batch, cfg, False, monkeypatch, backend=backend)
    assert_same(got, want)
    assert got[0] == 0
    assert all(torch.count_nonzero(g) == 0 for g in got[2].values())


class RowCounter:
    """A backend's chunk ops that count the rows given to the dlogits pass (``tile_pass_``, ``grad_``)."""

    def __init__(self, ops):
        self.ops, self.name, self.fp32_temps = ops, ops.name, ops.fp32_temps
        self.grad_rows = 0

    def stats(self, *a, **k):
        return self.ops.stats(*a, **k)

    def stats_(self, *a, **k):
        return self.ops.stats_(*a, **k)

    def partial_stats(self, *a, **k):
        return self.ops.partial_stats(*a, **k)

    def grad_(self, logits, *a, **k):
        self.grad_rows += logits.shape[0]
        return self.ops.grad_(logits, *a, **k)

    def tile_pass_(self, logits, *a, **k):
        self.grad_rows += logits.shape[0]
        return self.ops.tile_pass_(logits, *a, **k)


def grad_rows(batch: dict, cfg: gf.GRPOConfig, **kw) -> tuple[int, int]:
    """(rows through the dlogits pass, unmasked tokens)."""
    args = {k: batch.get(k) for k in ("old_logp", "ref_logp", "bias")}
    h, w, b, plan = plan_loss(
        LossCall(
            batch["hidden"], batch["weight"], batch["targets"], batch["mask"], batch["advantages"],
            config=cfg, **args, backend="torch", **kw,
        )
    )  # fmt: skip
    spy = RowCounter(plan.ops)
    loss, _ = run_loss_plan(h, w, b, dataclasses.replace(plan, ops=spy))
    loss.backward()
    return spy.grad_rows, int((batch["mask"] != 0).sum())


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_zero_advantage_rows_skip_dlogits(level):
    batch = zero_adv_batch(seed=6)
    live = int((batch["mask"][[0, 2, 4]] != 0).sum())
    rows, total = grad_rows(batch, gf.GRPOConfig(importance_sampling_level=level))
    assert live < total and rows <= live
    if level == "token":
        assert rows == live


@pytest.mark.parametrize("options", [dict(beta=0.04), dict(entropy_coef=0.01)], ids=["beta", "entropy_bonus"])
def test_rows_that_have_a_gradient_are_not_skipped(options):
    """With a KL term or an entropy bonus a zero advantage leaves a gradient: every row is walked."""
    batch = zero_adv_batch(seed=7)
    rows, total = grad_rows(batch, gf.GRPOConfig(**options))
    assert rows == total


def test_clipped_sequences_skip_dlogits():
    """Sequence-level ratios: a sequence whose ratio is clipped (gradient cut) is left out of the gradient
    walk like a zero-advantage one."""
    batch = zero_adv_batch(seed=8, zeros=())
    batch["advantages"] = batch["advantages"].abs()
    with torch.no_grad():  # row 0: old log-probs far below the policy's, ratio > 1 + eps_high: clipped
        logp = gf.reference.selective_logprobs(
            batch["hidden"].double(), batch["weight"].double(), batch["targets"], batch["bias"].double()
        )
    old = logp.float().clone()
    old[0] -= 1.0
    batch["old_logp"] = old
    rows, total = grad_rows(batch, gf.GRPOConfig(importance_sampling_level="sequence"))
    assert rows == total - int((batch["mask"][0] != 0).sum())


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_selective_logprobs_backward_skips_zero_rows(backend, monkeypatch):
    batch = zero_adv_batch(seed=9)
    upstream = torch.randn(batch["targets"].shape)
    upstream[[1, 3]] = 0.0

    def grads_of(skip: bool):
        with monkeypatch.context() as m:
            if not skip:
                m.setattr(chunk_loop, "zero_split", lambda zero, live=None: None)
            b = cast(batch, torch.float32)
            logp = gf.selective_logprobs(b["hidden"], b["weight"], b["targets"], b["bias"], backend=backend)
            return grads((logp * upstream).sum(), b)

    got, want = grads_of(True), grads_of(False)
    for k in want:
        assert rel(got[k], want[k]) <= 1e-5, k
    assert torch.count_nonzero(got["hidden"][[1, 3]]) == 0
