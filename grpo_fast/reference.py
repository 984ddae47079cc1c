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
) -> Tensor | tuple[Tensor, Tensor]:
    """log softmax((hidden @ W^T + b) / T)[target] and optionally the entropy, in fp32."""
    # The matmul runs in the input dtype, as the model's LM head does; softmax math is fp32.
    logits = F.linear(hidden, weight, bias).float() / temperature
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
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO loss and metrics from materialized fp32 logits; see DESIGN.md for the math."""
    cfg = config or GRPOConfig()
    if hidden.dim() == 2:  # packed [N, H]: pad into TRL's [B, T] layout
        num_seqs = advantages.shape[0]
        positions, length = pack_positions(seq_ids.long(), num_seqs)
        pad = lambda x: _pad(x, seq_ids.long(), positions, num_seqs, max(length, 1))  # noqa: E731
        hidden, targets, mask = pad(hidden), pad(targets), pad(mask)
        old_logp = pad(old_logp) if old_logp is not None else None
        ref_logp = pad(ref_logp) if ref_logp is not None else None

    # Masked positions may hold any id (e.g. -100); they never reach the loss.
    safe_targets = torch.where(mask != 0, targets.long(), torch.zeros_like(targets, dtype=torch.long))
    per_token_logps, entropies = selective_logprobs(
        hidden, weight, safe_targets, bias, cfg.temperature, return_entropy=True
    )
    return loss_from_logps(
        per_token_logps, entropies, mask, advantages, old_logp, ref_logp, cfg, num_items_in_batch
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
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO loss and metrics from per-token log-probs and entropies ``[B, T]``: TRL's
    ``_compute_loss`` after its log-prob pass (also the loss of the benchmark's TRL baseline)."""
    cfg = config or GRPOConfig()
    mask = mask.float()
    advantages = advantages.float().reshape(-1, 1)

    old_per_token_logps = per_token_logps.detach() if old_logp is None else old_logp.float()
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
        phi_seq = _vespo_gamma_weights(advantages, log_ratio, mask, cfg)
        per_token_loss = -phi_seq * advantages * per_token_logps

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

    def masked_mean(x: Tensor) -> Tensor:
        if x.shape[1] == 1:  # sequence level: one value per sequence
            return x.sum() / max(x.shape[0], 1)
        return (x * mask).sum() / mask.sum().clamp(min=1.0)

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
    elif cfg.loss_type == "cispo":
        metrics["cispo_clip_ratio"] = masked_mean(
            ((coef_1 > cfg.epsilon_high) & (advantages > 0)).float()
        ).detach()
    elif cfg.loss_type == "vespo":
        metrics["vespo/phi_seq_mean"] = masked_mean(phi_seq).detach()
    return loss, metrics


@torch.no_grad()
def _vespo_gamma_weights(advantages: Tensor, log_ratio: Tensor, mask: Tensor, cfg: GRPOConfig) -> Tensor:
    """TRL's ``get_gamma_weights`` (no vLLM importance-sampling ratio): phi(w) per sequence, [B, 1]."""
    lower_clamp = math.log(1e-8)
    seq_log_ratio = torch.sum(torch.clamp(log_ratio, -20.0, 20.0) * mask, dim=-1, keepdim=True)
    log_w_seq = torch.clamp(seq_log_ratio, lower_clamp, 20.0)
    w_seq = torch.exp(log_w_seq)
    is_nonneg_adv = advantages >= 0
    k_seq = torch.where(is_nonneg_adv, cfg.vespo_k_pos, cfg.vespo_k_neg)
    lambda_seq = torch.where(is_nonneg_adv, cfg.vespo_lambda_pos, cfg.vespo_lambda_neg).clamp(min=1e-4)
    log_phi = lambda_seq + k_seq * log_w_seq - lambda_seq * w_seq
    return torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
