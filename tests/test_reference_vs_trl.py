"""grpo_fast.reference against TRL 1.16's own GRPOTrainer._compute_loss and advantage code.

TRL's method is called unbound on a stand-in trainer whose log-prob step returns the reference's
log-probs, so the loss lines, reductions and metrics under test are TRL's own code.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

import grpo_fast as gf
from grpo_fast.config import LOSS_TYPES

from .helpers import cast, make_batch

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


def trl_loss(batch: dict, cfg: gf.GRPOConfig, num_items: float, **extra):
    """TRL's _compute_loss on ``batch``; ``extra``: more of its inputs (sampling_per_token_logps,
    importance_sampling_ratio: the vLLM correction is then on)."""
    from collections import defaultdict

    def logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kw):
        logp, ent = gf.reference.selective_logprobs(
            batch["hidden"],
            batch["weight"],
            batch["targets"].clamp(min=0),
            batch["bias"],
            cfg.temperature,
            return_entropy=True,
        )
        return logp, ent, None

    B, T = batch["targets"].shape
    args = SimpleNamespace(**dataclasses.asdict(cfg), steps_per_generation=1)  # TRL's names, every option
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=logps_and_entropies,
        get_gamma_weights=trl_grpo.GRPOTrainer.get_gamma_weights,
        get_high_entropy_mask=None,
        get_off_policy_mask=trl_grpo.GRPOTrainer.get_off_policy_mask,
        top_entropy_quantile=cfg.top_entropy_quantile,
        off_policy_mask_threshold=cfg.off_policy_mask_threshold,
        entropy_coef=cfg.entropy_coef,
        use_adaptive_entropy=False,
        importance_sampling_level=cfg.importance_sampling_level,
        beta=cfg.beta,
        args=args,
        loss_type=cfg.loss_type,
        epsilon_low=cfg.epsilon_low,
        epsilon_high=cfg.epsilon_high,
        use_vllm="importance_sampling_ratio" in extra,
        vllm_importance_sampling_correction="importance_sampling_ratio" in extra,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=cfg.max_completion_length,
        accelerator=_Accelerator(),
        _entropy_bonus_enabled=cfg.entropy_coef != 0.0,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
    )
    inputs = dict(
        prompt_ids=torch.zeros(B, 1, dtype=torch.long),
        prompt_mask=torch.ones(B, 1, dtype=torch.long),
        completion_ids=batch["targets"],
        completion_mask=batch["mask"],
        advantages=batch["advantages"],
        num_items_in_batch=torch.tensor(num_items),
    )
    if "old_logp" in batch:
        inputs["old_per_token_logps"] = batch["old_logp"]
    if cfg.beta:
        inputs["ref_per_token_logps"] = batch["ref_logp"]
    inputs.update(extra)
    trainer.get_high_entropy_mask = lambda *a: trl_grpo.GRPOTrainer.get_high_entropy_mask(trainer, *a)
    loss = trl_grpo.GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta, delta", [(0.0, None), (0.04, None), (0.04, 1.3)])
def test_reference_loss_equals_trl(level, loss_type, beta, delta):
    cfg = gf.GRPOConfig(
        loss_type=loss_type,
        importance_sampling_level=level,
        beta=beta,
        delta=delta,
        epsilon_high=3.0 if loss_type == "cispo" else 0.28,
        max_completion_length=40,
        temperature=0.9,
    )
    batch = cast(make_batch(seed=11, dtype=torch.float64), torch.float64)
    num_items = float(batch["mask"].sum()) + 5.0
    want, trl_metrics = trl_loss(batch, cfg, num_items)
    want_grads = torch.autograd.grad(want, [batch["hidden"], batch["weight"], batch["bias"]])
    got, metrics = gf.reference.grpo_loss(
        batch["hidden"],
        batch["weight"],
        batch["targets"],
        batch["mask"],
        batch["advantages"],
        batch["old_logp"],
        batch.get("ref_logp"),
        batch["bias"],
        cfg,
        num_items_in_batch=num_items,
    )
    got_grads = torch.autograd.grad(got, [batch["hidden"], batch["weight"], batch["bias"]])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    assert_same_metrics(metrics, trl_metrics)


# grpo_fast's metric names -> TRL's; ratio_not_one and entropy_mask/* are grpo_fast's own.
TRL_NAMES = {
    "entropy": "entropy",
    "kl": "kl",
    "clip_ratio_low": "clip_ratio/low_mean",
    "clip_ratio_high": "clip_ratio/high_mean",
    "clip_ratio_region": "clip_ratio/region_mean",
    "clip_ratio_low_min": "clip_ratio/low_min",
    "clip_ratio_high_max": "clip_ratio/high_max",
    "cispo_clip_ratio": "cispo_clip_ratio",
    "vespo/phi_seq_mean": "vespo/phi_seq_mean",
    "policy_loss": "policy_loss",
}


def assert_same_metrics(metrics: dict, trl_metrics: dict, rel: float = 1e-9) -> None:
    own = {k for k in metrics if k == "ratio_not_one" or k.startswith("entropy_mask/")}
    assert set(metrics) - own <= set(TRL_NAMES)
    for ours, theirs in TRL_NAMES.items():
        if ours in metrics and theirs in trl_metrics:  # TRL logs kl only with beta != 0
            want = trl_metrics[theirs][0]
            got = metrics[ours].item()
            assert got == pytest.approx(want, rel=rel, abs=rel * 1e-3, nan_ok=True), (ours, got, want)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize(
    "option",
    ["entropy_quantile", "off_policy", "entropy_bonus", "is_token", "is_sequence", "token_advantages", "all"],
)
def test_reference_equals_trl_on_every_loss_option(loss_type, option):
    """TRL 1.16's _compute_loss options beyond the loss type: the reference takes each, as TRL does."""
    g = torch.Generator().manual_seed(5)
    batch = cast(make_batch(seed=13, dtype=torch.float64), torch.float64)
    B, T = batch["targets"].shape
    opts, extra, kw = {}, {}, {}
    if option in ("entropy_quantile", "all"):
        opts["top_entropy_quantile"] = 0.3
    if option in ("off_policy", "all"):
        opts["off_policy_mask_threshold"] = 0.05
        sampling = batch["old_logp"] - 0.3 * torch.rand(B, T, generator=g, dtype=torch.float64)
        sampling[0, 3] = float("nan")  # a token the sampler could not score
        extra["sampling_per_token_logps"] = kw["sampling_logp"] = sampling
    if option in ("entropy_bonus", "all"):
        opts["entropy_coef"] = 0.05
    if option in ("is_token", "is_sequence", "all"):
        shape = (B, 1) if option == "is_sequence" else (B, T)
        ratio = torch.exp(0.2 * torch.randn(*shape, generator=g, dtype=torch.float64))
        if shape[1] > 1:
            ratio = torch.where(batch["mask"] != 0, ratio, 1.0)  # TRL: exp(0) at padding
        extra["importance_sampling_ratio"] = kw["importance_sampling_ratio"] = ratio
    if option in ("token_advantages", "all"):
        batch["advantages"] = torch.randn(B, T, generator=g, dtype=torch.float64).float()  # as cast()
    cfg = gf.GRPOConfig(
        loss_type=loss_type, beta=0.04, epsilon_high=3.0 if loss_type == "cispo" else 0.28,
        max_completion_length=40, temperature=0.9, **opts,
    )  # fmt: skip
    num_items = float(batch["mask"].sum()) + 5.0
    want, trl_metrics = trl_loss(batch, cfg, num_items, **extra)
    want_grads = torch.autograd.grad(want, [batch["hidden"], batch["weight"], batch["bias"]])
    got, metrics = gf.reference.grpo_loss(
        batch["hidden"], batch["weight"], batch["targets"], batch["mask"], batch["advantages"],
        batch["old_logp"], batch["ref_logp"], batch["bias"], cfg, num_items_in_batch=num_items, **kw,
    )  # fmt: skip
    got_grads = torch.autograd.grad(got, [batch["hidden"], batch["weight"], batch["bias"]])
    # TRL's VESPO with a vLLM ratio computes phi from its fp32 inputs (advantages, log-ratio): fp32 there.
    tol = dict(rtol=1e-12, atol=1e-14) if want.dtype == torch.float64 else dict(rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(got, want, check_dtype=False, **tol)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=max(tol["rtol"], 1e-10), atol=tol["atol"])
    assert_same_metrics(metrics, trl_metrics, rel=1e-9 if want.dtype == torch.float64 else 2e-6)


def test_reference_advantages_equal_trl_lines():
    """TRL's advantage block, copied from its trainer's logic via its own nanstd, on NaN-laden rewards."""
    from trl.trainer.utils import nanstd

    g = torch.Generator().manual_seed(0)
    G, R = 4, 3
    rewards = torch.randn(6 * G, R, generator=g)
    rewards[torch.rand(6 * G, R, generator=g) < 0.3] = float("nan")
    rewards[5] = float("nan")  # unscorable row
    rewards[8:12] = 1.0  # constant group
    weights = torch.tensor([1.0, 0.5, 2.0])
    for scale in ("group", "batch", "none"):
        summed = (rewards * weights).nansum(1)
        summed[torch.isnan(rewards).all(1)] = float("nan")
        mean = torch.nanmean(summed.view(-1, G), 1).repeat_interleave(G)
        std = (
            nanstd(summed.view(-1, G), dim=1).repeat_interleave(G)
            if scale != "batch"
            else nanstd(summed).expand_as(summed)
        )
        want = summed - mean
        if scale != "none":
            want = want / (std + 1e-4)
        want = torch.nan_to_num(want, nan=0.0)
        got = gf.reference.group_advantages(rewards, G, scale, 1e-4, weights)
        torch.testing.assert_close(got, want)
        assert got[5] == 0 and torch.all(got[8:12] == 0)
