"""The accuracy rule every backend is held to, shared by `grpo-fast check` and the test-suite.

A backend's error against the fp64 truth may exceed the error of the plain PyTorch reference run in
the same dtype by at most a small per-dtype margin::

    err <= FACTOR[dtype] * ref_err + ATOL[dtype] * scale

where ``scale`` is the truth's largest magnitude (for the loss and its policy part: at least
``LOSS_SCALE``). The margin is relative to the reference's own error, so a kernel is never asked to
beat what the dtype allows, only to not be worse than PyTorch.
"""

from __future__ import annotations

import torch
from torch import Tensor

FACTOR: dict[torch.dtype, float] = {
    torch.float64: 2.0,
    torch.float32: 2.0,
    torch.float16: 2.0,
    torch.bfloat16: 2.0,
}
ATOL: dict[torch.dtype, float] = {
    torch.float64: 1e-6,
    torch.float32: 2e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}


# The loss is a mean of per-token terms of size |advantage| ~ 1 (normalised advantages) that largely
# cancel, so its rounding error follows the terms, not the small result: judge it on at least this scale.
# So is the policy_loss metric (the loss without its KL and entropy terms). Judged on its own small value
# instead, a reference that happens to round exactly leaves a margin below one unit in the last place of
# the terms, which a different summation order (AVX-512 vs AVX2 kernels) exceeds.
LOSS_SCALE = 1.0
CANCELLING_OUTPUTS = ("loss", "policy_loss")


def scale_of(truth: Tensor, floor: float = 1e-30) -> float:
    """The magnitude errors are measured against: the truth's largest value, at least ``floor``."""
    return max(truth.detach().double().abs().max().item() if truth.numel() else 0.0, floor)


def scale_for(name: str, truth: Tensor) -> float:
    """``scale_of`` for the output called ``name`` (its last word: "loss", "metric policy_loss", ...)."""
    return scale_of(truth, LOSS_SCALE if name.split()[-1] in CANCELLING_OUTPUTS else 1e-30)


def max_err(a: Tensor, b: Tensor) -> float:
    """Largest absolute difference, computed in fp64 on the CPU (0 for empty tensors)."""
    if not a.numel():
        return 0.0
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()


def bound(ref_err: float, scale: float, dtype: torch.dtype) -> float:
    """The largest error allowed for a backend whose same-dtype reference is ``ref_err`` off."""
    return FACTOR[dtype] * ref_err + ATOL[dtype] * scale
