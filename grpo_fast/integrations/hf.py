"""Hugging Face causal LMs as grpo_fast wants them: the backbone's final hidden states and the LM head.

The loss needs ``hidden`` after the final norm and the head's ``weight``/``bias``, never the logits.
The model is expected to compute ``logits = lm_head(hidden)``, times a constant :func:`logit_scale`
(which callers fold into the temperature); models that soft-cap their logits are reported by
:func:`unsupported_head` so callers can fall back.
"""

from __future__ import annotations

import functools
import math
import types

from torch import Tensor, nn

HIDDEN_KWARG = "grpo_fast_hidden"


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (which keeps LoRA layers injected in it)."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack whose ``last_hidden_state`` (after the final norm) feeds the LM head."""
    inner = unwrap(model)
    base = getattr(inner, "base_model", None)
    if base is None or base is inner:
        raise TypeError(
            f"{type(inner).__name__} has no separate backbone (base_model); grpo_fast needs a "
            "transformers *ForCausalLM model whose LM head is applied to the backbone's hidden states"
        )
    return base


def lm_head(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(weight [V, H], bias [V] or None)`` of the output layer (the embedding matrix when tied)."""
    inner = unwrap(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    # DeepSpeed ZeRO-3 keeps an empty local partition; ds_shape is the whole weight's shape.
    shape = getattr(weight, "ds_shape", None) or getattr(weight, "shape", ())
    if not isinstance(weight, Tensor) or len(shape) != 2:
        raise TypeError(f"{type(inner).__name__} has no linear LM head (get_output_embeddings().weight)")
    return weight, getattr(head, "bias", None)


def _text_config(model: nn.Module) -> object:
    config = unwrap(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logit_scale(model: nn.Module) -> float:
    """The factor the model multiplies ``lm_head(hidden)`` by before any soft-capping, read from its
    config as TRL 1.16's fused head reads it: ``logit_scale``, ``output_multiplier``, ``lm_head_multiplier``,
    else ``1 / logits_scaling`` (Granite, MiniCPM3; HyperCLOVA X multiplies by it); 1 when none is set.
    Without soft-capping it folds into the temperature: ``(x * s) / T = x / (T / s)``."""
    text = _text_config(model)
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(text, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(text, "logits_scaling", None)
    if scaling is not None:
        return float(scaling) if getattr(text, "model_type", None) == "hyperclovax" else 1.0 / float(scaling)
    return 1.0


def logit_softcap(model: nn.Module) -> float | None:
    """Gemma 2's ``final_logit_softcapping`` (logits -> cap * tanh(logits / cap)), or None."""
    cap = getattr(_text_config(model), "final_logit_softcapping", None)
    return float(cap) if cap is not None else None


def head_transform(model: nn.Module, temperature: float) -> tuple[float, float | None]:
    """``(temperature, logit_softcap)`` for grpo_fast that give this model's temperature-scaled logits
    from ``lm_head(hidden)``, as TRL's fused head computes them: ``cap * tanh(x * s / cap) / T`` is
    ``cap' * tanh(x / cap') / T'`` with ``cap' = cap / s`` and ``T' = T / s`` (s > 0)."""
    scale, cap = logit_scale(model), logit_softcap(model)
    return temperature / scale, (cap / scale if cap is not None else None)


def unsupported_head(model: nn.Module, scale_ok: bool = False) -> str | None:
    """Why ``lm_head(hidden)`` (divided by the temperature) is not this model's logits, or None: soft-capping
    or logit scaling, unless the caller applies :func:`head_transform` (``scale_ok``); a scale <= 0 or a
    non-positive cap never does."""
    cap = logit_softcap(model)
    if cap is not None and not (scale_ok and cap > 0 and math.isfinite(cap)):
        return f"the model soft-caps its logits (final_logit_softcapping={cap})"
    scale = logit_scale(model)
    if scale != 1.0 and not (scale_ok and scale > 0 and math.isfinite(scale)):
        return f"the model scales its logits (by {scale})"
    return None


def completion_hidden(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, num_completion: int
) -> Tensor:
    """Final hidden states ``[B, K, H]`` of the positions that predict the last K tokens of input_ids."""
    out = backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state[:, -num_completion - 1 : -1]


def add_hidden_forward(model: nn.Module) -> None:
    """Let ``model(..., grpo_fast_hidden=True)`` return the backbone's output instead of logits.

    Going through ``model(...)`` rather than calling the backbone directly keeps wrappers (DDP, FSDP,
    PEFT) in the loop, the same way TRL reaches its fused LM head. Idempotent.
    """
    if getattr(model.forward, "_grpo_fast_hidden", False):
        return
    inner_forward = model.forward

    @functools.wraps(type(model).forward)  # keeps the signature that generate() validates kwargs against
    def forward(self, *args, **kwargs):
        if not kwargs.pop(HIDDEN_KWARG, False):
            return inner_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        return backbone(self)(*args, **kwargs)

    forward._grpo_fast_hidden = True
    model.forward = types.MethodType(forward, model)


def match_head_dtype(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Cast the head to hidden's dtype (as autocast would for the LM head); gradients flow back to it."""
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
        bias = bias.to(hidden.dtype) if bias is not None else None
    return weight, bias
