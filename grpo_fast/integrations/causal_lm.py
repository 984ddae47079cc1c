"""A Hugging Face causal LM's per-token log-probs without its logits, and the two steps every user of the
fused ops here shares (``FastGRPOTrainer`` and :func:`causal_lm_logprobs`):

- :func:`completion_states`: run the backbone (through ``model(...)``, so DDP, FSDP and PEFT wrappers stay
  in the loop) and take the final hidden states that predict the completion tokens, padded or packed;
- :func:`head_inputs`: the LM head as the fused ops take it: tied or not, FSDP2's gathered with
  ``full_tensor()``, DeepSpeed ZeRO-3's gathered for the block, cast to the hidden states' dtype (or fp32).

A scaled or soft-capped head is folded into the temperature and ``logit_softcap`` by
:func:`grpo_fast.integrations.hf.head_transform`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..logprobs import selective_logprobs
from .hf import HIDDEN_KWARG, add_hidden_forward, head_transform, lm_head, match_head_dtype, unsupported_head
from .packing import VARLEN_ATTENTION, Packing, attention_implementation, check_packable


def full_head(weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The whole LM head from an FSDP2-sharded one (DTensor parameters), as TRL's fused head gathers it:
    ``full_tensor()`` all-gathers in forward and reduce-scatters the gradient back to the shards."""
    from torch.distributed.tensor import DTensor

    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if isinstance(bias, DTensor) else bias
    return weight, bias


def zero3_partitioned(param: Tensor | None) -> bool:
    """Whether ``param`` is a DeepSpeed ZeRO-3 parameter (partitioned outside its module's forward)."""
    return param is not None and hasattr(param, "ds_id")


def zero3_gathered(*params: Tensor | None) -> contextlib.AbstractContextManager:
    """Gathers ZeRO-3-partitioned parameters for the block, as TRL's fused head does
    (``trl.trainer.utils.maybe_gather_lm_head_ctx``): the fused ops read the head's weight directly, never
    through the head module whose hooks would gather it. Each parameter once (a tied head is the embedding
    too) and none already gathered (releasing the embedding's would break its module's own tracking)."""
    todo = [p for p in params if zero3_partitioned(p)]
    if not todo:
        return contextlib.nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    unique = {id(p): p for p in todo if p.ds_status != ZeroParamStatus.AVAILABLE}
    if not unique:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(list(unique.values()))


@contextlib.contextmanager
def head_inputs(
    model: nn.Module, hidden: Tensor, fp32: bool = False
) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
    """``(hidden, weight, bias)`` in the dtypes the fused ops take: fp32 with ``fp32``, else the head in the
    hidden states' dtype (as autocast would run it). ``model`` is the unwrapped transformers model (or its
    PEFT wrapper). A sharded head is whole inside the block: FSDP2's gathered with ``full_tensor()``;
    DeepSpeed ZeRO-3's gathered for the block only, so what needs it whole must run inside (grpo_loss
    computes its weight gradient in forward)."""
    weight, bias = lm_head(model)
    with zero3_gathered(weight, bias):
        weight, bias = full_head(weight, bias)
        if fp32:
            hidden, weight = hidden.float(), weight.float()
            bias = bias.float() if bias is not None else None
        else:
            weight, bias = match_head_dtype(hidden, weight, bias)
        yield hidden, weight, bias


def unwrapped(model: nn.Module) -> nn.Module:
    """The module under DDP, a DeepSpeed engine or ``torch.compile`` (a PEFT model is kept: it is what
    :mod:`.hf` reads the head and the config through)."""
    while True:
        if (
            isinstance(model, nn.parallel.DistributedDataParallel)
            or type(model).__name__ == "DeepSpeedEngine"
        ):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def completion_states(
    model: nn.Module,
    inner: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    keep: int,
    padding_free: bool = False,
    **forward_kwargs: Any,
) -> tuple[Any, Tensor, Packing | None]:
    """The backbone's output and the hidden states predicting the last ``keep`` tokens, ``[B, keep, H]``.
    Padding-free: those of the attended completion tokens only, ``[n, H]``, and the packing that places
    them. ``model`` is what to call (wrappers included), ``inner`` the transformers model in it, whose
    forward :func:`~grpo_fast.integrations.hf.add_hidden_forward` has patched."""
    packing, batch = None, {"input_ids": input_ids, "attention_mask": attention_mask}
    if padding_free:
        varlen = attention_implementation(inner) in VARLEN_ATTENTION
        packing = Packing.of_inputs(input_ids, attention_mask, keep, one_row=varlen)
        batch = packing.forward_kwargs()
    out = model(**batch, **{HIDDEN_KWARG: True}, **forward_kwargs)
    last = out.last_hidden_state
    hidden = last[:, -keep - 1 : -1] if packing is None else packing.hidden(last)
    return out, hidden, packing


def _check_arguments(
    model: object,
    input_ids: object,
    attention_mask: object,
    logits_to_keep: object,
    temperature: object,
    flags: dict[str, object],
) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module (a transformers causal LM), got {type(model).__name__}"
        )
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        what = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be an integer tensor [B, T], got {what}")
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
        what = (
            tuple(attention_mask.shape)
            if isinstance(attention_mask, Tensor)
            else type(attention_mask).__name__
        )
        raise ValueError(
            f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, got {what}"
        )
    if attention_mask.device != input_ids.device:
        raise ValueError(f"attention_mask is on {attention_mask.device}, input_ids on {input_ids.device}")
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int):
        raise TypeError(f"logits_to_keep must be an int, got {type(logits_to_keep).__name__}")
    if not 0 < logits_to_keep < input_ids.shape[1]:
        raise ValueError(
            f"logits_to_keep must be in [1, {input_ids.shape[1]}) (the completion columns of input_ids, each "
            f"predicted from the position before it), got {logits_to_keep}"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be positive and finite, got {temperature!r}")
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def causal_lm_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    logits_to_keep: int,
    temperature: float = 1.0,
    return_entropy: bool = False,
    padding_free: bool = False,
    *,
    backend: str = "auto",
    chunk_size: int | None = None,
    batch_invariant: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token log-probs ``[B, logits_to_keep]`` (and entropies) of the last ``logits_to_keep`` tokens of
    ``input_ids`` under a Hugging Face causal LM at ``temperature``, with gradients, never forming the
    logits: ``log_softmax(model(input_ids).logits[:, -K-1:-1] / T).gather(-1, input_ids[:, -K:])``.

    Runs the backbone through ``model(...)`` (DDP, FSDP and PEFT wrappers stay in the loop; its forward
    gains a ``grpo_fast_hidden`` switch, see :func:`~grpo_fast.integrations.hf.add_hidden_forward`) and
    ``gf.selective_logprobs`` on its final hidden states and LM head, taken as ``FastGRPOTrainer`` takes
    them: tied or not, scaled or soft-capped as the model's config says, FSDP2- or ZeRO-3-sharded heads
    gathered. Positions where ``attention_mask`` is 0 are not computed and hold 0 (TRL's fused head does the
    same). ``padding_free=True`` runs the backbone on the real tokens only, packed (an attention
    implementation that isolates packed sequences is needed: sdpa, eager, flex or flash).

    Shaped like TRL's ``GRPOTrainer._get_per_token_logps_and_entropies``; fp32 whatever the model's dtype.
    Gradients flow through both outputs to the model's parameters. ``backend``, ``chunk_size`` and
    ``batch_invariant`` are ``selective_logprobs``'s.
    """
    flags = dict(return_entropy=return_entropy, padding_free=padding_free, batch_invariant=batch_invariant)
    _check_arguments(model, input_ids, attention_mask, logits_to_keep, temperature, flags)
    inner = unwrapped(model)
    why = unsupported_head(inner, scale_ok=True)
    if why is not None:
        raise ValueError(f"causal_lm_logprobs cannot compute this model's logits from its head: {why}")
    if padding_free:
        check_packable(inner)
    weight = lm_head(inner)[0]  # (raises a TypeError naming the model when it has no linear head)
    if (
        zero3_partitioned(weight)
        and torch.is_grad_enabled()
        and any(p.requires_grad for p in inner.parameters())
    ):
        raise ValueError(
            "gradients through a DeepSpeed ZeRO-3-partitioned LM head are not supported here: the backward "
            "pass recomputes the logits outside the block where the head is gathered. Call it under "
            "torch.no_grad() (old and reference log-probs), or use gf.grpo_loss / FastGRPOTrainer, whose "
            "weight gradient is computed while the head is gathered"
        )
    # Patched where the weights live: under PEFT, the transformers model inside (LoRA layers included).
    add_hidden_forward(inner.get_base_model() if hasattr(inner, "get_base_model") else inner)
    temperature, cap = head_transform(inner, float(temperature))
    _, hidden, packing = completion_states(
        model, inner, input_ids, attention_mask, logits_to_keep, padding_free
    )
    targets = input_ids[:, -logits_to_keep:]
    if packing is None:  # the attended completion tokens only; the others are 0, never computed
        rows, cols = (attention_mask[:, -logits_to_keep:] != 0).nonzero(as_tuple=True)
        hidden = hidden[rows, cols]
    else:
        rows, cols = packing.seq_ids, packing.cols
    with head_inputs(inner, hidden) as (hidden, weight, bias):
        logp, entropy = selective_logprobs(
            hidden, weight, targets[rows, cols], bias, temperature, return_entropy=True, backend=backend,
            chunk_size=chunk_size, batch_invariant=batch_invariant, logit_softcap=cap,
        )  # fmt: skip

    def padded(values: Tensor) -> Tensor:
        out = values.new_zeros(targets.shape)
        out[rows, cols] = values
        return out

    return (padded(logp), padded(entropy)) if return_entropy else padded(logp)


__all__ = ["causal_lm_logprobs", "completion_states", "full_head", "head_inputs", "zero3_gathered"]
