"""The logits gradient from per-row coefficients, written over the tile in place.

With ``z = logits / T`` and ``p = softmax(z)``::

    dlogits = g * (onehot(target) - p) / T  -  e * p * (log p + H) / T

``g = dLoss/dlogp`` per row; the second term, ``e * dH/dlogits`` for ``e = dLoss/dH`` and the row
entropy ``H``, only with ``ent_coef``. Written in the tile's dtype with fp32 math: one read and one
write of the tile. A 2-D grid (rows x vocabulary blocks) keeps every SM busy even for a few rows.
Targets outside ``[0, V)`` (another vocabulary shard's tokens) get no one-hot term.

In place without a race: each program loads one ``[BLOCK_V]`` block of one row and stores to exactly
that block; nothing else of the tile is read (the one-hot term compares column ids, it never loads
the target logit), so no program can see another's output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import FP_FUSION, check_device, check_rows, check_tile, interpreting, row_block


@triton.jit
def _chunk_grad_kernel(
    logits_ptr,
    stride_row,
    targets_ptr,
    lse_ptr,
    lse_lo_ptr,
    g_ptr,
    ent_coef_ptr,
    entropy_ptr,
    n_cols,
    temperature,
    HAS_ENT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # 64-bit: row * stride passes 2**31 on large tiles
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    valid = cols < n_cols
    ptrs = logits_ptr + row * stride_row + cols
    z = tl.math.div_rn(tl.load(ptrs, mask=valid, other=0.0).to(tl.float32), temperature)
    # lse = hi + lo (two floats): (z - hi) is exact near the max, so p carries no rounding of lse.
    log_p = (z - tl.load(lse_ptr + row)) - tl.load(lse_lo_ptr + row)
    p = tl.exp(log_p)
    onehot = (cols == tl.load(targets_ptr + row)).to(tl.float32)
    dz = tl.load(g_ptr + row) * (onehot - p)
    if HAS_ENT:
        coef = tl.load(ent_coef_ptr + row)
        h = tl.load(entropy_ptr + row)
        # p > 0: a -inf logit (masked vocabulary) adds 0 (the limit of p log p), not 0 * -inf = NaN.
        dz -= tl.where(p > 0, coef * p * (log_p + h), 0.0)
    tl.store(ptrs, tl.math.div_rn(dz, temperature).to(logits_ptr.dtype.element_ty), mask=valid)


def chunk_grad_(
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
    g: Tensor,
    temperature: float,
    ent_coef: Tensor | None = None,
    entropy: Tensor | None = None,
) -> Tensor:
    """Overwrite ``logits [C, V]`` with ``dLoss/dlogits``; returns ``logits``.

    ``g * (onehot - p) / T`` with ``z = logits / T``, ``p = exp(z - lse)``; with ``ent_coef`` (and only
    with ``entropy``) also ``- ent_coef * p * ((z - lse) + entropy) / T``. g, ent_coef and entropy are fp32
    contiguous ``[C]``: ``dLoss/dlogp``, ``dLoss/dH`` and ``H``; lse ``[C]`` the row logsumexp of ``z``,
    fp64 (as :func:`chunk_stats` gives it: unrounded) or fp32 (then every p carries its rounding).
    """
    op = "chunk_grad_"
    check_tile(op, logits)
    rows, cols = logits.shape
    # Overlapping rows (stride(0) < V) would let one row's store land in another row's block.
    if rows > 1 and logits.stride(0) < cols:
        raise ValueError(f"{op}: logits rows overlap (stride(0) < V), got strides {logits.stride()}")
    check_rows(op, "targets", targets, rows, (torch.int64, torch.int32))
    check_rows(op, "lse", lse, rows, (torch.float64, torch.float32))
    check_rows(op, "g", g, rows, (torch.float32,))
    if (ent_coef is None) != (entropy is None):
        given, missing = ("ent_coef", "entropy") if entropy is None else ("entropy", "ent_coef")
        raise ValueError(f"{op}: {given} needs {missing} (the entropy term takes both), got {missing}=None")
    check_rows(op, "ent_coef", ent_coef, rows, (torch.float32,))
    check_rows(op, "entropy", entropy, rows, (torch.float32,))
    check_device(op, logits, targets, lse, g, ent_coef, entropy)
    if rows == 0 or cols == 0:
        return logits
    lse_hi = lse.float()
    wide = lse.dtype == torch.float64
    lse_lo = (lse - lse_hi.double()).nan_to_num_(0.0, 0.0, 0.0).float() if wide else torch.zeros_like(lse)
    has_ent = ent_coef is not None
    block = row_block(cols, 1024 if interpreting() else 2048)
    # Rows on grid axis 0 (2**31 - 1 programs); vocabulary blocks on axis 1 (65535 at most).
    _chunk_grad_kernel[(rows, triton.cdiv(cols, block))](
        logits,
        logits.stride(0),
        targets,
        lse_hi,
        lse_lo,
        g,
        ent_coef if has_ent else g,  # never read without HAS_ENT
        entropy if has_ent else g,
        cols,
        float(temperature),
        HAS_ENT=has_ent,
        BLOCK_V=block,
        num_warps=4,
        enable_fp_fusion=FP_FUSION,
    )
    return logits
