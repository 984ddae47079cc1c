"""Public ``group_advantages``: rewards of B prompts x G completions -> group-normalized advantages."""

from __future__ import annotations

from collections.abc import Sequence

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
