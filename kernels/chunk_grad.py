"""The logits gradient for a known ``g = dLoss/dlogp``, written over the tile in place.

``dlogits = g * (onehot(target) - softmax(logits / T)) / T`` in the tile's dtype with fp32 math: one read
and one write of the tile. A 2-D grid (rows x vocabulary blocks) keeps every SM busy even for a few
rows. Targets outside ``[0, V)`` (another vocabulary shard's tokens) get no one-hot term.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import check_device, check_rows, check_tile, interpreting, row_block


@triton.jit
def _chunk_grad_kernel(
    logits_ptr,
    stride_row,
    targets_ptr,
    lse_ptr,
    g_ptr,
    n_cols,
    inv_t,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    valid = cols < n_cols
    ptrs = logits_ptr + row * stride_row + cols
    z = tl.load(ptrs, mask=valid, other=0.0).to(tl.float32) * inv_t
    p = tl.exp(z - tl.load(lse_ptr + row))
    scale = tl.load(g_ptr + row) * inv_t
    onehot = (cols == tl.load(targets_ptr + row)).to(tl.float32)
    tl.store(ptrs, (scale * (onehot - p)).to(logits_ptr.dtype.element_ty), mask=valid)


def chunk_grad_(logits: Tensor, targets: Tensor, lse: Tensor, g: Tensor, temperature: float) -> Tensor:
    """Overwrite ``logits [C, V]`` with ``g * (onehot - exp(logits / T - lse)) / T``; returns ``logits``.

    lse and g are fp32 ``[C]``: the row logsumexp of ``logits / T`` and ``dLoss/dlogp`` per row.
    """
    op = "chunk_grad_"
    check_tile(op, logits)
    rows, cols = logits.shape
    check_rows(op, "targets", targets, rows, (torch.int64, torch.int32))
    check_rows(op, "lse", lse, rows, (torch.float32,))
    check_rows(op, "g", g, rows, (torch.float32,))
    check_device(op, logits, targets, lse, g)
    if rows == 0 or cols == 0:
        return logits
    block = row_block(cols, 1024 if interpreting() else 2048)
    # Rows on grid axis 0 (2**31 - 1 programs); vocabulary blocks on axis 1 (65535 at most).
    _chunk_grad_kernel[(rows, triton.cdiv(cols, block))](
        logits,
        logits.stride(0),
        targets,
        lse,
        g,
        cols,
        1.0 / temperature,
        BLOCK_V=block,
        num_warps=4,
    )
    return logits
