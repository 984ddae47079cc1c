"""The reference against a real peer: liger-kernel's LigerFusedLinearGRPOLoss (CPU, compiled=False)."""

from __future__ import annotations

import pytest
import torch

import grpo_fast as gf

from .helpers import cast, make_batch

liger = pytest.importorskip("liger_kernel.chunked_loss")


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_reference_matches_liger(loss_type, level, beta):
    cfg = gf.GRPOConfig(
        loss_type=loss_type,
        importance_sampling_level=level,
        beta=beta,
        epsilon_high=0.28,
        max_completion_length=37,
        temperature=0.9,
        use_bias_correction_kl=False,
    )
    batch = cast(make_batch(seed=31, dtype=torch.float64, empty_row=False), torch.float32)
    batch["targets"] = batch["targets"].clamp(min=0)
    peer = liger.LigerFusedLinearGRPOLoss(
        beta=beta,
        compiled=False,
        use_ref_model=beta > 0,
        chunk_size=1,
        epsilon_low=0.2,
        epsilon_high=0.28,
        loss_type=loss_type,
        max_completion_length=37,
        importance_sampling_level=level,
        temperature=0.9,
        use_bias_correction_kl=False,
    )
    out = peer(
        batch["hidden"],
        batch["weight"],
        batch["targets"],
        batch["mask"],
        batch["advantages"],
        bias=batch["bias"],
        ref_per_token_logps=batch["ref_logp"] if beta else None,
        old_per_token_logps=batch["old_logp"],
    )
    peer_loss = out[0] if isinstance(out, tuple) else out
    peer_grads = torch.autograd.grad(peer_loss, [batch["hidden"], batch["weight"]])
    loss, _ = gf.reference.grpo_loss(
        batch["hidden"],
        batch["weight"],
        batch["targets"],
        batch["mask"],
        batch["advantages"],
        batch["old_logp"],
        batch["ref_logp"] if beta else None,
        batch["bias"],
        cfg,
    )
    grads = torch.autograd.grad(loss, [batch["hidden"], batch["weight"]])
    torch.testing.assert_close(loss, peer_loss, rtol=1e-4, atol=1e-6)
    for a, b in zip(grads, peer_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
