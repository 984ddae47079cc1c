"""Row statistics of a logits tile: logsumexp, target log-prob and entropy of ``logits / T``.

One program per row walks the vocabulary once in ``BLOCK_V`` blocks with an online max / sum-exp
(fp32 whatever the tile's dtype), loads the target logit once, and never writes the tile.
With ``PARTIAL`` it returns a vocabulary shard's raw partials instead (:func:`chunk_partial_stats`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import FP_FUSION, check_device, check_rows, check_tile, interpreting, online_update, row_block


@triton.jit
def row_stats(row_ptr, target, n_cols, temperature, BLOCK_V: tl.constexpr):
    """(m, s, u, target logit) of one row of scaled logits z = x / T; target logit 0 if not owned."""
    # Typed fp32 scalars: loop-carried values must keep one type across iterations.
    m = tl.full((), -float("inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    u = tl.full((), 0.0, tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < n_cols
        x = tl.load(row_ptr + cols, mask=valid, other=-float("inf")).to(tl.float32)
        z = tl.math.div_rn(x, temperature)  # as torch divides: see _common.py
        z = tl.where(valid, z, -float("inf"))
        m, s, u = online_update(m, s, u, z, valid, 0)
    owned = (target >= 0) & (target < n_cols)
    # Out-of-shard targets (vocab-parallel) read nothing: the load is masked off.
    t = tl.load(row_ptr + tl.where(owned, target, 0), mask=owned, other=0.0).to(tl.float32)
    t = tl.math.div_rn(t, temperature)
    return m, s, u, t


@triton.jit
def _chunk_stats_kernel(
    logits_ptr,
    stride_row,
    targets_ptr,
    out_ptr,
    n_rows,
    n_cols,
    temperature,
    PARTIAL: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # 64-bit: row * stride passes 2**31 on large tiles
    target = tl.load(targets_ptr + row)
    m, s, u, t = row_stats(logits_ptr + row * stride_row, target, n_cols, temperature, BLOCK_V)
    if PARTIAL:
        tl.store(out_ptr + row, m)
        tl.store(out_ptr + n_rows + row, s)
        tl.store(out_ptr + 2 * n_rows + row, u)
        tl.store(out_ptr + 3 * n_rows + row, t)
    else:
        log_s = tl.log(s)
        # lse = hi + lo exactly (TwoSum; no fma contraction, FP_FUSION): rounded to one float at |lse| ~ |z|
        # it would shift every p = exp(z - lse) of chunk_grad_ by that rounding.
        hi = m + log_s
        b = hi - m
        lo = tl.where(tl.abs(hi) < float("inf"), (m - (hi - b)) + (log_s - b), 0.0)  # 0: lse inf or NaN
        tl.store(out_ptr + row, hi)
        tl.store(out_ptr + n_rows + row, (t - m) - log_s)  # not t - lse: lse is rounded at |lse|
        tl.store(out_ptr + 2 * n_rows + row, log_s - u / s)
        tl.store(out_ptr + 3 * n_rows + row, lo)


def _launch(op: str, logits: Tensor, targets: Tensor, temperature: float, partial: bool) -> Tensor:
    check_tile(op, logits)
    rows, cols = logits.shape
    check_rows(op, "targets", targets, rows, (torch.int64, torch.int32))
    check_device(op, logits, targets)
    if cols == 0:
        raise ValueError(f"{op}: the tile has no vocabulary columns")
    out = torch.empty(4, rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return out
    block = row_block(cols, 1024 if interpreting() else 4096)
    _chunk_stats_kernel[(rows,)](
        logits,
        logits.stride(0),
        targets,
        out,
        rows,
        cols,
        float(temperature),
        PARTIAL=partial,
        BLOCK_V=block,
        num_warps=8 if block >= 2048 else 4,
        enable_fp_fusion=FP_FUSION,
    )
    return out


def chunk_stats(logits: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """(lse, logp, entropy) ``[C]`` of ``logits [C, V] / temperature``; targets in ``[0, V)``. logp and
    entropy fp32; lse fp64, ``m + log s`` unrounded (what chunk_grad_'s p need)."""
    out = _launch("chunk_stats", logits, targets, temperature, partial=False)
    return out[0].double() + out[3].double(), out[1], out[2]


def chunk_partial_stats(logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """fp32 ``[4, C]``: row max m, ``sum exp(z - m)``, ``sum exp(z - m) * (z - m)`` and the target logit
    (0 where the target is outside ``[0, V)``: another vocabulary shard's token)."""
    return _launch("chunk_partial_stats", logits, targets, temperature, partial=True)
