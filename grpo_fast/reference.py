"""Plain PyTorch GRPO: the oracle for tests and the "before" in benchmarks.

It materializes the full ``[tokens, vocab]`` logits in fp32 and follows TRL 1.16's
``GRPOTrainer._compute_loss`` and its advantage code line for line, in TRL's ``[B, T]`` layout.
Packed ``[N, H]`` inputs are padded into that layout first. Inputs are assumed valid: the
public API validates before it gets here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import CLIPPED_LOSS_TYPES, GRPOConfig

__all__ = ["selective_logprobs", "group_advantages", "grpo_loss", "nanstd"]


def selective_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    logit_softcap: float | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """log softmax((hidden @ W^T + b) / T)[target] and optionally the entropy, in fp32; with
    ``logit_softcap``, the logits are ``cap * tanh(logits / cap)`` first (TRL's fused head, Gemma 2)."""
    # The matmul runs in the input dtype, as the model's LM head does; softmax math is fp32.
    logits = F.linear(hidden, weight, bias).float()
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    logits = logits / temperature
    log_probs = logits.log_softmax(-1)
    logp = log_probs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logp, entropy


def nanstd(x: Tensor, dim: int | None = None) -> Tensor:
    """Bessel-corrected std ignoring NaNs; NaN where fewer than two values (trl.trainer.utils.nanstd)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(x), dim=dim, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(variance, float("nan")))
    std = torch.sqrt(variance * correction)
    return std.squeeze(dim) if dim is not None else std.reshape(())


def group_advantages(
    rewards: Tensor,
    group_size: int,
    scale: str = "group",
    eps: float = 1e-4,
    reward_weights: Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """TRL's "sum_then_normalize" advantages: weighted nansum, group mean, group/batch/no std scaling.

    ``compute_dtype``: TRL computes in fp32, which loses the differences between large rewards (1e7 and
    1e7 + 1); the "torch" backend computes in fp64. The result is fp32 either way."""
    rewards_per_func = rewards.to(compute_dtype)
    if rewards_per_func.dim() == 1:
        rewards_per_func = rewards_per_func.unsqueeze(1)
    num_funcs = rewards_per_func.shape[1]
    if reward_weights is None:
        reward_weights = torch.ones(num_funcs, dtype=compute_dtype, device=rewards.device)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    weights = reward_weights.to(device=rewards.device, dtype=compute_dtype)
    summed = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    summed[unscorable] = torch.nan
    mean_grouped = torch.nanmean(summed.view(-1, group_size), dim=1).repeat_interleave(group_size, dim=0)
    if scale in ("group", "none"):
        if group_size > 1:
            std = nanstd(summed.view(-1, group_size), dim=1).repeat_interleave(group_size, dim=0)
        else:
            std = torch.zeros_like(summed)
    else:  # "batch"
        std = nanstd(summed).expand_as(summed) if summed.numel() > 1 else torch.zeros_like(summed)
    advantages = summed - mean_grouped
    if scale != "none":
        advantages = advantages / (std + eps)
    return torch.nan_to_num(advantages, nan=0.0).float()


def pack_positions(seq_ids: Tensor, num_seqs: int) -> tuple[Tensor, int]:
    """Position of each packed token inside its sequence (tokens keep their order) and the longest length."""
    n = seq_ids.numel()
    if n == 0:
        return seq_ids.new_zeros(0), 0
    order = torch.argsort(seq_ids, stable=True)
    counts = torch.bincount(seq_ids, minlength=num_seqs)
    starts = torch.cumsum(counts, 0) - counts
    positions = torch.empty_like(seq_ids)
    positions[order] = torch.arange(n, device=seq_ids.device) - starts[seq_ids[order]]
    return positions, int(counts.max())


def _pad(
    x: Tensor, seq_ids: Tensor, positions: Tensor, num_seqs: int, length: int, fill: float = 0
) -> Tensor:
    out = x.new_full((num_seqs, length, *x.shape[1:]), fill)
    return out.index_put((seq_ids, positions), x)


def grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    mask: Tensor,
    advantages: Tensor,
    old_logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    bias: Tensor | None = None,
    config: GRPOConfig | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
    seq_ids: Tensor | None = None,
    sampling_logp: Tensor | None = None,
    importance_sampling_ratio: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO loss and metrics from materialized fp32 logits; the math is in docs/architecture.md."""
    cfg = config or GRPOConfig()
    if hidden.dim() == 2:  # packed [N, H]: pad into TRL's [B, T] layout
        num_seqs = advantages.shape[0]
        positions, length = pack_positions(seq_ids.long(), num_seqs)
        pad = lambda x: _pad(x, seq_ids.long(), positions, num_seqs, max(length, 1))  # noqa: E731
        hidden, targets, mask = pad(hidden), pad(targets), pad(mask)
        old_logp = pad(old_logp) if old_logp is not None else None
        ref_logp = pad(ref_logp) if ref_logp is not None else None
        sampling_logp = pad(sampling_logp) if sampling_logp is not None else None
        if importance_sampling_ratio is not None and importance_sampling_ratio.shape == seq_ids.shape:
            # padded positions: ratio 1, as TRL's exp(0 * mask) there
            importance_sampling_ratio = _pad(
                importance_sampling_ratio, seq_ids.long(), positions, num_seqs, max(length, 1), fill=1.0
            )

    # Masked positions may hold any id (e.g. -100); they never reach the loss.
    safe_targets = torch.where(mask != 0, targets.long(), torch.zeros_like(targets, dtype=torch.long))
    per_token_logps, entropies = selective_logprobs(
        hidden,
        weight,
        safe_targets,
        bias,
        cfg.temperature,
        return_entropy=True,
        logit_softcap=cfg.logit_softcap,
    )
    return loss_from_logps(
        per_token_logps,
        entropies,
        mask,
        advantages,
        old_logp,
        ref_logp,
        cfg,
        num_items_in_batch,
        sampling_logp=sampling_logp,
        importance_sampling_ratio=importance_sampling_ratio,
    )


def loss_from_logps(
    per_token_logps: Tensor,
    entropies: Tensor,
    mask: Tensor,
    advantages: Tensor,
    old_logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    config: GRPOConfig | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
    sampling_logp: Tensor | None = None,
    importance_sampling_ratio: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO loss and metrics from per-token log-probs and entropies ``[B, T]``: TRL's
    ``_compute_loss`` after its log-prob pass (also the loss of the benchmark's TRL baseline). The loss
    is TRL's before its gradient-accumulation scaling (one process, no accumulation), entropy bonus
    (``entropy_coef``) included; the entropy quantile is this batch's."""
    cfg = config or GRPOConfig()
    mask = mask.float()
    advantages = advantages.float()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    is_ratio = importance_sampling_ratio
    if is_ratio is not None and is_ratio.dim() == 1:  # [B]: one per sequence
        is_ratio = is_ratio.unsqueeze(1)

    if cfg.top_entropy_quantile < 1.0:  # TRL's get_high_entropy_mask, one process
        local = entropies[mask.bool()].float()
        if local.numel() == 0:
            entropy_mask = torch.zeros_like(entropies, dtype=torch.bool)
        else:
            threshold = torch.quantile(local, 1 - cfg.top_entropy_quantile)
            entropy_mask = ((entropies * mask) >= threshold) & mask.bool()
    else:
        entropy_mask = None

    old_per_token_logps = per_token_logps.detach() if old_logp is None else old_logp.float()
    if cfg.off_policy_mask_threshold is not None:  # TRL's get_off_policy_mask
        sampling = old_per_token_logps if sampling_logp is None else sampling_logp
        kl_div = torch.nan_to_num(sampling - per_token_logps.detach(), nan=0.0)
        avg_seq_kl = (kl_div * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        off_policy_mask = ((advantages >= 0) | (avg_seq_kl <= cfg.off_policy_mask_threshold)).to(mask.dtype)

    log_ratio = per_token_logps - old_per_token_logps
    if cfg.importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)

    per_token_kl = None
    if ref_logp is not None:
        ref_per_token_logps = ref_logp.float()
        per_token_kl = (
            torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
        )
        if cfg.use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1

    if cfg.loss_type == "cispo":
        clamped_ratios = torch.clamp(coef_1, max=cfg.epsilon_high).detach()
        per_token_loss = -clamped_ratios * advantages * per_token_logps
    elif cfg.loss_type in CLIPPED_LOSS_TYPES:
        coef_2 = torch.clamp(coef_1, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
        if cfg.delta is not None:
            coef_1 = torch.clamp(coef_1, max=cfg.delta)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    elif cfg.loss_type == "sapo":
        temperatures = torch.where(advantages > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
        soft_coef_1 = torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures
        per_token_loss = -soft_coef_1 * advantages
    else:  # vespo
        phi_seq = _vespo_gamma_weights(advantages, log_ratio, mask, cfg, is_ratio)
        per_token_loss = -phi_seq * advantages * per_token_logps

    if cfg.off_policy_mask_threshold is not None:
        per_token_loss = per_token_loss * off_policy_mask
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if is_ratio is not None and cfg.loss_type != "vespo":
        per_token_loss = per_token_loss * is_ratio

    if cfg.beta != 0.0:
        per_token_loss = per_token_loss + cfg.beta * per_token_kl

    # TRL's reduction of each normalizer (config.LOSS_NORMALIZERS says which loss type has which), written
    # as TRL writes it: an independent check of the engine's reduction weights.
    rule = cfg.normalizer
    if rule == "sequence_mean":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif rule == "batch_tokens":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif rule == "fixed_length":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * cfg.max_completion_length)
    elif rule == "global_tokens":
        items = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch).float()
        loss = (per_token_loss * mask).sum() / items.to(mask.device).clamp(min=1.0)
    else:  # sequence_sum
        loss = (per_token_loss * mask).sum(-1).mean()
    policy_loss = loss.detach()

    if cfg.entropy_coef != 0.0:  # TRL's entropy bonus (no accumulation here)
        effective_mask = mask if entropy_mask is None else mask * entropy_mask
        entropy_loss = (entropies * effective_mask).sum() / effective_mask.sum().clamp(min=1.0)
        loss = loss - cfg.entropy_coef * entropy_loss

    def masked_mean(x: Tensor) -> Tensor:
        if x.shape[1] == 1:  # sequence level: one value per sequence
            return x.sum() / max(x.shape[0], 1)
        return (x * mask).sum() / mask.sum().clamp(min=1.0)

    def masked_seq_mean(x: Tensor) -> Tensor:
        return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

    def nan_extreme(x: Tensor, fn) -> Tensor:  # TRL's nanmin / nanmax
        x = x[~torch.isnan(x)]
        return fn(x) if x.numel() else torch.tensor(float("nan"), device=x.device)

    zero = loss.new_zeros(()).detach()
    metrics = {
        "kl": masked_mean(per_token_kl).detach() if per_token_kl is not None else zero,
        "entropy": masked_mean(entropies).detach(),
        "clip_ratio_low": zero,
        "clip_ratio_high": zero,
        "clip_ratio_region": zero,
        "ratio_not_one": masked_mean((per_token_logps != old_per_token_logps).float()).detach(),
    }
    if cfg.loss_type in CLIPPED_LOSS_TYPES:
        is_low = (coef_1 < 1 - cfg.epsilon_low) & (advantages < 0)
        is_high = (coef_1 > 1 + cfg.epsilon_high) & (advantages > 0)
        metrics["clip_ratio_low"] = masked_mean(is_low.float()).detach()
        metrics["clip_ratio_high"] = masked_mean(is_high.float()).detach()
        metrics["clip_ratio_region"] = masked_mean((is_low | is_high).float()).detach()
        metrics["clip_ratio_low_min"] = nan_extreme(masked_seq_mean(is_low.float()).detach(), torch.min)
        metrics["clip_ratio_high_max"] = nan_extreme(masked_seq_mean(is_high.float()).detach(), torch.max)
    elif cfg.loss_type == "cispo":
        metrics["cispo_clip_ratio"] = masked_mean(
            ((coef_1 > cfg.epsilon_high) & (advantages > 0)).float()
        ).detach()
    elif cfg.loss_type == "vespo":
        metrics["vespo/phi_seq_mean"] = masked_mean(phi_seq).detach()
    if cfg.entropy_coef != 0.0:
        metrics["policy_loss"] = policy_loss
    if cfg.top_entropy_quantile < 1.0:
        kept = mask * entropy_mask
        metrics["entropy_mask/tokens"] = kept.sum().detach()
        metrics["entropy_mask/entropy"] = ((entropies * kept).sum() / kept.sum().clamp(min=1.0)).detach()
    return loss, metrics


@torch.no_grad()
def _vespo_gamma_weights(
    advantages: Tensor, log_ratio: Tensor, mask: Tensor, cfg: GRPOConfig, is_ratio: Tensor | None = None
) -> Tensor:
    """TRL's ``get_gamma_weights``: phi(w) per sequence, [B, 1] ([B, T] with per-token advantages)."""
    lower_clamp = math.log(1e-8)
    seq_log_ratio = torch.sum(torch.clamp(log_ratio, -20.0, 20.0) * mask, dim=-1, keepdim=True)
    if is_ratio is not None:
        seq_log_ratio = seq_log_ratio + torch.sum(
            torch.clamp(torch.log(is_ratio), lower_clamp, 20.0), dim=-1, keepdim=True
        )
    log_w_seq = torch.clamp(seq_log_ratio, lower_clamp, 20.0)
    w_seq = torch.exp(log_w_seq)
    is_nonneg_adv = advantages >= 0
    k_seq = torch.where(is_nonneg_adv, cfg.vespo_k_pos, cfg.vespo_k_neg)
    lambda_seq = torch.where(is_nonneg_adv, cfg.vespo_lambda_pos, cfg.vespo_lambda_neg).clamp(min=1e-4)
    log_phi = lambda_seq + k_seq * log_w_seq - lambda_seq * w_seq
    return torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
