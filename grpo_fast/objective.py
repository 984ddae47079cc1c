"""The GRPO objective on flat per-token vectors: what the chunk loop needs besides the logits.

Everything here is O(tokens), never O(tokens * vocab). The loss is written as
``sum_t w_t * loss_t(logp)``, with reduction weights ``w_t`` fixed by the mask and the loss type,
so that for token-level ratios ``g_t = dLoss/dlogp_t`` depends on token t alone and can be formed
inside the chunk pass (:func:`token_grad`, mirrored by the native and Triton kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import CLIPPED_LOSS_TYPES, GRPOConfig

# Integer codes of the loss families, shared with the native and Triton kernels.
FAMILY_CLIPPED, FAMILY_CISPO, FAMILY_SAPO = 0, 1, 2


def loss_family(cfg: GRPOConfig) -> int:
    if cfg.loss_type == "cispo":
        return FAMILY_CISPO
    if cfg.loss_type == "sapo":
        return FAMILY_SAPO
    return FAMILY_CLIPPED


@dataclass(frozen=True)
class TokenBatch:
    """The unmasked tokens of a batch, flattened, with what each token needs from its sequence."""

    seq_ids: Tensor  # [n] int64, sequence of each token
    mask: Tensor  # [n] fp32, the (non-zero) mask value of each token
    adv: Tensor  # [n] fp32, advantage of the token's sequence
    old_logp: Tensor | None  # [n] fp32; None means "on-policy": old = logp.detach()
    ref_logp: Tensor | None  # [n] fp32
    seq_adv: Tensor  # [B] fp32
    seq_len: Tensor  # [B] fp32, sum of the mask per sequence
    loss_w: Tensor  # [n] fp32, reduction weight: loss = sum(loss_w * per_token_loss)

    @property
    def num_seqs(self) -> int:
        return self.seq_adv.shape[0]


def reduction_weights(
    mask: Tensor, seq_ids: Tensor, seq_len: Tensor, cfg: GRPOConfig, num_items_in_batch: Tensor | None
) -> Tensor:
    """w_t such that TRL's reduction of the masked per-token loss equals sum_t w_t * loss_t."""
    num_seqs = max(seq_len.shape[0], 1)
    if cfg.loss_type in ("grpo", "sapo"):
        return mask / seq_len.clamp(min=1.0)[seq_ids] / num_seqs
    if cfg.loss_type == "bnpo":
        return mask / mask.sum().clamp(min=1.0)
    if cfg.loss_type == "dr_grpo":
        return mask / float(seq_len.shape[0] * cfg.max_completion_length)
    if cfg.loss_type in ("cispo", "dapo"):
        items = mask.sum() if num_items_in_batch is None else num_items_in_batch.to(mask)
        return mask / items.clamp(min=1.0)
    return mask / num_seqs  # luspo


def segment_sum(x: Tensor, seq_ids: Tensor, num_seqs: int) -> Tensor:
    return x.new_zeros(num_seqs).index_add_(0, seq_ids, x)


def sequence_log_ratio(logp: Tensor, batch: TokenBatch) -> Tensor:
    """GSPO's per-sequence mean log-ratio, [B]."""
    old = logp.detach() if batch.old_logp is None else batch.old_logp
    summed = segment_sum((logp - old) * batch.mask, batch.seq_ids, batch.num_seqs)
    return summed / batch.seq_len.clamp(min=1.0)


def per_token_objective(
    logp: Tensor, batch: TokenBatch, cfg: GRPOConfig
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Per-token loss (KL included), per-token KL and the clip-metric ratio; differentiable in logp.

    The ratio returned is per token for token level and per sequence ([B]) for sequence level.
    """
    old = logp.detach() if batch.old_logp is None else batch.old_logp
    if cfg.importance_sampling_level == "token":
        coef_1 = torch.exp(logp - old)
        seq_coef = coef_1
    else:
        seq_coef = torch.exp(sequence_log_ratio(logp, batch))
        coef_1 = seq_coef[batch.seq_ids]
    adv = batch.adv
    kl = None
    if batch.ref_logp is not None:
        diff = batch.ref_logp - logp
        kl = torch.exp(diff) - diff - 1
        if cfg.use_bias_correction_kl:
            kl = kl * coef_1
    metric_coef = seq_coef
    if cfg.loss_type == "cispo":
        loss = -torch.clamp(coef_1, max=cfg.eps_high).detach() * adv * logp
    elif cfg.loss_type in CLIPPED_LOSS_TYPES:
        coef_2 = torch.clamp(coef_1, 1 - cfg.epsilon_low, 1 + cfg.eps_high)
        if cfg.delta is not None:
            coef_1 = torch.clamp(coef_1, max=cfg.delta)
            metric_coef = torch.clamp(seq_coef, max=cfg.delta)
        loss = -torch.min(coef_1 * adv, coef_2 * adv)
    else:  # sapo
        tau = torch.where(adv > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
        loss = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * adv
    if cfg.beta != 0.0:
        loss = loss + cfg.beta * kl
    return loss, kl, metric_coef


def token_grad(
    logp: Tensor, old_logp: Tensor | None, ref_logp: Tensor | None, adv: Tensor, w: Tensor, cfg: GRPOConfig
) -> Tensor:
    """Analytic g_t = w_t * d loss_t / d logp_t for token-level ratios (matches autograd, ties included)."""
    ratio = torch.ones_like(logp) if old_logp is None else torch.exp(logp - old_logp)
    if cfg.loss_type == "cispo":
        d = -torch.clamp(ratio, max=cfg.eps_high) * adv
    elif cfg.loss_type in CLIPPED_LOSS_TYPES:
        lo, hi = 1 - cfg.epsilon_low, 1 + cfg.eps_high
        coef_1 = ratio if cfg.delta is None else torch.clamp(ratio, max=cfg.delta)
        coef_2 = torch.clamp(ratio, lo, hi)
        a, b = coef_1 * adv, coef_2 * adv
        # torch.min's backward splits the gradient evenly on ties; clamp passes it on closed bounds.
        ga = (a < b).float() + 0.5 * (a == b).float()
        gb = (a > b).float() + 0.5 * (a == b).float()
        dc1 = ratio if cfg.delta is None else ratio * (ratio <= cfg.delta).float()
        dc2 = ratio * ((ratio >= lo) & (ratio <= hi)).float()
        d = -(ga * dc1 + gb * dc2) * adv
    else:  # sapo
        tau = torch.where(adv > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
        s = torch.sigmoid(tau * (ratio - 1))
        d = -adv * 4 * s * (1 - s) * ratio
    if cfg.beta != 0.0:
        diff = ref_logp - logp
        e = torch.exp(diff)
        dkl = 1 - e
        if cfg.use_bias_correction_kl:
            dkl = (dkl + (e - diff - 1)) * ratio
        d = d + cfg.beta * dkl
    return w * d


def sequence_grad(logp: Tensor, batch: TokenBatch, cfg: GRPOConfig) -> Tensor:
    """g for sequence-level ratios, where every token of a sequence moves its ratio: autograd on [n]."""
    with torch.enable_grad():
        lp = logp.detach().requires_grad_(True)
        loss, _, _ = per_token_objective(lp, batch, cfg)
        (g,) = torch.autograd.grad((batch.loss_w * loss).sum(), lp)
    return g


def loss_and_metrics(
    logp: Tensor, entropy: Tensor, batch: TokenBatch, cfg: GRPOConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss value and TRL's metrics from the per-token log-probs and entropies (no grad)."""
    with torch.no_grad():
        loss_t, kl, coef = per_token_objective(logp, batch, cfg)
        loss = (batch.loss_w * loss_t).sum()
        mask = batch.mask
        denom = mask.sum().clamp(min=1.0)
        token_mean = lambda x: (x * mask).sum() / denom  # noqa: E731
        zero = loss.new_zeros(())
        metrics = {
            "kl": token_mean(kl) if kl is not None else zero,
            "entropy": token_mean(entropy),
            "clip_ratio_low": zero,
            "clip_ratio_high": zero,
            "clip_ratio_region": zero,
        }
        sequence_level = cfg.importance_sampling_level == "sequence"
        adv = batch.seq_adv if sequence_level else batch.adv
        # Sequence-level ratios are one value per sequence: TRL averages them over sequences.
        mean = (lambda x: x.sum() / max(batch.num_seqs, 1)) if sequence_level else token_mean
        if cfg.loss_type in CLIPPED_LOSS_TYPES:
            low = (coef < 1 - cfg.epsilon_low) & (adv < 0)
            high = (coef > 1 + cfg.eps_high) & (adv > 0)
            metrics["clip_ratio_low"] = mean(low.float())
            metrics["clip_ratio_high"] = mean(high.float())
            metrics["clip_ratio_region"] = mean((low | high).float())
        elif cfg.loss_type == "cispo":
            metrics["cispo_clip_ratio"] = mean(((coef > cfg.eps_high) & (adv > 0)).float())
    return loss, metrics
