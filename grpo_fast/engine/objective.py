"""The GRPO objective on flat per-token vectors: the one place where the per-token math lives.

Everything here is O(tokens), never O(tokens * vocab), and backend-independent. The loss is the
loss type's reduction (:func:`reduce_loss`, TRL's expressions) of per-token terms ``loss_t(logp, H)``,
linear in them, with denominators fixed by the whole batch. The chunk loop needs from it only the
per-row coefficients
``g_t = dLoss/dlogp_t`` and ``e_t = dLoss/dH_t`` (:func:`coefficients`), which autograd takes from
:func:`per_token_objective` on ``[C]``/``[N]`` vectors: there is no hand-written derivative to keep in
step with the loss, in Python or in a kernel.

A new loss type goes in :func:`per_token_objective` (its per-token loss), :func:`loss_and_metrics` /
:func:`metric_names` (its metrics) and :data:`grpo_fast.config.LOSS_NORMALIZERS` (its reduction); when its
per-token loss of one token depends on other tokens' log-probs, in :func:`needs_whole_sequences` too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..config import CLIPPED_LOSS_TYPES, GRPOConfig
from .sequence_group import SequenceGroup

_TOKEN_LOCAL_FIELDS = (
    "seq_ids", "mask", "adv", "old_logp", "ref_logp", "sampling_logp", "is_ratio", "ent_mask"
)  # fmt: skip


@dataclass(frozen=True)
class TokenBatch:
    """The unmasked tokens of a batch, flattened, with what each token needs from its sequence."""

    seq_ids: Tensor  # [n] int64, sequence of each token
    mask: Tensor  # [n] fp32, the (non-zero) mask value of each token
    adv: Tensor  # [n] fp32, advantage of the token's sequence
    old_logp: Tensor | None  # [n] fp32; None means "on-policy": old = logp.detach()
    ref_logp: Tensor | None  # [n] fp32
    seq_adv: Tensor  # [B] fp32 (per-token advantages: unused)
    seq_len: Tensor  # [B] fp32, sum of the mask per sequence
    items: Tensor  # 0-dim fp32: num_items_in_batch, or the batch's own token count (the mask's sum)
    token_adv: bool = False  # advantages were given per token ([B, T]): TRL's (B, T) branches
    sampling_logp: Tensor | None = None  # [n] the sampler's (vLLM's) log-probs: off-policy mask
    is_ratio: Tensor | None = None  # [n] vLLM importance-sampling ratio (a sequence's value on its tokens)
    ent_mask: Tensor | None = None  # [n] 1/0: in the top_entropy_quantile (set after the entropy pass)
    ent_count: Tensor | None = None  # 0-dim: tokens the entropy bonus averages over (default: all)
    # The ranks holding the other tokens of these sequences (sequence parallelism; None: all are here).
    # Then seq_len and items count the whole sequences' tokens, and the loss is this rank's share.
    group: SequenceGroup | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_adv.shape[0]

    def rows(self, start: int, end: int) -> TokenBatch:
        """Tokens [start, end) (per-sequence fields kept whole): valid only where the objective is
        token-local, i.e. not :func:`needs_whole_sequences`."""
        return replace(
            self, **{k: v[start:end] for k in _TOKEN_LOCAL_FIELDS if (v := getattr(self, k)) is not None}
        )

    def select(self, index: Tensor) -> TokenBatch:
        """Tokens ``index`` (per-sequence fields kept whole), with the same validity as :meth:`rows`."""
        present = {k: v for k in _TOKEN_LOCAL_FIELDS if (v := getattr(self, k)) is not None}
        return replace(self, **{k: v.index_select(0, index) for k, v in present.items()})


def needs_whole_sequences(cfg: GRPOConfig) -> bool:
    """True when a token's loss depends on the log-probs (or entropies) of other tokens: of its sequence
    (GSPO, VESPO, the off-policy mask's mean KL), or of the batch (the entropy quantile).

    Then every log-prob must be known before any ``g`` (two passes over the head); otherwise ``g`` of a
    chunk of tokens comes from that chunk alone (one pass).
    """
    return (
        cfg.importance_sampling_level == "sequence"
        or cfg.loss_type == "vespo"
        or cfg.off_policy_mask_threshold is not None
        or cfg.top_entropy_quantile < 1.0
    )


def zero_advantage_blocker(cfg: GRPOConfig) -> str | None:
    """Why a completion whose advantages are all 0 may still have a gradient under ``cfg``, or None when it
    has none (then a trainer may leave it out of the policy's forward and backward altogether)."""
    if cfg.beta != 0.0:
        return "beta > 0: the KL term has a gradient at advantage 0"
    if cfg.entropy_coef != 0.0:
        return "an entropy bonus: it has a gradient at advantage 0"
    if cfg.top_entropy_quantile < 1.0:
        return "top_entropy_quantile < 1: the entropy quantile ranks every token, a skipped one's too"
    return None


def zero_gradient_rows(batch: TokenBatch, cfg: GRPOConfig) -> Tensor | None:
    """[n] bool: the tokens whose ``g`` and ``e`` are exactly 0 whatever their log-prob and entropy, known
    before any pass over the head; None when the config leaves none that way.

    Every loss type's policy term is its advantage times factors that are finite (ratios are capped, VESPO's
    phi is cleaned of NaN, the masks are 0/1), so a zero advantage zeroes it and its derivative; the KL
    term (beta) and the entropy bonus do not vanish with the advantage. Sequence-level ratios couple the
    tokens of a sequence: there a token needs its whole sequence at advantage 0 (per-token advantages;
    masked tokens, weighing 0 in the loss, do not count, so the rule gives the same rows before and after
    they are dropped). With a sequence group the rest of a sequence is on other ranks: no row is known
    zero there without a collective, so none is.
    """
    if cfg.beta != 0.0 or cfg.entropy_coef != 0.0:
        return None
    zero = batch.adv == 0
    if batch.token_adv and cfg.importance_sampling_level == "sequence":
        if batch.group is not None:
            return None
        live = segment_sum((~zero & (batch.mask != 0)).float(), batch.seq_ids, batch.num_seqs)
        zero = live[batch.seq_ids] == 0
    return zero


def with_entropy_mask(
    entropy: Tensor, batch: TokenBatch, cfg: GRPOConfig, gather: Callable[[Tensor], Tensor] | None = None
) -> TokenBatch:
    """``batch`` with TRL's ``get_high_entropy_mask``: the tokens whose entropy is at least the
    ``1 - top_entropy_quantile`` quantile of every unmasked token's (of every process, through ``gather``:
    the local entropies in, everyone's out). A no-op at ``top_entropy_quantile == 1``."""
    if cfg.top_entropy_quantile >= 1.0:
        return batch
    local = entropy.detach().float()
    pool = gather(local) if gather is not None else local
    if pool.numel() == 0:
        ent_mask = torch.zeros_like(local)
    else:
        threshold = torch.quantile(pool.to(local.device), 1.0 - cfg.top_entropy_quantile)
        ent_mask = (local >= threshold).float()
    return replace(batch, ent_mask=ent_mask, ent_count=(batch.mask * ent_mask).sum())


def entropy_bonus(entropy: Tensor, batch: TokenBatch, cfg: GRPOConfig) -> Tensor | None:
    """``-entropy_coef * mean H`` over the tokens the policy term trains on (TRL's entropy bonus: the mean
    over mask * entropy mask, whatever the loss type's normalizer); None without a bonus. On a chunk's
    rows this is the chunk's share (the denominator is the whole batch's)."""
    if cfg.entropy_coef == 0.0:
        return None
    weight = batch.mask if batch.ent_mask is None else batch.mask * batch.ent_mask
    count = batch.seq_len.sum() if batch.ent_count is None else batch.ent_count
    return -cfg.entropy_coef * (entropy * weight).sum() / count.clamp(min=1.0)


def segment_sum(x: Tensor, seq_ids: Tensor, num_seqs: int) -> Tensor:
    return x.new_zeros(num_seqs).index_add_(0, seq_ids, x)


def reduce_loss(loss_t: Tensor, batch: TokenBatch, cfg: GRPOConfig) -> Tensor:
    """The loss type's reduction (``cfg.normalizer``) of the per-token loss, as TRL 1.16 writes it.

    The denominators come from the whole batch (``seq_len``, ``items``, the number of sequences), so on a
    chunk's :meth:`TokenBatch.rows` this is that chunk's share of the loss, and its gradient there is the
    whole loss's: the coefficients of a chunk need that chunk alone.
    """
    masked = loss_t * batch.mask
    num_seqs = max(batch.num_seqs, 1)
    rule = cfg.normalizer
    if rule == "sequence_mean":
        per_seq = segment_sum(masked, batch.seq_ids, batch.num_seqs) / batch.seq_len.clamp(min=1.0)
        return per_seq.sum() / num_seqs
    if rule == "batch_tokens":
        return masked.sum() / batch.seq_len.sum().clamp(min=1.0)
    if rule == "fixed_length":
        return masked.sum() / float(batch.num_seqs * cfg.max_completion_length)
    if rule == "global_tokens":
        return masked.sum() / batch.items.clamp(min=1.0)
    if rule == "sequence_sum":
        return segment_sum(masked, batch.seq_ids, batch.num_seqs).sum() / num_seqs
    raise AssertionError(f"no reduction for normalizer {rule!r}")


def _old(logp: Tensor, batch: TokenBatch) -> Tensor:
    return logp.detach() if batch.old_logp is None else batch.old_logp


def _log_ratio_sums(logp: Tensor, batch: TokenBatch) -> Tensor:
    return segment_sum((logp - _old(logp, batch)) * batch.mask, batch.seq_ids, batch.num_seqs)


def _vespo_log_w_sums(logp: Tensor, batch: TokenBatch) -> Tensor:
    log_ratio = torch.clamp(logp - _old(logp, batch), -20.0, 20.0)
    log_w = segment_sum(log_ratio * batch.mask, batch.seq_ids, batch.num_seqs)
    if batch.is_ratio is not None:
        log_is = torch.clamp(torch.log(batch.is_ratio), math.log(1e-8), 20.0)
        log_w = log_w + segment_sum(log_is, batch.seq_ids, batch.num_seqs)
    return log_w


def _sampler_kl_sums(logp: Tensor, batch: TokenBatch) -> Tensor:
    sampling = batch.sampling_logp if batch.sampling_logp is not None else _old(logp, batch)
    kl = torch.nan_to_num(sampling - logp.detach(), nan=0.0)
    return segment_sum(kl * batch.mask, batch.seq_ids, batch.num_seqs)


# The per-sequence sums of per-token terms that couple a sequence's tokens, [B] each: in a sequence group,
# the sums over every rank's tokens (:func:`with_group_totals`).
_SEQUENCE_SUMS = {
    "log_ratio": _log_ratio_sums,
    "vespo_log_w": _vespo_log_w_sums,
    "sampler_kl": _sampler_kl_sums,
}


def _sequence_sum_keys(cfg: GRPOConfig) -> tuple[str, ...]:
    keys = ("log_ratio",) if cfg.importance_sampling_level == "sequence" else ()
    keys += ("vespo_log_w",) if cfg.loss_type == "vespo" else ()
    return keys + (("sampler_kl",) if cfg.off_policy_mask_threshold is not None else ())


def _sequence_sum(key: str, logp: Tensor, batch: TokenBatch) -> Tensor:
    local = _SEQUENCE_SUMS[key](logp, batch)
    return local if batch.group is None else batch.group.total(key, local)


def with_group_totals(logp: Tensor, batch: TokenBatch, cfg: GRPOConfig) -> TokenBatch:
    """In a sequence group, ``batch`` with the per-sequence sums its objective couples tokens through (and
    the entropy bonus's token count) summed over the group's ranks: one all-reduce, between the log-prob
    pass and the coefficients. ``batch`` itself without a group."""
    if batch.group is None:
        return batch
    keys = _sequence_sum_keys(cfg)
    with torch.no_grad():
        parts = [_SEQUENCE_SUMS[k](logp, batch) for k in keys]
        if batch.ent_count is not None:
            parts.append(batch.ent_count.reshape(1))
        if not parts:
            return batch
        flat = batch.group.all_reduce_(torch.cat(parts))
    totals = flat[: len(keys) * batch.num_seqs].view(len(keys), batch.num_seqs)
    ent_count = flat[-1] if batch.ent_count is not None else None
    return replace(batch, group=batch.group.with_totals(keys, totals), ent_count=ent_count)


def sequence_log_ratio(logp: Tensor, batch: TokenBatch) -> Tensor:
    """GSPO's per-sequence mean log-ratio, [B]."""
    return _sequence_sum("log_ratio", logp, batch) / batch.seq_len.clamp(min=1.0)


def vespo_weights(logp: Tensor, batch: TokenBatch, cfg: GRPOConfig) -> Tensor:
    """VESPO's gamma weight phi(w) = exp(lambda + k log w - lambda w), no grad: of each sequence [B], or
    of each token [n] with per-token advantages (k and lambda follow the token's advantage, as in TRL).

    w is the sequence's importance ratio from the summed per-token log-ratios (each clamped to [-20, 20];
    log w clamped to [log 1e-8, 20]), times the vLLM importance-sampling ratios of its tokens (each log
    clamped to [log 1e-8, 20]); k and lambda by the sign of the advantage (>= 0: the "pos" pair).
    """
    with torch.no_grad():
        log_w = torch.clamp(_sequence_sum("vespo_log_w", logp, batch), math.log(1e-8), 20.0)
        if batch.token_adv:
            log_w = log_w[batch.seq_ids]
        nonneg = (batch.adv if batch.token_adv else batch.seq_adv) >= 0
        k = torch.where(nonneg, cfg.vespo_k_pos, cfg.vespo_k_neg)
        lam = torch.where(nonneg, cfg.vespo_lambda_pos, cfg.vespo_lambda_neg).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


# Largest log-ratio exponentiated: exp(80) ~ 5.5e34 leaves room for |advantage| * ratio in fp32. Beyond
# it the ratio is held (gradient 0 through it) where TRL's exp overflows to inf and its gradients turn NaN
# (0 * inf) for clipped, sapo and delta tokens whose true gradient is 0.
MAX_LOG_RATIO = 80.0


def _ratio(log_ratio: Tensor) -> Tensor:
    return torch.exp(torch.clamp(log_ratio, max=MAX_LOG_RATIO))


def per_token_objective(
    logp: Tensor, entropy: Tensor | None, batch: TokenBatch, cfg: GRPOConfig
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Per-token loss (KL included), per-token KL and the metric coefficient; differentiable in logp.

    ``entropy`` is the tokens' entropy H, for terms that depend on it (none of TRL 1.16's loss types yet;
    :func:`coefficients` then returns ``e = dLoss/dH`` for the entropy-gradient term of the kernels).
    The metric coefficient is the clip-metric ratio (per token, or per sequence [B] for sequence level),
    VESPO's phi per sequence [B].
    """
    old = _old(logp, batch)
    if cfg.importance_sampling_level == "token":
        coef_1 = _ratio(logp - old)
        seq_coef = coef_1
    else:
        seq_coef = _ratio(sequence_log_ratio(logp, batch))
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
        loss = -torch.clamp(coef_1, max=cfg.epsilon_high).detach() * adv * logp
    elif cfg.loss_type in CLIPPED_LOSS_TYPES:
        coef_2 = torch.clamp(coef_1, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
        if cfg.delta is not None:
            coef_1 = torch.clamp(coef_1, max=cfg.delta)
            metric_coef = torch.clamp(seq_coef, max=cfg.delta)
        loss = -torch.min(coef_1 * adv, coef_2 * adv)
    elif cfg.loss_type == "sapo":
        tau = torch.where(adv > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
        loss = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * adv
    elif cfg.loss_type == "vespo":
        phi = vespo_weights(logp, batch, cfg)
        loss = -(phi if batch.token_adv else phi[batch.seq_ids]) * adv * logp
        metric_coef = phi
    else:
        raise AssertionError(f"no per-token loss for loss_type {cfg.loss_type!r}")
    # TRL's order: the policy term times the off-policy mask, the entropy mask and the vLLM IS ratio
    # (VESPO has that inside phi), then the KL term, which none of them touch.
    if cfg.off_policy_mask_threshold is not None:
        loss = loss * off_policy_mask(logp, batch, cfg.off_policy_mask_threshold)
    if batch.ent_mask is not None:
        loss = loss * batch.ent_mask
    if batch.is_ratio is not None and cfg.loss_type != "vespo":
        loss = loss * batch.is_ratio
    if cfg.beta != 0.0:
        loss = loss + cfg.beta * kl
    return loss, kl, metric_coef


def off_policy_mask(logp: Tensor, batch: TokenBatch, threshold: float) -> Tensor:
    """TRL's off-policy sequence mask (DeepSeek-V3.2), [n] 1/0 per token, no grad: keep a token when its
    advantage is >= 0 or its sequence's mean KL(sampling || current) = mean(sampling - logp) is at most
    ``threshold``. The sampler's log-probs default to the old ones (then to logp: KL 0); a NaN sampler
    log-prob (vLLM could not score it) adds 0."""
    with torch.no_grad():
        seq_kl = _sequence_sum("sampler_kl", logp, batch) / batch.seq_len.clamp(min=1.0)
        return ((batch.adv >= 0) | (seq_kl[batch.seq_ids] <= threshold)).float()


def coefficients(
    logp: Tensor, entropy: Tensor, batch: TokenBatch, cfg: GRPOConfig
) -> tuple[Tensor, Tensor | None]:
    """``g = dLoss/dlogp`` and ``e = dLoss/dH`` (None when the loss does not use H), fp32 [n] each.

    Autograd on the [n] vectors of :func:`per_token_objective` (ties and clamp bounds as TRL's autograd has
    them). ``batch`` may be a chunk's :meth:`TokenBatch.rows` unless :func:`needs_whole_sequences`.
    """
    with torch.enable_grad():
        lp = logp.detach().float().requires_grad_(True)
        ent = entropy.detach().float().requires_grad_(True)
        loss_t, _, _ = per_token_objective(lp, ent, batch, cfg)
        total = reduce_loss(loss_t, batch, cfg)
        bonus = entropy_bonus(ent, batch, cfg)
        if bonus is not None:
            total = total + bonus
        g, e = torch.autograd.grad(total, (lp, ent), allow_unused=True)
    return (g if g is not None else torch.zeros_like(lp)), e


def metric_names(cfg: GRPOConfig) -> list[str]:
    """The metrics of :func:`loss_and_metrics`, in order."""
    names = ["kl", "entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "ratio_not_one"]
    if cfg.loss_type in CLIPPED_LOSS_TYPES:
        # This batch's extremes of the per-sequence clipped fractions (NaN without any): across batches
        # and processes, the min of the mins and the max of the maxes are TRL's low_min and high_max.
        names += ["clip_ratio_low_min", "clip_ratio_high_max"]
    if cfg.loss_type == "cispo":
        names.append("cispo_clip_ratio")
    if cfg.loss_type == "vespo":
        names.append("vespo/phi_seq_mean")
    if cfg.entropy_coef != 0.0:
        names.append("policy_loss")  # the loss without the entropy bonus
    if cfg.top_entropy_quantile < 1.0:
        # The tokens the entropy mask keeps and their mean entropy (adaptive entropy control's input).
        names += ["entropy_mask/tokens", "entropy_mask/entropy"]
    return names


def averaged_over_sequences(name: str, cfg: GRPOConfig) -> bool:
    """Whether metric ``name`` is a mean over sequences (else over unmasked tokens): how trainers weight it
    when they combine micro-batches and processes."""
    if name in ("kl", "entropy", "ratio_not_one", "policy_loss") or name.startswith("entropy_mask/"):
        return False
    if name == "vespo/phi_seq_mean":
        return True
    return cfg.importance_sampling_level == "sequence"


def loss_and_metrics(
    logp: Tensor, entropy: Tensor, batch: TokenBatch, cfg: GRPOConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss value and TRL's metrics from the per-token log-probs and entropies (no grad).

    In a sequence group the loss is this rank's share (the group's losses add up to the loss of the whole
    sequences) and the metrics are the whole sequences' values, the same on every rank of the group."""
    with torch.no_grad():
        loss_t, kl, coef = per_token_objective(logp, entropy, batch, cfg)
        policy = reduce_loss(loss_t, batch, cfg)
        bonus = entropy_bonus(entropy, batch, cfg)
        loss = policy if bonus is None else policy + bonus
        mask, group = batch.mask, batch.group
        # In a group, token means are this rank's share of the group's (summed at the end).
        denom = (mask.sum() if group is None else batch.seq_len.sum()).clamp(min=1.0)
        token_mean = lambda x: (x * mask).sum() / denom  # noqa: E731
        seq_mean = lambda x: x.sum() / max(batch.num_seqs, 1)  # noqa: E731
        zero = loss.new_zeros(())
        metrics = {
            "kl": token_mean(kl) if kl is not None else zero,
            "entropy": token_mean(entropy),
            "clip_ratio_low": zero,
            "clip_ratio_high": zero,
            "clip_ratio_region": zero,
            # Tokens whose log-prob differs from the given old one at all: on an on-policy step, the noise
            # of computing the same log-prob in two batches (0 with batch_invariant=True).
            "ratio_not_one": token_mean((logp != batch.old_logp).float())
            if batch.old_logp is not None
            else zero,
        }
        # TRL's shapes: sequence-level ratios are [B, 1], one value per sequence, averaged over sequences;
        # with per-token advantages the flags broadcast to [B, T] and are averaged over tokens.
        per_seq = cfg.importance_sampling_level == "sequence" and not batch.token_adv
        if cfg.importance_sampling_level == "sequence" and batch.token_adv and cfg.loss_type != "vespo":
            coef = coef[batch.seq_ids]  # the sequence ratio on each token (VESPO: phi is per token already)
        adv = batch.seq_adv if per_seq else batch.adv
        mean = seq_mean if per_seq else token_mean
        # Means over sequences of per-sequence values: the same on every rank of a group, not summed.
        group_wide = {"vespo/phi_seq_mean"} if not batch.token_adv else set()
        if per_seq:
            group_wide |= {"clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "cispo_clip_ratio"}
        seq_clips: list[Tensor] = []  # per-sequence sums of the token clip flags, [B] each
        if cfg.loss_type in CLIPPED_LOSS_TYPES:
            low = ((coef < 1 - cfg.epsilon_low) & (adv < 0)).float()
            high = ((coef > 1 + cfg.epsilon_high) & (adv > 0)).float()
            metrics["clip_ratio_low"] = mean(low)
            metrics["clip_ratio_high"] = mean(high)
            metrics["clip_ratio_region"] = mean(torch.maximum(low, high))
            if not per_seq:
                seq_clips = [segment_sum(x * mask, batch.seq_ids, batch.num_seqs) for x in (low, high)]
            else:
                seq_clips = [low, high]
        elif cfg.loss_type == "cispo":
            metrics["cispo_clip_ratio"] = mean(((coef > cfg.epsilon_high) & (adv > 0)).float())
        elif cfg.loss_type == "vespo":  # phi: one value per sequence, or per token (per-token advantages)
            metrics["vespo/phi_seq_mean"] = token_mean(coef) if batch.token_adv else seq_mean(coef)
        if cfg.entropy_coef != 0.0:
            metrics["policy_loss"] = policy
        if cfg.top_entropy_quantile < 1.0:
            kept = mask * batch.ent_mask
            metrics["entropy_mask/tokens"] = kept.sum()
            kept_count = kept.sum() if group is None else batch.ent_count  # the group's count
            metrics["entropy_mask/entropy"] = (entropy * kept).sum() / kept_count.clamp(min=1.0)
        if group is not None:  # one all-reduce: the shares, and the token-level clip sums of each sequence
            metrics, summed = group.sum_metrics(metrics, group_wide, [] if per_seq else seq_clips)
            seq_clips = seq_clips if per_seq else summed
        if seq_clips:
            low, high = seq_clips
            if not per_seq:  # TRL's masked_seq_mean: NaN for a sequence without tokens
                low, high = low / batch.seq_len, high / batch.seq_len
            metrics["clip_ratio_low_min"] = _nan_extreme(low, torch.amin)
            metrics["clip_ratio_high_max"] = _nan_extreme(high, torch.amax)
    return loss, metrics


def _nan_extreme(x: Tensor, extreme: Callable[..., Tensor]) -> Tensor:
    """min or max over the non-NaN values of ``x``; NaN when there are none (TRL's nanmin / nanmax).
    No boolean indexing: no host synchronization on CUDA."""
    nan = torch.isnan(x)
    if not x.numel():
        return x.new_full((), float("nan"))
    fill = float("inf") if extreme is torch.amin else float("-inf")
    value = extreme(torch.where(nan, fill, x))
    return torch.where(nan.all(), float("nan"), value)
