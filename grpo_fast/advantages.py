"""Public ``group_advantages``: rewards of B prompts x G completions -> group-normalized advantages."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import backends
from .engine.validation import validate_advantage_inputs


def group_advantages(
    rewards: Tensor,
    group_size: int,
    scale: str = "group",
    eps: float = 1e-4,
    reward_weights: Tensor | Sequence[float] | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Advantages ``(r - mean_group(r)) / (std + eps)`` as TRL computes them, fp32 ``[B*G]``.

    rewards ``[B*G]`` or ``[B*G, R]`` for R reward functions, rows grouped by prompt (G consecutive rows
    per prompt). Several functions are summed with ``reward_weights``; a NaN reward means "does not
    apply" and is skipped, a row with no reward at all gets advantage 0. ``scale``: "group" (std within
    the group), "batch" (std over all rows) or "none". The std is Bessel-corrected and NaN-aware.
    """
    rewards2d, weights, group_size = validate_advantage_inputs(
        rewards, group_size, scale, eps, reward_weights
    )
    name = backends.resolve(backend, rewards2d.device, "group_advantages")
    return backends.group_advantages_fn(name)(rewards2d, weights, group_size, scale, float(eps))


def equal_reward_groups(rewards: Tensor, group_size: int) -> Tensor:
    """[B] bool: the groups of ``rewards`` (``[B*G]`` totals, NaN: not scored) whose scored rewards are all
    exactly equal (or that have none): the groups whose advantages are exactly 0. An fp32 std of equal
    rewards is rounding noise (8 x 0.7 gives ~6e-8), so no tolerance on a std can say this."""
    grouped = rewards.reshape(-1, group_size)
    nan = torch.isnan(grouped)
    high = torch.where(nan, float("-inf"), grouped).amax(1)
    low = torch.where(nan, float("inf"), grouped).amin(1)
    return (high == low) | nan.all(1)
