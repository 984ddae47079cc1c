"""Nothing silent: bad log-prob inputs are named, overflowing ratios keep finite gradients, large reward
offsets keep their differences, and configs reject what only looks like a value."""

from __future__ import annotations

import pytest
import torch

import grpo_fast as gf

from .helpers import cast, make_batch
from .test_loss import LOSS_BACKENDS, run_loss


def _args(batch):
    return (batch["hidden"], batch["weight"], batch["targets"], batch["mask"], batch["advantages"])


@pytest.mark.parametrize("name", ["old_logp", "ref_logp"])
@pytest.mark.parametrize("value", [float("nan"), float("-inf"), float("inf"), 0.5])
def test_bad_log_probs_at_unmasked_positions_are_named(name, value):
    batch = cast(make_batch(seed=3, dtype=torch.float64), torch.float32)
    logp = batch[name].clone()
    unmasked = batch["mask"].nonzero()[0].tolist()
    logp[tuple(unmasked)] = value
    kw = dict(old_logp=batch["old_logp"], ref_logp=batch["ref_logp"], config=gf.GRPOConfig(beta=0.04))
    kw[name] = logp
    with pytest.raises(ValueError, match=f"{name} must hold finite log-probs"):
        gf.grpo_loss(*_args(batch), **kw)
    # at a masked position anything goes (padding)
    masked = (batch["mask"] == 0).nonzero()[0].tolist()
    logp = batch[name].clone()
    logp[tuple(masked)] = value
    kw[name] = logp
    loss, _ = gf.grpo_loss(*_args(batch), **kw)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize(
    "cfg",
    [
        gf.GRPOConfig(loss_type="dapo"),
        gf.GRPOConfig(loss_type="sapo"),
        gf.GRPOConfig(loss_type="grpo", delta=2.0),
        gf.GRPOConfig(loss_type="dapo", beta=0.04),
    ],
    ids=["clipped", "sapo", "delta", "kl"],
)
def test_overflowing_ratio_keeps_gradients_finite(backend, cfg):
    """logp - old_logp > 88 overflows exp in fp32 (TRL: inf ratio, NaN gradients): grpo_fast holds the
    ratio at exp(80), where every one of these terms has a true gradient of 0."""
    batch = cast(make_batch(seed=4, dtype=torch.float64), torch.float32)
    batch["advantages"] = batch["advantages"].abs() + 0.1  # positive: the clipped / saturated side
    old = batch["old_logp"].clone()
    old[:, :3] = -200.0  # ratios of e^190 and more
    batch["old_logp"] = old
    loss, metrics, grads = run_loss(batch, cfg, gf.grpo_loss, backend=backend)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in metrics.values())
    assert all(torch.isfinite(g).all() for g in grads.values())
    # and the clip metrics still agree with TRL's (whose loss and gradients are inf or NaN here)
    _, ref_metrics, _ = run_loss(batch, cfg, gf.reference.grpo_loss)
    assert metrics["clip_ratio_high"].item() == pytest.approx(ref_metrics["clip_ratio_high"].item())


def test_large_reward_offsets_keep_their_differences():
    """Rewards 1e7 and 1e7 + 1: fp32 means lose the 1; the torch backend computes in fp64 like native."""
    rewards = torch.tensor([1e7, 1e7 + 1, 1e7, 1e7 + 1] * 3)
    want = gf.reference.group_advantages(rewards.double(), 4, "group", 1e-4, compute_dtype=torch.float64)
    assert want[:4].tolist() == pytest.approx([-0.866, 0.866, -0.866, 0.866], abs=1e-3)
    for backend in LOSS_BACKENDS:
        got = gf.group_advantages(rewards, 4, backend=backend)
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    batch_scaled = gf.group_advantages(rewards, 4, scale="batch", backend="torch")
    assert batch_scaled.abs().min() > 0.8


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(use_bias_correction_kl="no"), "use_bias_correction_kl must be a bool"),
        (dict(max_completion_length=True), "max_completion_length must be a positive int"),
        (dict(loss_type="dr_grpo"), "needs max_completion_length"),
        (dict(vespo_k_pos=float("nan")), "vespo_k_pos"),
    ],
)
def test_config_rejects_values_that_only_look_right(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gf.GRPOConfig(**kwargs)


def _loss_inputs(**over):
    x = dict(
        hidden=torch.randn(2, 3, 4),
        weight=torch.randn(5, 4),
        targets=torch.zeros(2, 3, dtype=torch.long),
        mask=torch.ones(2, 3),
        advantages=torch.ones(2),
    )
    return {**x, **over}


META_LONG = torch.zeros(2, 3, dtype=torch.long, device="meta")
DEGENERATE = {
    "H=0": (dict(hidden=torch.randn(2, 3, 0), weight=torch.randn(5, 0)), ValueError, "H=0"),
    "targets on meta": (dict(targets=META_LONG), ValueError, "targets is on meta"),
    "mask on meta": (dict(mask=torch.ones(2, 3, device="meta")), ValueError, "mask is on meta"),
    "advantages on meta": (
        dict(advantages=torch.ones(2, device="meta")),
        ValueError,
        "advantages is on meta",
    ),
}


@pytest.mark.parametrize("case", DEGENERATE)
def test_degenerate_loss_inputs_get_a_named_error(case):
    over, error, match = DEGENERATE[case]
    with pytest.raises(error, match=match):
        gf.grpo_loss(**_loss_inputs(**over))


def test_meta_tensors_and_empty_rewards_get_a_named_error():
    with pytest.raises(ValueError, match="meta device"):
        gf.grpo_loss(**{k: v.to("meta") for k, v in _loss_inputs().items()})
    meta = dict(device="meta")
    with pytest.raises(ValueError, match="meta device"):
        gf.selective_logprobs(torch.randn(3, 4, **meta), torch.randn(5, 4, **meta), META_LONG[0])
    with pytest.raises(ValueError, match="rewards is empty"):
        gf.group_advantages(torch.tensor([]), 4)
    with pytest.raises(ValueError, match="meta device"):
        gf.group_advantages(torch.rand(8, 2, **meta), 4)
    with pytest.raises(TypeError, match="reward_weights must be numbers"):
        gf.group_advantages(torch.rand(8, 2), 4, reward_weights=["a", "b"])
