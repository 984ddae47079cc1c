"""Hyper-parameters of the GRPO objective, named and defaulted as in TRL 1.16's GRPOConfig."""

from __future__ import annotations

import math
from dataclasses import dataclass

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")
# Loss types whose surrogate is the PPO clipped min(); clip metrics are defined for these.
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


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


@dataclass(frozen=True)
class GRPOConfig:
    """Hyper-parameters of the GRPO loss.

    ``epsilon_high=None`` means "same as epsilon_low" (TRL's ``epsilon_high=None`` falls back to ``epsilon``).
    ``num_items_in_batch`` is not here: it changes every step, so it is an argument of :func:`grpo_loss`.
    """

    loss_type: str = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    beta: float = 0.0
    importance_sampling_level: str = "token"
    temperature: float = 1.0
    max_completion_length: int | None = None
    use_bias_correction_kl: bool = True
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(
                f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                f"got {self.importance_sampling_level!r}"
            )
        _check_non_negative("epsilon_low", self.epsilon_low)
        if self.epsilon_high is not None:
            _check_non_negative("epsilon_high", self.epsilon_high)
        if self.delta is not None:
            _check_positive("delta", self.delta)
        _check_non_negative("beta", self.beta)
        _check_positive("temperature", self.temperature)
        _check_positive("sapo_temperature_pos", self.sapo_temperature_pos)
        _check_positive("sapo_temperature_neg", self.sapo_temperature_neg)
        if self.max_completion_length is not None and (
            not isinstance(self.max_completion_length, int) or self.max_completion_length <= 0
        ):
            raise ValueError(
                f"max_completion_length must be a positive int or None, got {self.max_completion_length!r}"
            )
        if self.loss_type == "dr_grpo" and self.max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length (its fixed normalizer)")

    @property
    def eps_high(self) -> float:
        """The upper clip epsilon actually used."""
        return self.epsilon_low if self.epsilon_high is None else float(self.epsilon_high)
