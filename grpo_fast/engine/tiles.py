"""The tiles of the chunk loop: the row ranges, the ``[C, V]`` logits of one (batch-invariant GEMMs when
asked), the logit soft cap and its derivative, per-row vectors padded to a tile's rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield start, min(start + chunk, n)


def logits_tile(h: Tensor, weight: Tensor, bias: Tensor | None, invariant_rows: int | None = None) -> Tensor:
    """The ``[C, V]`` logits tile of ``h``; with ``invariant_rows`` (batch_invariant=True), computed as GEMMs
    of exactly that many rows each (the last one padded with zero rows, so the tile has a multiple of
    ``invariant_rows`` rows).

    One GEMM shape whatever the tile is what makes a row's logits independent of the rows around it: GEMM
    libraries pick their blocking and reduction order by shape (batch invariance)."""
    if invariant_rows is None:
        return F.linear(h, weight, bias)
    c = h.shape[0]
    rows = -(-c // invariant_rows) * invariant_rows
    if rows != c:
        full = h.new_zeros(rows, h.shape[1])
        full[:c] = h
        h = full
    out = h.new_empty(rows, weight.shape[0])
    wt = weight.t()
    for i in range(0, rows, invariant_rows):
        if bias is None:
            torch.mm(h[i : i + invariant_rows], wt, out=out[i : i + invariant_rows])
        else:
            torch.addmm(bias, h[i : i + invariant_rows], wt, out=out[i : i + invariant_rows])
    return out


def soft_cap_(logits: Tensor, cap: float | None) -> Tensor | None:
    """``logits = cap * tanh(logits / cap)`` in place (the kernels then see the capped logits, whatever the
    backend); returns ``d capped / d logits = 1 - tanh^2`` (fp32, one more [C, V] buffer) to chain into
    dlogits, None without a cap."""
    if cap is None:
        return None
    th = logits.div_(cap).tanh_()
    factor = 1.0 - th.float().square()
    th.mul_(cap)
    return factor


def uncap_(dlogits: Tensor, factor: Tensor | None) -> Tensor:
    """dL/dlogits from dL/dcapped (in place)."""
    return dlogits if factor is None else dlogits.mul_(factor)


def padded(x: Tensor | None, rows: int) -> Tensor | None:
    """A per-row vector extended with zeros to ``rows`` (padding rows: target 0, no gradient)."""
    if x is None or x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros(rows - x.shape[0])])
