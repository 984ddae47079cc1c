"""group_advantages of every CPU backend against the reference (TRL's lines)."""

from __future__ import annotations

import pytest
import torch

import grpo_fast as gf

from .test_loss import cpu_backends

BACKENDS = cpu_backends("group_advantages")


def rewards_with_nans(M: int, R: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(M, R, generator=g) * 3
    r[torch.rand(M, R, generator=g) < 0.2] = float("nan")
    r[1] = float("nan")
    return r


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("R, G", [(1, 8), (3, 5), (2, 1)])
def test_advantages_match_reference(backend, scale, R, G):
    rewards = rewards_with_nans(7 * G, R, seed=R * 10 + G)
    weights = torch.linspace(0.5, 2.0, R)
    want = gf.reference.group_advantages(rewards, G, scale, 1e-4, weights)
    got = gf.group_advantages(
        rewards if R > 1 else rewards[:, 0], G, scale=scale, reward_weights=weights.tolist(), backend=backend
    )
    assert got.dtype == torch.float32 and got.shape == (7 * G,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got[1] == 0  # no reward applies -> advantage 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_rewards_give_zero_advantage(backend):
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 2.0])
    adv = gf.group_advantages(rewards, 3, backend=backend)
    assert torch.all(adv[:3] == 0)
    torch.testing.assert_close(adv[3:], torch.tensor([-1.0, 0.0, 1.0]) / (1.0 + 1e-4))
