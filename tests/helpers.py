"""Test helpers: random GRPO batches and the per-dtype tolerance rule.

The tolerance rule itself lives in grpo_fast.commands.accuracy (shared with `grpo-fast check`).
"""

from __future__ import annotations

import torch
from torch import Tensor

import grpo_fast as gf
from grpo_fast.commands.accuracy import bound, max_err, scale_for


def assert_within(name: str, got: Tensor, same_dtype_ref: Tensor, truth: Tensor, dtype: torch.dtype) -> None:
    err, ref_err = max_err(got, truth), max_err(same_dtype_ref, truth)
    limit = bound(ref_err, scale_for(name, truth), dtype)
    assert err <= limit, (
        f"{name}: error {err:.3e} vs fp64 truth exceeds {limit:.3e} (torch {dtype}: {ref_err:.3e})"
    )


def make_batch(
    B=3,
    T=37,
    H=67,
    V=1013,
    *,
    dtype=torch.float32,
    seed=0,
    with_old=True,
    with_ref=True,
    bias=True,
    empty_row=True,
) -> dict:
    """An fp64 GRPO batch on odd, non-tile sizes; cast with `cast`. Row 1 is fully masked."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * H**-0.5 * 2
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.1 if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.25).long()
    if empty_row and B > 1:
        mask[1] = 0
        targets[1, :5] = -100  # masked positions may hold any id
    with torch.no_grad():
        logp = gf.reference.selective_logprobs(hidden, weight, targets.clamp(min=0), b)
    batch = dict(
        hidden=hidden,
        weight=weight,
        bias=b,
        targets=targets,
        mask=mask,
        advantages=torch.randn(B, generator=g, dtype=torch.float64),
    )
    # Old/ref log-probs within ~0.3 nats of the policy's, so some ratios clip and some don't.
    if with_old:
        batch["old_logp"] = (logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    if with_ref:
        batch["ref_logp"] = (logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    return cast(batch, dtype)


def cast(batch: dict, dtype: torch.dtype) -> dict:
    """Float inputs of the LM head to dtype (fresh leaves requiring grad); log-probs stay fp32."""
    out = dict(batch)
    for k in ("hidden", "weight", "bias"):
        if out.get(k) is not None:
            out[k] = batch[k].detach().to(dtype).requires_grad_(True)
    out["advantages"] = batch["advantages"].float()
    return out


def grads(loss: Tensor, batch: dict) -> dict[str, Tensor]:
    names = [k for k in ("hidden", "weight", "bias") if batch.get(k) is not None]
    return dict(zip(names, torch.autograd.grad(loss, [batch[k] for k in names]), strict=True))
