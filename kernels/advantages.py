"""Group-normalized advantages with TRL's semantics (``grpo_fast.reference.group_advantages``).

Rewards ``[M, R]`` (M = B*G completions, R reward functions) are summed per row with weights, NaN
rewards skipped (a row with no reward at all stays NaN); then per group of G rows the NaN-aware mean
and Bessel-corrected std, ``A = (r - mean) / (std + eps)``, and NaN -> 0 (``torch.nan_to_num``).
One program per group. ``scale="batch"`` needs the std of the whole batch: a second, single-program
kernel reduces it and finishes the division.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..config import SCALE_MODES
from ._common import check_device

_FLOAT32_MAX = 3.4028234663852886e38


@triton.jit
def _nan_to_num(x):
    """torch.nan_to_num: NaN -> 0, +-inf -> the largest finite fp32 of that sign."""
    x = tl.where(x != x, 0.0, x)
    x = tl.where(x == float("inf"), 3.4028234663852886e38, x)
    return tl.where(x == -float("inf"), -3.4028234663852886e38, x)


@triton.jit
def _group_kernel(
    rewards_ptr,
    weights_ptr,
    out_ptr,
    summed_ptr,
    n_funcs,
    group_size,
    eps,
    scale_mode,
    BLOCK_G: tl.constexpr,
):
    offs = tl.arange(0, BLOCK_G)
    ok = offs < group_size
    rows = tl.program_id(0).to(tl.int64) * group_size + offs
    summed = tl.zeros((BLOCK_G,), tl.float32)
    scored = tl.zeros((BLOCK_G,), tl.int32)
    for j in range(0, n_funcs):
        r = tl.load(rewards_ptr + rows * n_funcs + j, mask=ok, other=float("nan"))
        prod = r * tl.load(weights_ptr + j)
        summed += tl.where(prod != prod, 0.0, prod)  # nansum skips NaN products
        scored += (r == r).to(tl.int32)
    summed = tl.where(scored > 0, summed, float("nan"))
    valid = ok & (summed == summed)
    count = tl.sum(valid.to(tl.float32), axis=0)
    mean = tl.sum(tl.where(valid, summed, 0.0), axis=0) / count  # nanmean: NaN for an all-NaN group
    centered = summed - mean
    if scale_mode == 0:  # "group": nanstd over the group; a group of one has std 0
        std = tl.full((), 0.0, tl.float32)
        if group_size > 1:
            sq = tl.where(valid, centered * centered, 0.0)
            var = tl.sum(sq, axis=0) / count
            std = tl.sqrt(var * tl.where(count > 1, count / (count - 1), float("nan")))
        tl.store(out_ptr + rows, _nan_to_num(centered / (std + eps)), mask=ok)
    elif scale_mode == 2:  # "none"
        tl.store(out_ptr + rows, _nan_to_num(centered), mask=ok)
    else:  # 1, "batch": leave the centered values; the batch kernel divides by the batch std
        tl.store(out_ptr + rows, centered, mask=ok)
        tl.store(summed_ptr + rows, summed, mask=ok)


@triton.jit
def _batch_scale_kernel(out_ptr, summed_ptr, n, eps, BLOCK: tl.constexpr):
    """One program: nanstd of every summed reward (0 for a single row), then out /= std + eps."""
    total = tl.zeros((BLOCK,), tl.float32)
    counts = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(summed_ptr + offs, mask=offs < n, other=float("nan"))
        valid = x == x
        total += tl.where(valid, x, 0.0)
        counts += valid.to(tl.float32)
    count = tl.sum(counts, axis=0)
    mean = tl.sum(total, axis=0) / count
    sq = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(summed_ptr + offs, mask=offs < n, other=float("nan"))
        sq += tl.where(x == x, (x - mean) * (x - mean), 0.0)
    var = tl.sum(sq, axis=0) / count
    std = tl.sqrt(var * tl.where(count > 1, count / (count - 1), float("nan")))
    std = tl.where(n > 1, std, 0.0)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < n
        centered = tl.load(out_ptr + offs, mask=ok, other=0.0)
        tl.store(out_ptr + offs, _nan_to_num(centered / (std + eps)), mask=ok)


def group_advantages(rewards: Tensor, weights: Tensor, group_size: int, scale: str, eps: float) -> Tensor:
    """fp32 ``[M]`` advantages of fp32 rewards ``[M, R]`` with reward weights ``[R]`` (validated inputs)."""
    op = "group_advantages"
    if rewards.dim() != 2 or rewards.dtype != torch.float32:
        raise TypeError(f"{op}: rewards must be fp32 [M, R], got {rewards.dtype} {tuple(rewards.shape)}")
    n, funcs = rewards.shape
    if weights.shape != (funcs,) or weights.dtype != torch.float32:
        raise ValueError(f"{op}: weights must be fp32 [{funcs}], got {weights.dtype} {tuple(weights.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or n % group_size:
        raise ValueError(f"{op}: group_size must be a positive int dividing {n}, got {group_size!r}")
    if scale not in SCALE_MODES:
        raise ValueError(f"{op}: scale must be one of {tuple(SCALE_MODES)}, got {scale!r}")
    check_device(op, rewards, weights)
    rewards, weights = rewards.contiguous(), weights.contiguous()
    out = torch.empty(n, dtype=torch.float32, device=rewards.device)
    if n == 0:
        return out
    mode = SCALE_MODES[scale]  # the numbers the kernel's branches test
    batch = mode == SCALE_MODES["batch"]
    summed = torch.empty_like(out) if batch else out  # scratch only for the batch std
    block_g = max(16, triton.next_power_of_2(group_size))
    _group_kernel[(n // group_size,)](
        rewards, weights, out, summed, funcs, group_size, float(eps), mode,
        BLOCK_G=block_g, num_warps=4 if block_g <= 1024 else 8,
    )  # fmt: skip
    if batch:
        _batch_scale_kernel[(1,)](out, summed, n, float(eps), BLOCK=1024, num_warps=8)
    return out
