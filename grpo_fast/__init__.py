"""grpo_fast: the GRPO loss fused with the LM head, so the [tokens, vocab] logits never exist."""

from . import reference
from .advantages import group_advantages
from .config import GRPOConfig
from .integrations.causal_lm import causal_lm_logprobs
from .logprobs import selective_logprobs
from .loss import GRPOLoss, grpo_loss

__version__ = "0.1.0"
__all__ = [
    "GRPOConfig",
    "GRPOLoss",
    "causal_lm_logprobs",
    "group_advantages",
    "grpo_loss",
    "reference",
    "selective_logprobs",
]
