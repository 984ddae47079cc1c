"""Hyper-parameters of the GRPO objective, named and defaulted as in TRL 1.16's GRPOConfig.

Each field carries its ``help`` (and ``choices``) in its metadata: the thin trainer turns every field into
a command-line option from that alone, so a new loss option is added here and nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# How each loss type reduces the masked per-token loss to one number (TRL 1.16's _compute_loss); the only
# definition, used by the engine, the reference and both trainers:
#   "sequence_mean"  mean over sequences of each sequence's token mean                   (grpo, sapo)
#   "batch_tokens"   sum over the batch's tokens / the batch's token count                (bnpo)
#   "fixed_length"   sum / (sequences * max_completion_length)                            (dr_grpo)
#   "global_tokens"  sum / num_items_in_batch (the global batch's tokens; default: this batch's)
#   "sequence_sum"   each sequence's token sum, mean over sequences                       (luspo)
LOSS_NORMALIZERS = {
    "grpo": "sequence_mean",
    "bnpo": "batch_tokens",
    "dr_grpo": "fixed_length",
    "dapo": "global_tokens",
    "cispo": "global_tokens",
    "sapo": "sequence_mean",
    "luspo": "sequence_sum",
    "vespo": "global_tokens",
}
LOSS_TYPES = tuple(LOSS_NORMALIZERS)
# Loss types whose surrogate is the PPO clipped min(); clip metrics are defined for these.
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
# group_advantages' scale -> the scale_mode int every kernel takes (Triton's and the native
# grpo_fast::group_advantages, whose csrc/advantages_math.h ScaleMode enum holds the same numbers).
SCALE_MODES = {"group": 0, "batch": 1, "none": 2}


def _check_positive(name: str, value: float) -> None:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _check_non_negative(name: str, value: float) -> None:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")


def _opt(default: Any, help: str, **meta: Any) -> Any:  # noqa: A002 - the metadata key argparse uses
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class GRPOConfig:
    """Hyper-parameters of the GRPO loss.

    ``epsilon_high=None`` means "same as epsilon_low", as TRL's ``epsilon_high=None`` falls back to
    ``epsilon``; it is resolved on construction, so ``config.epsilon_high`` is always the upper epsilon used.
    ``num_items_in_batch`` is not here: it changes every step, so it is an argument of :func:`grpo_loss`.
    """

    loss_type: str = _opt("dapo", "GRPO loss variant (TRL's names)", choices=LOSS_TYPES)
    epsilon_low: float = _opt(0.2, "lower clip epsilon")
    epsilon_high: float | None = _opt(None, "upper clip epsilon (default: epsilon_low); cispo's ratio cap")
    delta: float | None = _opt(None, "two-sided clipping: cap of the unclipped ratio")
    beta: float = _opt(0.0, "KL coefficient; > 0 needs the reference model's log-probs")
    importance_sampling_level: str = _opt(
        "token", "importance ratio per token, or per sequence (GSPO)", choices=IMPORTANCE_SAMPLING_LEVELS
    )
    temperature: float = _opt(1.0, "sampling temperature: the logits are divided by it, as in TRL")
    max_completion_length: int | None = _opt(None, "most tokens per completion (dr_grpo's normalizer)")
    use_bias_correction_kl: bool = _opt(True, "multiply the KL term by the importance ratio")
    sapo_temperature_pos: float = _opt(1.0, "SAPO temperature for positive advantages")
    sapo_temperature_neg: float = _opt(1.05, "SAPO temperature for non-positive advantages")
    vespo_k_pos: float = _opt(2.0, "VESPO power exponent k for non-negative advantages")
    vespo_lambda_pos: float = _opt(3.0, "VESPO decay lambda for non-negative advantages")
    vespo_k_neg: float = _opt(3.0, "VESPO power exponent k for negative advantages")
    vespo_lambda_neg: float = _opt(2.0, "VESPO decay lambda for negative advantages")
    top_entropy_quantile: float = _opt(
        1.0, "train only on the tokens of the top fraction of entropy in the batch (1: every token)"
    )
    off_policy_mask_threshold: float | None = _opt(
        None, "drop negative-advantage sequences whose mean KL(sampling || current) exceeds this"
    )
    entropy_coef: float = _opt(0.0, "entropy bonus: loss - entropy_coef * mean token entropy")
    logit_softcap: float | None = _opt(
        None,
        "soft-cap the logits to cap * tanh(logits / cap) before the temperature (Gemma 2)",
    )

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(
                f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                f"got {self.importance_sampling_level!r}"
            )
        _check_non_negative("epsilon_low", self.epsilon_low)
        if self.epsilon_high is None:
            object.__setattr__(self, "epsilon_high", float(self.epsilon_low))
        _check_non_negative("epsilon_high", self.epsilon_high)
        if self.delta is not None:
            _check_positive("delta", self.delta)
        _check_non_negative("beta", self.beta)
        _check_positive("temperature", self.temperature)
        _check_positive("sapo_temperature_pos", self.sapo_temperature_pos)
        _check_positive("sapo_temperature_neg", self.sapo_temperature_neg)
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            _check_non_negative(name, getattr(self, name))
        q = self.top_entropy_quantile
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 < q <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in (0, 1], got {q!r}")
        if self.off_policy_mask_threshold is not None:
            _check_non_negative("off_policy_mask_threshold", self.off_policy_mask_threshold)
        if self.logit_softcap is not None:
            _check_positive("logit_softcap", self.logit_softcap)
        e = self.entropy_coef
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e):
            raise ValueError(f"entropy_coef must be a finite number, got {e!r}")
        if not isinstance(self.use_bias_correction_kl, bool):
            raise ValueError(f"use_bias_correction_kl must be a bool, got {self.use_bias_correction_kl!r}")
        if self.max_completion_length is not None and (
            isinstance(self.max_completion_length, bool)
            or not isinstance(self.max_completion_length, int)
            or self.max_completion_length <= 0
        ):
            raise ValueError(
                f"max_completion_length must be a positive int or None, got {self.max_completion_length!r}"
            )
        if self.normalizer == "fixed_length" and self.max_completion_length is None:
            raise ValueError(
                f"loss_type={self.loss_type!r} needs max_completion_length (its fixed normalizer)"
            )

    @property
    def normalizer(self) -> str:
        """How this loss type reduces the per-token loss (see LOSS_NORMALIZERS)."""
        return LOSS_NORMALIZERS[self.loss_type]

    @property
    def uses_num_items_in_batch(self) -> bool:
        """Whether the loss divides by ``num_items_in_batch`` (trainers pass the global batch's tokens)."""
        return self.normalizer == "global_tokens"
